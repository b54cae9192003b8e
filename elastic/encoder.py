"""Loading an elastic (or plain BERT) model directory and turning text into embeddings.

A model directory holds ``config.json``, ``model.safetensors`` and tokenizer files, as any
local BERT-family checkpoint; an exported elastic model adds ``submap.json``. A directory
without submap.json is a teacher: one level, 100, the full layout. An ElasticDenser model may add
``query_heads.safetensors``: a query head per level (elastic/query_head.py), applied to query
embeddings only (``query=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from elastic.query_head import FILE as QUERY_HEADS, QueryHeads
from elastic.structure import BertDims, ElasticBert, SubLM, load_state, pack, packed_bytes, pool, save_state
from elastic.submap import Submap


def _teacher_pooling(model_dir: Path) -> tuple[str, bool]:
    """Pooling of a sentence-transformers directory (1_Pooling/config.json, modules.json);
    mean pooling without normalization for a plain BERT checkpoint."""
    mode, normalize = "mean", False
    pcfg = model_dir / "1_Pooling" / "config.json"
    if pcfg.exists():
        mode = "cls" if json.loads(pcfg.read_text()).get("pooling_mode_cls_token") else "mean"
    modules = model_dir / "modules.json"
    if modules.exists():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return mode, normalize


class ElasticEncoder:
    """Tokenizer + ElasticBert + Submap of one model directory.

    Args:
        model_dir: a directory as described in the module docstring.
        query_heads: load query_heads.safetensors when the directory has one (False: the SubLMs'
            pooled embeddings as they are, for measuring what the heads add).
        packed: serve each level from its own contiguous copy of the encoder layers
            (``structure.pack``) instead of slicing the stored weights; for inference only (the
            copies do not follow later changes to ``model``; ``hidden`` with gates slices).

    Raises:
        FileNotFoundError: config.json or model.safetensors is missing.
        ValueError: submap.json or query_heads.safetensors is malformed or does not match the
            weights (the message names the file and the field or tensor).
    """

    def __init__(self, model_dir: str | Path, query_heads: bool = True, packed: bool = False):
        from transformers import AutoTokenizer

        self.model_dir = d = Path(model_dir)
        for f in ("config.json", "model.safetensors"):
            if not (d / f).exists():
                raise FileNotFoundError(f"{d}: {f} is missing (not a BERT-family model directory)")
        self.dims = BertDims.from_config_file(d / "config.json")
        if (d / "submap.json").exists():
            self.submap = Submap.load(d / "submap.json", self.dims)
        else:
            mode, norm = _teacher_pooling(d)
            self.submap = Submap({100: self.dims.full()}, mode, norm)
        self.model = ElasticBert(self.dims, self.submap.levels[self.submap.largest])
        try:
            load_state(d / "model.safetensors", self.model)
        except ValueError as e:
            raise ValueError(
                f"submap.json levels['{self.submap.largest}'] (the stored layout) does not match the weights: {e}"
            ) from None
        self.model.eval()
        self.query_heads = (QueryHeads.load(d / QUERY_HEADS, self.levels, self.dims.hidden_size, d / "model.safetensors")
                            if query_heads and (d / QUERY_HEADS).exists() else None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.packed = pack(self.model, self.submap.levels) if packed else None
        self.packed_bytes = packed_bytes(self.model, self.packed) if packed else 0  # what the copies add

    def save(self, out: str | Path, model: ElasticBert | None = None, submap: Submap | None = None) -> None:
        """Write a model directory: config.json, model.safetensors (``model``, default this
        one's), submap.json (``submap``, default this one's) and the tokenizer files. Query heads
        are not written (they belong to the weights they were fitted to; training/align.py fits
        new ones), and stale ones in ``out`` are removed."""
        import shutil

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model = model or self.model
        (out / QUERY_HEADS).unlink(missing_ok=True)
        save_state(model, out / "model.safetensors")
        (submap or self.submap).save(out / "submap.json", self.dims)
        shutil.copy(self.model_dir / "config.json", out / "config.json")
        self.tokenizer.save_pretrained(str(out))

    @property
    def levels(self) -> list[int]:
        """Preserving levels in percent, largest first."""
        return list(self.submap.levels)

    def sublm(self, level: int) -> SubLM:
        return self.submap.sublm(level)

    def tokenize(self, texts: list[str] | list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
        """(B, T) padded ids, mask and segment ids of single texts, or of (A, B) pairs encoded as
        ``[CLS] A [SEP] B [SEP]`` (segment ids 0 / 1, the longer side cut first)."""
        if texts and isinstance(texts[0], tuple):
            a, b = zip(*texts)
            return self.tokenizer(list(a), list(b), padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt")
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def hidden(self, batch: dict[str, torch.Tensor], level: int, **gates: list[torch.Tensor]) -> torch.Tensor:
        """(B, T, d) last hidden states of a tokenized batch by the SubLM at ``level`` (grad
        follows torch's grad mode). ``gates``: head_gates / neuron_gates of ElasticBert.forward,
        for expressive scores only."""
        packed = self.packed.get(level) if self.packed is not None and not gates else None
        if packed is not None:  # a level the submap lacks goes on to sublm()'s error
            return packed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                          sublm=self.sublm(level), **gates)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) last hidden states -> (B, d) embeddings, pooled as submap.json says."""
        return pool(hidden, attention_mask, self.submap.pooling, self.submap.normalize)

    def embed(self, batch: dict[str, torch.Tensor], level: int, query: bool = False,
              **gates: list[torch.Tensor]) -> torch.Tensor:
        """(B, d) embeddings of a tokenized batch by the SubLM at ``level``: ``pool(hidden(...))``
        (grad follows torch's grad mode, so training code calls this too). ``query``: the batch
        holds queries, so the level's query head maps the embedding when the model has heads
        (passages and models without heads: unchanged)."""
        s = self.pool(self.hidden(batch, level, **gates), batch["attention_mask"])
        if query and self.query_heads is not None:
            s = self.query_heads.apply(s, level, self.submap.normalize)
        return s

    @torch.inference_mode()
    def encode(self, texts: list[str], level: int, max_length: int = 128, batch_size: int = 64,
               progress: bool = False, query: bool = False) -> torch.Tensor:
        """(N, d) float32 embeddings of ``texts`` in input order; batches are length-sorted.
        ``query``: as for :meth:`embed`."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dims.hidden_size)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"encode level {level}", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            out[idx] = self.embed(self.tokenize([texts[i] for i in idx], max_length), level, query)
        return out
