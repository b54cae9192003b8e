"""ElasticLM on GLUE, the paper's Table 4 and Fig. 8 per level: one command trains what is missing
(training/glue.py; every stage resumes) and scores every model on the dev sets.

    python -m benchmarks.glue --config configs/glue.yaml [--device cuda] [--out benchmarks/results]

Writes:
- ``glue.json``: a list of rows {task, system ("teacher" | "elastic" | "static"), level (percent, or
  null for the teacher), metric ("accuracy" | "f1" | "spearman"), score (0-100), gflops (forward
  GFLOPs of one 128-token sequence)};
- ``glue.md``: a Table-4-like table with a GLUE score column (the mean over the four tasks), MRPC
  accuracy and STS-B Pearson beside the GLUE metrics, the targets, and the recipe;
- ``glue.png``: score against preserving level, elastic beside static, one panel per task and one
  for the GLUE score (Fig. 8's layout).

The dev sets are scored and never trained on or selected with: the recipe has no search grid and
no early stopping, so the dev figures are held-out figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from elastic.classifier import GlueModel
from elastic.glue import TASKS, get_task, predictions, score
from elastic.structure import gflops
from training.config import RecipeConfig, load_config
from training.glue import load_task_data
from training.glue import run as train_all
from training.static import static_levels

METRIC_LABEL = {"accuracy": "Acc", "f1": "F1", "spearman": "Spearman"}


def systems(cfg: RecipeConfig, task: str) -> list[tuple[str, Path, int | None]]:
    """(system, model directory, level) of every model to score for ``task``."""
    root = cfg.run / "glue" / task
    out = [("teacher", Path(cfg.glue.teachers.get(task, root / "teacher")), None)]
    out += [("elastic", root / "elastic", p) for p in sorted(cfg.prune.levels, reverse=True)]
    if cfg.static.enabled:
        out += [("static", root / "static" / str(p), p) for p in static_levels(cfg)]
    return out


def evaluate(cfg: RecipeConfig) -> tuple[list[dict], dict]:
    """Score every model on its task's dev set.

    Returns:
        rows (glue.json's rows) and, keyed by (task, system, level), every metric of
        ``elastic.glue.score`` (MRPC's accuracy and STS-B's Pearson besides the GLUE metric).

    Raises:
        FileNotFoundError: a model directory is missing (run training/glue.py first).
    """
    rows, extra = [], {}
    for name in cfg.glue.tasks:
        task = get_task(name)
        _, dev = load_task_data(cfg, task)
        for system, path, level in systems(cfg, name):
            model = GlueModel(path, task)
            lv = level if level is not None else model.levels[0]
            logits = model.predict_logits(dev.text_a, dev.text_b, lv, cfg.glue.eval_batch_size)
            s = score(task, predictions(task, logits), dev.labels)
            rows.append({"task": name, "system": system, "level": level, "metric": task.metric,
                         "score": round(s[task.metric], 2), "gflops": round(gflops(model.dims, model.sublm(lv), 128), 4)})
            extra[(name, system, level)] = s
            print(f"[glue] {name:5} {system:7} {level if level is not None else '-':>4}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in s.items()), flush=True)
    return rows, extra


def glue_scores(rows: list[dict], tasks: list[str]) -> dict[tuple[str, int | None], float]:
    """GLUE score (mean over ``tasks`` of each task's metric) per (system, level) that has every task."""
    by: dict[tuple[str, int | None], dict[str, float]] = {}
    for r in rows:
        by.setdefault((r["system"], r["level"]), {})[r["task"]] = r["score"]
    return {k: sum(v[t] for t in tasks) / len(tasks) for k, v in by.items() if all(t in v for t in tasks)}


def targets(rows: list[dict], tasks: list[str]) -> list[str]:
    """The issue's targets, each line saying held / not held with its figures."""
    g = glue_scores(rows, tasks)
    lines = []
    t = g.get(("teacher", None))
    for level, need in ((50, 0.99), (10, 0.96)):
        e = g.get(("elastic", level))
        if t is not None and e is not None:
            ok = e >= need * t
            lines.append(f"- Elastic GLUE score at {level} %: {e:.2f} = {e / t:.4f} of the teacher's {t:.2f} "
                         f"(target >= {need}): {'held' if ok else 'NOT held'}")
    for (system, level), e in sorted(g.items(), key=lambda kv: -(kv[0][1] or 101)):
        s = g.get(("static", level))
        if system == "elastic" and s is not None:
            ok = e >= s - 1.0
            lines.append(f"- {level} %: elastic {e:.2f} vs static {s:.2f} ({e - s:+.2f}; target >= -1): "
                         f"{'held' if ok else 'NOT held'}")
    return lines


POOLING_WORDS = {  # what the classifier reads (glue.pooling, validated at load), as glue.md's recipe says it
    "cls": "BERT's pooled [CLS]",
    "mean": "the mean of the tokens",
}

STRUCTURES = {  # how each prune.score_objective ranks units, as glue.md's recipe says it
    "relation": "task-agnostic expressive scores (the relation-distillation loss on unlabeled text)",
    "glue_task": "the task teachers' expressive scores (each task's loss on its training examples, summed over "
                 "the tasks)",
}


def markdown(rows: list[dict], extra: dict, cfg: RecipeConfig, tasks: list[str], command: str, wall_s: float) -> str:
    """glue.md: Table 4's layout (one row per system and level), the targets and the recipe."""
    g = glue_scores(rows, tasks)
    head = ["system", "level", "GFLOPs"]
    for t in tasks:
        task = TASKS[t]
        head.append(f"{t} {METRIC_LABEL[task.metric]}" + (" (Acc)" if t == "MRPC" else " (Pearson)" if t == "STS-B" else ""))
    head.append("GLUE score")
    keys = []
    for r in rows:
        k = (r["system"], r["level"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (-(k[1] if k[1] is not None else 101), {"teacher": 0, "elastic": 1, "static": 2}[k[0]]))
    gfl = {(r["system"], r["level"]): r["gflops"] for r in rows}
    out = ["# ElasticLM on GLUE (dev sets)", "",
           f"`{command}` ({wall_s / 60:.0f} min for this command; training stages already done are skipped).", "",
           "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for k in keys:
        cells = [k[0] if k[0] != "static" else "static (w/o elasticity)", f"{k[1]} %" if k[1] is not None else "100 %",
                 f"{gfl[k]:.3f}"]
        for t in tasks:
            s = extra.get((t, k[0], k[1]))
            if s is None:
                cells.append("")
                continue
            m = TASKS[t].metric
            cell = f"{s[m]:.1f}"
            if t == "MRPC":
                cell += f" ({s['accuracy']:.1f})"
            if t == "STS-B":
                cell += f" ({s['pearson']:.1f})"
            cells.append(cell)
        cells.append(f"{g[k]:.2f}" if k in g else "")
        out.append("| " + " | ".join(cells) + " |")
    gc = cfg.glue
    out += ["", "QNLI has a dev set only here (no training set), so it is not fine-tuned and not in the GLUE score; "
            "QQP and MNLI are not available. GFLOPs: forward of one 128-token sequence through the encoder layers "
            "(elastic.structure.gflops).", "", "## Targets", "", *targets(rows, tasks), "",
            "## Recipe", "",
            f"- Teacher: the bundled all-MiniLM-L6-v2 BERT (6 layers, hidden 384), fine-tuned per task for "
            f"{gc.teacher_epochs:g} epochs at lr {gc.teacher_lr:g} (task loss only); teachers and students classify "
            f"from {POOLING_WORDS[gc.pooling]} (glue.pooling = {gc.pooling}).",
            f"- Structure: pruned by {STRUCTURES.get(cfg.prune.score_objective, 'expressive scores')} "
            f"(prune.score_objective = {cfg.prune.score_objective}) into levels {cfg.prune.levels}; "
            f"relation distillation "
            f"{'on' if cfg.distill.enabled else 'off'} ({cfg.distill.steps} steps of {cfg.distill.batch_size} "
            f"unlabeled texts, {cfg.distill.max_length} tokens), every SubLM at every step; each static level "
            "distilled alone with the same steps.",
            f"- Fine-tuning, elastic and static alike: {gc.epochs:g} epochs, batch {gc.batch_size}, lr {gc.lr:g}, "
            f"warmup {gc.warmup:g}, weight decay {gc.weight_decay:g}, loss (1 - {gc.kd_weight:g}) x task + "
            f"{gc.kd_weight:g} x KD (KL at temperature {gc.kd_temperature:g}, x its square; MSE to the teacher's "
            "score for STS-B); pooler and classifier start from the task's teacher.",
            f"- Training examples: {examples_words(gc)} "
            "Max length: 64 tokens for SST-2, 128 for the others (Table 3).",
            "- No search grid and no early stopping: the dev sets are only scored."]
    return "\n".join(out) + "\n"


def examples_words(gc) -> str:
    """The recipe's use of the training examples, in words (glue.max_train_examples, max_epoch_examples)."""
    pool = ("every one" if not gc.max_train_examples else
            f"every one, except tasks with more than {gc.max_train_examples}: a uniform seeded sample of "
            f"{gc.max_train_examples} (SST-2: of SST-2.train.tsv's 60,614 sentences)")
    if not gc.max_epoch_examples:
        return pool + "."
    return (pool + f"; an epoch of a task with more than {gc.max_epoch_examples} counts {gc.max_epoch_examples} "
            f"examples (glue.max_epoch_examples): SST-2 takes the steps of a {gc.max_epoch_examples}-sentence "
            "sample, its batches drawn from all of its sentences.")


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    """glue.png: score against preserving level, elastic and static, one panel per task + GLUE score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = glue_scores(rows, tasks)
    panels = tasks + (["GLUE score"] if g else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for system, style in (("elastic", "o-"), ("static", "s--")):
            if name == "GLUE score":
                pts = sorted((lv, v) for (s, lv), v in g.items() if s == system)
            else:
                pts = sorted((r["level"], r["score"]) for r in rows if r["task"] == name and r["system"] == system)
            if pts:
                ax.plot(*zip(*pts), style, label=system if system == "elastic" else "static (w/o elasticity)")
        teacher = (g.get(("teacher", None)) if name == "GLUE score"
                   else next((r["score"] for r in rows if r["task"] == name and r["system"] == "teacher"), None))
        if teacher is not None:
            ax.axhline(teacher, color="gray", ls=":", label="teacher")
        metric = "GLUE score" if name == "GLUE score" else METRIC_LABEL[TASKS[name].metric]
        ax.set_title(name)
        ax.set_xlabel("preserving level (%)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="ElasticLM on GLUE: train what is missing, score the dev sets, write "
                                             "glue.json / glue.md / glue.png.")
    ap.add_argument("--config", required=True, help="recipe YAML (configs/glue.yaml)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory of the result files")
    ap.add_argument("--eval-only", action="store_true", help="score the models already trained; train nothing")
    a = ap.parse_args()
    t0 = time.time()
    cfg = load_config(a.config)
    if a.device:
        cfg.train.device = a.device
    if not a.eval_only:
        train_all(cfg)
    rows, extra = evaluate(cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "glue.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = f"python -m benchmarks.glue --config {a.config}" + (f" --device {a.device}" if a.device else "")
    (a.out / "glue.md").write_text(markdown(rows, extra, cfg, list(cfg.glue.tasks), command, time.time() - t0))
    plot(rows, list(cfg.glue.tasks), a.out / "glue.png")
    print(f"[glue] wrote {a.out / 'glue.json'}, glue.md, glue.png", flush=True)
    for line in targets(rows, list(cfg.glue.tasks)):
        print(line)


if __name__ == "__main__":
    main()
