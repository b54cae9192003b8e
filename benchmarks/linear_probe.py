"""Linear probe of a GLUE task on frozen SubLMs: what each preserving level's features hold before
any fine-tuning, and which heads a level misses.

    python -m benchmarks.linear_probe --model runs/glue/distilled --task STS-B --levels 50 15 10 5 \\
        --add-head 10:2 10:3 --out benchmarks/results/glue_probes/linear_probe.md

Each SubLM encodes ``--train`` training examples and the whole dev set (mean of the unpadded last
hidden states, (N, d)); a scikit-learn linear model fitted on the training features scores the dev
set with the task's metric (elastic/glue.py): RidgeCV for STS-B, LogisticRegressionCV otherwise.
``--add-head LEVEL:LAYER`` probes level LEVEL with one more head in LAYER (1-based), the next
one in expressive-score order, to find the heads a level cannot do without.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elastic.classifier import GlueModel
from elastic.glue import get_task, read_glue, score, task_file
from elastic.structure import SubLM, pool


def features(model: GlueModel, a: list[str], b: list[str] | None, sublm: SubLM, batch_size: int = 64) -> torch.Tensor:
    """(N, d) mean-pooled last hidden states of ``sublm`` for the examples (a, b)."""
    out = []
    enc = model.tokenize(a, b)  # truncated to the task's max length
    for s in range(0, len(a), batch_size):
        tok = model.collate(enc, list(range(s, min(s + batch_size, len(a)))))
        with torch.inference_mode():
            h = model.model.bert(tok["input_ids"], tok["attention_mask"], tok.get("token_type_ids"), sublm=sublm)
        out.append(pool(h, tok["attention_mask"], "mean", normalize=False))  # (B, d)
    return torch.cat(out)


def probe(model: GlueModel, sublm: SubLM, train, dev, n_train: int) -> float:
    """Dev score (0-100, the task's first metric) of a linear model on ``sublm``'s frozen features."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV

    t = model.task
    xb = train.text_b[:n_train] if train.text_b is not None else None
    x_tr = features(model, train.text_a[:n_train], xb, sublm).numpy()
    x_dev = features(model, dev.text_a, dev.text_b, sublm).numpy()
    y_tr = train.labels[:n_train].numpy()
    if t.regression:
        pred = torch.tensor(RidgeCV(alphas=[0.1, 1.0, 10.0, 100.0]).fit(x_tr, y_tr).predict(x_dev))
    else:
        pred = torch.tensor(LogisticRegressionCV(max_iter=2000).fit(x_tr, y_tr).predict(x_dev))
    return next(iter(score(t, pred, dev.labels).values()))


def with_head(sublm: SubLM, layer: int) -> SubLM:
    """``sublm`` with one more head in ``layer`` (0-based)."""
    return SubLM(tuple(h + (i == layer) for i, h in enumerate(sublm.heads)), sublm.neurons)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an elastic model directory (submap.json)")
    ap.add_argument("--task", default="STS-B")
    ap.add_argument("--data-dir", type=Path, default=Path("data/glue"))
    ap.add_argument("--levels", type=int, nargs="+", required=True)
    ap.add_argument("--add-head", nargs="*", default=[], metavar="LEVEL:LAYER",
                    help="also probe LEVEL with one more head in LAYER (1-based)")
    ap.add_argument("--train", type=int, default=3000, help="training examples the linear model is fitted on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="markdown table to write")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    task = get_task(a.task)
    train = read_glue(task_file(a.data_dir, task, "train"), task)
    dev = read_glue(task_file(a.data_dir, task, "dev"), task)
    model = GlueModel(a.model, task)
    rows = []
    for level in a.levels:
        rows.append((f"{level} %", model.sublm(level)))
    for spec in a.add_head:
        level, layer = (int(x) for x in spec.split(":"))
        if not 1 <= layer <= len(model.sublm(level).heads):
            raise ValueError(f"--add-head {spec}: layer {layer} is not in 1..{len(model.sublm(level).heads)}")
        rows.append((f"{level} % + a head in layer {layer}", with_head(model.sublm(level), layer - 1)))
    lines = [f"Linear probe of {task.name} on frozen SubLMs of {a.model} ({a.train} training examples, "
             f"whole dev set; mean-pooled features)", "", "| SubLM | heads per layer | dev score |",
             "| --- | --- | --- |"]
    for name, sub in rows:
        s = probe(model, sub, train, dev, a.train)
        lines.append(f"| {name} | {list(sub.heads)} | {s:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"`python -m benchmarks.linear_probe --model {a.model} --task {a.task} --levels "
              f"{' '.join(map(str, a.levels))}" + (f" --add-head {' '.join(a.add_head)}" if a.add_head else "") +
              f"` ({time.time() - t0:.0f} s)"]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
