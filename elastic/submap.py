"""submap.json: the preserving levels of an elastic model and their per-layer widths.

Format (``"format": "elasticlm-submap/1"``)::

    {
      "format": "elasticlm-submap/1",
      "encoder": {"pooling": "mean", "normalize": true},
      "levels": {                       # preserving level in percent -> SubLM
        "50": {"heads": [12, 9, ...],   # heads kept per layer (a prefix of the stored order)
               "neurons": [980, ...],   # FFN neurons kept per layer
               "params": 14750000,      # all parameters the SubLM uses (embeddings included)
               "mha_ffn_params": 5300000,
               "gflops": 1.41},         # forward GFLOPs for one 128-token sequence
        "40": {...}, ...
      }
    }

Levels are nested: every level lies within every larger one (paper §4.1, a_k ⊆ a_h). The
largest level is the layout physically stored in model.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elastic.structure import BertDims, SubLM, gflops, mha_ffn_params, total_params

FORMAT = "elasticlm-submap/1"


@dataclass(frozen=True)
class Submap:
    """Preserving levels (percent, descending) -> SubLM, plus how embeddings are pooled."""

    levels: dict[int, SubLM]
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("submap.json: levels is empty")
        object.__setattr__(self, "levels", dict(sorted(self.levels.items(), reverse=True)))
        order = list(self.levels.items())
        for (big, sb), (small, ss) in zip(order, order[1:]):
            if not ss.within(sb):
                raise ValueError(
                    f"submap.json: levels['{small}'] is not nested in levels['{big}'] "
                    f"(heads {ss.heads} vs {sb.heads}, neurons {ss.neurons} vs {sb.neurons})"
                )
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"submap.json: encoder.pooling must be 'mean' or 'cls', got {self.pooling!r}")

    def sublm(self, level: int) -> SubLM:
        """The SubLM of ``level``. Raises ValueError naming the levels there are."""
        try:
            return self.levels[level]
        except KeyError:
            raise ValueError(f"level {level} is not in submap.json (levels: {list(self.levels)})") from None

    @property
    def largest(self) -> int:
        return next(iter(self.levels))

    def to_json(self, dims: BertDims) -> dict:
        """The JSON object written to submap.json, with parameter and GFLOPs figures."""
        return {
            "format": FORMAT,
            "encoder": {"pooling": self.pooling, "normalize": self.normalize},
            "levels": {
                str(p): {
                    "heads": list(s.heads),
                    "neurons": list(s.neurons),
                    "params": total_params(dims, s),
                    "mha_ffn_params": mha_ffn_params(dims, s),
                    "gflops": round(gflops(dims, s, 128), 4),
                }
                for p, s in self.levels.items()
            },
        }

    def save(self, path: Path, dims: BertDims) -> None:
        Path(path).write_text(json.dumps(self.to_json(dims), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path, dims: BertDims) -> "Submap":
        """Read and validate submap.json against the base config.

        Raises:
            ValueError: naming the field that is missing, malformed, not nested, or wider than
                or of another depth than ``dims``.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: format must be {FORMAT!r}, got {raw.get('format')!r}")
        if not isinstance(raw.get("levels"), dict):
            raise ValueError(f"{path}: levels must be an object of level -> SubLM")
        levels = {}
        for key, v in raw["levels"].items():
            field = f"levels['{key}']"
            try:
                p = int(key)
            except ValueError:
                raise ValueError(f"{path}: {field}: level must be an integer percent") from None
            if not 0 < p <= 100:
                raise ValueError(f"{path}: {field}: level must be in (0, 100]")
            for part in ("heads", "neurons"):
                w = v.get(part) if isinstance(v, dict) else None
                if not isinstance(w, list) or not all(isinstance(x, int) for x in w):
                    raise ValueError(f"{path}: {field}.{part} must be a list of integers")
                if len(w) != dims.num_hidden_layers:
                    raise ValueError(
                        f"{path}: {field}.{part} has {len(w)} layers, config.json has {dims.num_hidden_layers}"
                    )
            s = SubLM(v["heads"], v["neurons"])
            if not s.within(dims.full()):
                raise ValueError(f"{path}: {field} is wider than config.json allows")
            levels[p] = s
        enc = raw.get("encoder", {})
        try:
            return cls(levels, enc.get("pooling", "mean"), bool(enc.get("normalize", True)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
