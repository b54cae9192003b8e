"""Static baselines "w/o elasticity" (paper §5.2): each preserving level trained alone.

    python -m training.static --config configs/full.yaml [--device cuda]

For every level p of ``static.levels`` (default: all): the SubLM p of run_dir/pruned is cut
out physically (``elastic.structure.prune``) into a one-level model, then trained by the same
stages as the elastic model (relation distillation when ``distill.enabled``, then the
``task_stage``) with the same recipe and the same number of optimizer steps; the only
difference is that each step traverses one SubLM instead of all of them. Writes
run_dir/static/<p>/{pruned,[distilled,]elastic}.
"""

from __future__ import annotations

import time
from pathlib import Path

from elastic.encoder import ElasticEncoder
from elastic.structure import prune
from elastic.submap import Submap
from training.config import RecipeConfig, config_cli
from training.train import train_task


def cut_level(src: Path, level: int, out: Path) -> None:
    """Write a one-level model directory holding SubLM ``level`` of ``src`` physically pruned.

    Raises:
        ValueError: ``level`` is not in src's submap.json.
    """
    enc = ElasticEncoder(src)
    sub = enc.sublm(level)
    enc.save(out, prune(enc.model, sub), Submap({level: sub}, enc.submap.pooling, enc.submap.normalize))


def static_levels(cfg: RecipeConfig) -> list[int]:
    return sorted(cfg.static.levels or cfg.prune.levels, reverse=True)


def run(cfg: RecipeConfig) -> None:
    for level in static_levels(cfg):
        t0 = time.time()
        root = cfg.run / "static" / str(level)
        cut_level(cfg.run / "pruned", level, root / "pruned")
        train_task(cfg, root, f"static {level}% ")
        print(f"[static] level {level}% trained alone into {root / 'elastic'} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Static baselines: every preserving level distilled and fine-tuned alone.", run)


if __name__ == "__main__":
    main()
