"""The stages after pruning, as the recipe names them:

    python -m training.train --config configs/full.yaml [--device cuda]

run_dir/pruned -> [relation distillation -> run_dir/distilled, when ``distill.enabled``] ->
``task_stage`` (``query_distill``: training/query_distill.py; ``finetune``:
training/finetune.py) -> run_dir/elastic. Each stage resumes from its checkpoint.
"""

from __future__ import annotations

import time

from training.config import RecipeConfig, config_cli
from training.static import train_task


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    train_task(cfg, cfg.run, "")
    print(f"[train] {cfg.task_stage}: wrote {cfg.run / 'elastic'} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Train the pruned model: [relation distillation], then the recipe's task stage.", run)


if __name__ == "__main__":
    main()
