"""Query heads: one affine map per preserving level from a SubLM's pooled query embedding into
the space of the index it searches.

ElasticDenser serves every level against one index that the teacher filled once (training/
query_distill.py). All levels share the encoder, and so its last layer: training pulls each
SubLM's query toward the teacher's through the same weights, and the small SubLMs end far from
it (demo, 5 %: mean cosine 0.43 to the teacher's query). A query head per level,

    h_k(s) = W_k s + b_k,        W_k (d, d), b_k (d,),   then L2-normalized as the pooling is,

maps SubLM k's pooled embedding s (B, d) onto the teacher's query space. It acts on the query
side only (the index is untouched), costs d² + d parameters per level (147,840 at d = 384: 1.2 %
of the 5 % SubLM's 12.5 M) and 2·d² FLOPs per query, and is fitted in closed form by ridge
regression on the training queries (training/align.py): label-free embedding matching toward a
fixed document index, as in Wang & Lyu 2023, solved exactly for a linear map. The encoder stays one set of
weights that every level slices; a head is the level's own output layer, as a task head is.

File: ``query_heads.safetensors`` in the model directory, tensors ``"<level>.weight"`` (d, d)
and ``"<level>.bias"`` (d,) for every level of submap.json (heads of levels the submap does not
hold are ignored, so an archive that packs a subset of levels keeps the file whole), and
metadata ``model_sha256``: the sha256 of the model.safetensors they were fitted to, so heads
left beside retrained weights fail the load instead of serving a wrong map.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FILE = "query_heads.safetensors"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass
class QueryHeads:
    """Per-level affine query heads (see the module docstring).

    Attributes:
        heads: level (percent) -> (W (d, d), b (d,)), float32.
        model_sha256: sha256 of the model.safetensors the heads were fitted to.
    """

    heads: dict[int, tuple[torch.Tensor, torch.Tensor]]
    model_sha256: str

    def apply(self, s: torch.Tensor, level: int, normalize: bool) -> torch.Tensor:
        """(B, d) pooled embeddings of SubLM ``level`` -> (B, d) W s + b, L2-normalized when
        ``normalize`` (the submap's pooling normalizes).

        Raises:
            KeyError: no head for ``level``.
        """
        if level not in self.heads:
            raise KeyError(f"{FILE}: no head for level {level} (heads: {sorted(self.heads, reverse=True)})")
        W, b = self.heads[level]
        q = torch.addmm(b, s, W.T)  # (B, d)
        return F.normalize(q, dim=-1) if normalize else q

    @staticmethod
    def params(hidden_size: int) -> int:
        """Parameters of one level's head: d² + d."""
        return hidden_size * hidden_size + hidden_size

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write ``path`` (safetensors: "<level>.weight", "<level>.bias", metadata model_sha256
        and ``metadata``, strings only)."""
        from safetensors.torch import save_file

        tensors = {}
        for level, (W, b) in self.heads.items():
            tensors[f"{level}.weight"] = W.detach().float().contiguous()
            tensors[f"{level}.bias"] = b.detach().float().contiguous()
        save_file(tensors, str(path), metadata={**(metadata or {}), "model_sha256": self.model_sha256})

    @classmethod
    def load(cls, path: str | Path, levels: list[int], hidden_size: int, weights: str | Path) -> "QueryHeads":
        """Read and check the heads of ``levels`` against the model beside them.

        Args:
            path: the query_heads.safetensors file.
            levels: the submap's levels; each needs a head.
            hidden_size: d of config.json.
            weights: the model.safetensors the heads must have been fitted to.

        Raises:
            ValueError: a level without a head, a tensor of the wrong shape, or heads fitted to
                other weights (each message names the file and the tensor or field).
        """
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_metadata(path)
        tensors = load_file(str(path))
        heads = {}
        for level in levels:
            for part, shape in (("weight", (hidden_size, hidden_size)), ("bias", (hidden_size,))):
                name = f"{level}.{part}"
                if name not in tensors:
                    raise ValueError(f"{path}: no tensor '{name}' (every level of submap.json needs a head)")
                if tuple(tensors[name].shape) != shape:
                    raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected "
                                     f"{shape} (config.json hidden_size {hidden_size})")
            heads[level] = (tensors[f"{level}.weight"].float(), tensors[f"{level}.bias"].float())
        sha = meta.get("model_sha256")
        if sha is None:
            raise ValueError(f"{path}: metadata 'model_sha256' is missing")
        if sha != file_sha256(Path(weights)):
            raise ValueError(f"{path}: metadata 'model_sha256' does not match {weights}: the heads were fitted to "
                             f"other weights (rerun python -m training.align)")
        return cls(heads, sha)
