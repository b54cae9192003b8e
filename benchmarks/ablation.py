"""Ablations of the ElasticDenser recipe, each against the recipe's own model (run_dir/elastic):

    python -m benchmarks.ablation --config configs/full.yaml [--steps N]

- ``index=largest``: the recipe's model, its levels scored against an index filled by its own
  largest SubLM instead of the teacher's passage embeddings (evaluation only);
- ``scores=<other>``: expressive scores from the other objective (``prune.score_objective``),
  pruned and trained with the same recipe;
- ``task=finetune`` / ``task=query_distill``: the other task stage (``task_stage``), from the
  same pruned model;
- ``word embeddings=trained`` / ``frozen``: ``query_distill.freeze_word_embeddings`` the other way;
- ``relations=on`` / ``off``: relation distillation before the task stage switched the other way;
- ``token loss=on`` / ``off``: ``query_distill.token_weight`` 1 when the recipe has 0, else 0
  (each query token's last hidden state toward the teacher's, training/token_loss.py).

Each trained variant lives in run_dir/ablation/<name>/ (its own pruned model when its pruning
differs; the teacher cache is shared by hard links) and resumes like any stage. ``--steps``
gives every trained variant that many task-stage steps, and relation distillation as many
(default: the recipe's), so that the
ablation fits beside the recipe; the recipe's own model is then retrained at that budget too
(``ablation/recipe``), so that every row compares at one budget. Writes
run_dir/eval/ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from training import prune
from training.config import RecipeConfig, load_config
from training.train import train_task


def variants(cfg: RecipeConfig) -> dict[str, RecipeConfig]:
    """{name: recipe} of the trained variants (see the module docstring)."""
    out = {}
    v = copy.deepcopy(cfg)
    v.prune.score_objective = "contrastive" if cfg.prune.score_objective == "query_distill" else "query_distill"
    out[f"scores={v.prune.score_objective}"] = v
    v = copy.deepcopy(cfg)
    v.task_stage = "finetune" if cfg.task_stage == "query_distill" else "query_distill"
    out[f"task={v.task_stage}"] = v
    v = copy.deepcopy(cfg)
    v.query_distill.freeze_word_embeddings = not cfg.query_distill.freeze_word_embeddings
    out[f"word embeddings={'frozen' if v.query_distill.freeze_word_embeddings else 'trained'}"] = v
    v = copy.deepcopy(cfg)
    v.distill.enabled = not cfg.distill.enabled
    out[f"relations={'on' if v.distill.enabled else 'off'}"] = v
    if cfg.task_stage == "query_distill":
        v = copy.deepcopy(cfg)
        v.query_distill.token_weight = 1.0 if cfg.query_distill.token_weight == 0 else 0.0
        out[f"token loss={'on' if v.query_distill.token_weight else 'off'}"] = v
    return out


def _share_teacher_cache(src: Path, dst: Path) -> None:
    (dst / "teacher").mkdir(parents=True, exist_ok=True)
    for f in (src / "teacher").glob("*.pt"):
        t = dst / "teacher" / f.name
        if not t.exists():
            os.link(f, t)


def train_variants(cfg: RecipeConfig, steps: int | None = None) -> dict[str, Path]:
    """Prune (when the variant's pruning differs) and train every variant; {name: model dir}."""
    todo = variants(cfg)
    if steps is not None:
        todo = {"recipe": copy.deepcopy(cfg), **todo}
    dirs = {}
    for name, v in todo.items():
        root = cfg.run / "ablation" / name.replace("=", "-")
        v.run_dir = str(root)
        if steps is not None:
            v.query_distill.steps = v.finetune.steps = v.distill.steps = steps
        _share_teacher_cache(cfg.run, root)
        if v.prune == cfg.prune:
            if not (root / "pruned" / "model.safetensors").exists():
                os.makedirs(root / "pruned", exist_ok=True)
                for f in (cfg.run / "pruned").iterdir():
                    if not (root / "pruned" / f.name).exists():
                        os.link(f, root / "pruned" / f.name)
        else:
            prune.run(v)
        train_task(v, root, f"ablation {name} ")
        dirs[name] = root / "elastic"
    return dirs


def run(cfg: RecipeConfig, steps: int | None = None) -> list[dict]:
    from benchmarks.evaluate import EvalData, score_system, to_markdown

    t0 = time.time()
    dirs = train_variants(cfg, steps)
    data = EvalData.load(cfg, cfg.data.dev_queries, cfg.data.qrels, cfg.data.collection)
    rows = []
    recipe = dirs.get("recipe", cfg.run / "elastic")
    for side in ("teacher", "largest"):
        for r in score_system(cfg, data, recipe, "elastic", latency=False, passage_side=side):
            rows.append({"variant": f"recipe, index={side}", **r})
    for name, d in dirs.items():
        if name != "recipe":
            for r in score_system(cfg, data, d, "elastic", latency=False):
                rows.append({"variant": name, **r})
    out = cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    budget = f"{steps} task-stage steps each" if steps else "the recipe's steps"
    md = (f"Ablations of {cfg.run_dir} ({budget}); dev queries {cfg.data.dev_queries}.\n\n"
          + to_markdown(rows, ["variant", "level", "mrr_at_10", "ndcg_at_10", "r_at_20", "r_at_100", "cos_to_teacher"]))
    (out / "ablation.md").write_text(md)
    print(f"[ablation] ({time.time() - t0:.0f} s)\n{md}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Recipe ablations: index, expressive-score objective, task stage, relations.")
    ap.add_argument("--config", help="recipe YAML")
    ap.add_argument("--steps", type=int, help="task-stage steps of every trained variant (default: the recipe's)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    ap.add_argument("--threads", type=int, help="override train.threads (0 = torch's default)")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if a.device:
        cfg.train.device = a.device
    if a.threads is not None:
        cfg.train.threads = a.threads
    run(cfg, a.steps)


if __name__ == "__main__":
    main()
