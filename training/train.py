"""The stages after pruning, as the recipe names them:

    python -m training.train --config configs/full.yaml [--device cuda]

run_dir/pruned -> [relation distillation -> run_dir/distilled, when ``distill.enabled``] ->
``task_stage`` (``query_distill``: training/query_distill.py; ``finetune``:
training/finetune.py) -> run_dir/elastic [-> query heads, training/align.py, after query_distill
when ``align.enabled``]. Each stage resumes from its checkpoint.
"""

from __future__ import annotations

import time

from pathlib import Path

from training.align import align
from training.config import RecipeConfig, config_cli
from training.distill import distill
from training.finetune import finetune
from training.query_distill import query_distill


def train_task(cfg: RecipeConfig, root: Path, desc: str) -> None:
    """The stages after pruning, for the model under ``root`` (run_dir, or a static level's
    directory): [relation distillation: pruned -> distilled], then the task stage into
    ``root``/elastic, then its query heads (query_distill with ``align.enabled``); checkpoints
    under ``root``/checkpoints."""
    if cfg.distill.enabled:
        distill(cfg, root / "pruned", root / "distilled", root / "checkpoints" / "distill", f"{desc}distill")
    stage = query_distill if cfg.task_stage == "query_distill" else finetune
    stage(cfg, cfg.task_init(root), root / "elastic", root / "checkpoints" / cfg.task_stage, f"{desc}{cfg.task_stage}")
    if cfg.align.enabled and cfg.task_stage == "query_distill":
        align(cfg, root / "elastic")


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    train_task(cfg, cfg.run, "")
    print(f"[train] {cfg.task_stage}: wrote {cfg.run / 'elastic'} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Train the pruned model: [relation distillation], then the recipe's task stage.", run)


if __name__ == "__main__":
    main()
