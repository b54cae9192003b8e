"""Fine-tuning ablations of ElasticDenser, same distilled start and step budget:

    python -m benchmarks.ablation --config configs/full.yaml

- passage side: the teacher's index vs. the largest SubLM's (``finetune.passage_side``),
- KL to the teacher's similarity distribution on and off (``finetune.kd_weight``).

The recipe's own setting is run_dir/elastic; each other variant is fine-tuned from
run_dir/distilled into run_dir/ablation/<variant>. Every variant's levels are scored on the dev
queries (passages encoded by its passage side); writes run_dir/eval/ablation.{json,md}.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from training.config import RecipeConfig, config_cli
from training.finetune import finetune


VARIANTS = (("teacher", True), ("teacher", False), ("largest", True))  # (passage side, KL on)


def variants(cfg: RecipeConfig) -> dict[str, RecipeConfig]:
    """{name: recipe}: the passage sides with the KL on, and the KL switched off on the teacher
    side (query-only training: the cheap place to measure it). The recipe's own setting is
    among them when it is one of these; it is added when it is not."""
    ft = cfg.finetune
    settings = list(VARIANTS)
    if (ft.passage_side, ft.kd_weight > 0) not in settings:
        settings.insert(0, (ft.passage_side, ft.kd_weight > 0))
    out = {}
    for side, kd in settings:
        v = copy.deepcopy(cfg)
        v.finetune.passage_side = side
        v.finetune.kd_weight = (ft.kd_weight or 1.0) if kd else 0.0
        out[f"passages={side} kd={'on' if kd else 'off'}"] = v
    return out


def variant_dir(cfg: RecipeConfig, name: str, v: RecipeConfig) -> Path:
    if (v.finetune.passage_side, v.finetune.kd_weight) == (cfg.finetune.passage_side, cfg.finetune.kd_weight):
        return cfg.run / "elastic"
    return cfg.run / "ablation" / name.replace(" ", "_").replace("=", "-")


def train_variants(cfg: RecipeConfig) -> dict[str, Path]:
    """Fine-tune every variant that is not the recipe's own (resumes like any stage)."""
    dirs = {}
    for name, v in variants(cfg).items():
        d = variant_dir(cfg, name, v)
        if d != cfg.run / "elastic":
            finetune(v, cfg.run / "distilled", d, cfg.run / "checkpoints" / d.name, f"ablation {name}")
        dirs[name] = d
    return dirs


def run(cfg: RecipeConfig) -> list[dict]:
    from benchmarks.evaluate import EvalData, score_system, to_markdown

    t0 = time.time()
    dirs = train_variants(cfg)
    data = EvalData.load(cfg, cfg.data.dev_queries, cfg.data.qrels, cfg.data.collection)
    rows = []
    for name, d in dirs.items():
        for r in score_system(cfg, data, d, "elastic", latency=False):
            rows.append({"variant": name, **r})
    out = cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = to_markdown(rows, ["variant", "level", "mrr_at_10", "r_at_20", "r_at_100"])
    (out / "ablation.md").write_text(md)
    print(f"[ablation] ({time.time() - t0:.0f} s)\n{md}", flush=True)
    return rows


def main() -> None:
    config_cli("Fine-tuning ablations: teacher KL on/off, passage side teacher/largest.", run)


if __name__ == "__main__":
    main()
