"""Score the GLUE models of one or more recipes on another labeled file of a task, such as
``../shared/data/glue/SST-2.train-heldout.tsv``: a second held-out set, so that a choice between
recipes need not be read off the dev sets that report them.

    python -m benchmarks.glue_heldout --task SST-2 --file ../shared/data/glue/SST-2.train-heldout.tsv \\
        --config configs/glue.yaml configs/glue_probes/level_weights.yaml \\
        --out benchmarks/results/glue_probes/level_weights/sst2_heldout.json

Rows of the file whose first text is among the task's training texts (``glue.data_dir``, before
any subsampling) are dropped first. Every model of each recipe (``benchmarks.glue.systems``) is
scored once per level (a model whose bytes an earlier recipe had, e.g. a shared teacher, is not
scored again) with the task's metrics (``elastic.glue.score``, scikit-learn / scipy). Writes a JSON
object {task, file, n, rows: [{config, system, level, <metric>: 0-100, ...}]} and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.glue import systems
from elastic.classifier import GlueModel
from elastic.glue import get_task, predictions, read_glue, score, task_file
from training.config import load_config
from training.distill import fingerprint


def main() -> None:
    ap = argparse.ArgumentParser(description="Score the GLUE models of recipes on another labeled file of a task.")
    ap.add_argument("--task", required=True, help="GLUE task of the file (SST-2, MRPC, STS-B, RTE)")
    ap.add_argument("--file", type=Path, required=True, help="labeled TSV in the task's training-file layout")
    ap.add_argument("--config", nargs="+", required=True, help="recipe YAMLs whose trained models are scored")
    ap.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    a = ap.parse_args()
    task = get_task(a.task)
    held = read_glue(a.file, task)
    cfgs = [load_config(c) for c in a.config]
    seen = set(read_glue(task_file(cfgs[0].glue.data_dir, task, "train"), task).text_a)
    held = held.subset([i for i, t in enumerate(held.text_a) if t not in seen])
    print(f"[glue_heldout] {a.file}: {len(held)} rows not among {a.task}'s training texts", flush=True)
    rows, done, prints = [], set(), {}
    for path, cfg in zip(a.config, cfgs):
        for system, model_dir, level in systems(cfg, a.task):
            if model_dir not in prints:  # one hash of a model's files, not one per level
                prints[model_dir] = fingerprint(model_dir)
            seen_as = (prints[model_dir], level)
            if seen_as in done:
                continue  # the same model as an earlier recipe's (a shared teacher, a copied static level)
            model = GlueModel(model_dir, task)
            lv = level if level is not None else model.levels[0]
            s = score(task, predictions(task, model.predict_logits(held.text_a, held.text_b, lv, cfg.glue.eval_batch_size)),
                      held.labels)
            rows.append({"config": path, "system": system, "level": level, **{k: round(v, 2) for k, v in s.items()}})
            done.add(seen_as)
            print(f"[glue_heldout] {path} {system} {level}: {s[task.metric]:.2f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"task": a.task, "file": str(a.file), "n": len(held), "rows": rows}, indent=1) + "\n")
    print(f"| config | system | level | {task.metric} |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['system']} | {r['level'] if r['level'] is not None else ''} | {r[task.metric]} |")


if __name__ == "__main__":
    main()
