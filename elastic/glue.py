"""GLUE tasks for ElasticLM (paper §5.1, Table 4): what each file holds, how it is read, how it is scored.

Four tasks have a train set here (data/README.md): SST-2 (single sentence, accuracy), MRPC
(sentence pair, F1 with accuracy beside it), STS-B (sentence pair, regression 0-5, Spearman) and
RTE (sentence pair, accuracy; label 0 = entailment). QNLI has a dev set only, so it cannot be
fine-tuned here and is left out of the GLUE score; QQP and MNLI are not available.

Files are GLUE's tab-separated files with a header, read with ``csv.QUOTE_NONE`` (MRPC strings
hold unbalanced double quotes). Plain or ``.gz``.
"""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: "SST-2", "MRPC", "STS-B" or "RTE".
        text_a / text_b: header names of the first and second sentence (text_b None: single sentence).
        label: header name of the label (a class id string, or STS-B's float score).
        classes: label strings in class-id order; None for a regression task.
        class_names: id2label names written into a model's config.json.
        metric: "accuracy", "f1" or "spearman", the GLUE score's metric (paper §5.1).
        max_length: tokens per example, Table 3 (64 for SST-2, 128 for the others).
    """

    name: str
    text_a: str
    text_b: str | None
    label: str
    classes: tuple[str, ...] | None
    class_names: tuple[str, ...]
    metric: str
    max_length: int

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier: 1 for regression (STS-B), else the number of classes."""
        return 1 if self.classes is None else len(self.classes)

    @property
    def regression(self) -> bool:
        return self.classes is None


TASKS: dict[str, GlueTask] = {
    "SST-2": GlueTask("SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive"), "accuracy", 64),
    "MRPC": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"), "f1", 128),
    "STS-B": GlueTask("STS-B", "sentence1", "sentence2", "score", None, ("score",), "spearman", 128),
    "RTE": GlueTask("RTE", "sentence1", "sentence2", "label", ("0", "1"), ("entailment", "not_entailment"), "accuracy", 128),
}


def get_task(name: str) -> GlueTask:
    """The task called ``name``.

    Raises:
        ValueError: ``name`` is not one of the four tasks (the message lists them, and says why
            QNLI, QQP and MNLI are not among them).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"GLUE task {name!r} is not one of {list(TASKS)} (QNLI has no train set here; "
                         "QQP and MNLI are not available)") from None


@dataclass
class GlueSet:
    """Examples of one task file: ``text_a[i]``, ``text_b[i]`` (None for single-sentence tasks)
    and ``labels[i]`` ((N,) int64 class ids, or float32 scores for STS-B)."""

    task: GlueTask
    text_a: list[str]
    text_b: list[str] | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, idx: list[int]) -> "GlueSet":
        return GlueSet(self.task, [self.text_a[i] for i in idx],
                       None if self.text_b is None else [self.text_b[i] for i in idx], self.labels[idx])


def read_glue(path: str | Path, task: GlueTask) -> GlueSet:
    """Read a GLUE task file, checking every row before anything trains.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file: a column the task needs is missing from the header, a row
            has fewer fields than the header, a label is not one of the task's classes, an STS-B
            score is not a number in [0, 5], or the file has no example.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: GLUE {task.name} file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header line)")
        need = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"{path}: column {missing[0]!r} is missing; {task.name} needs {need}, "
                             f"the header has {header}")
        ia, ib, il = (header.index(c) if c is not None else None for c in (task.text_a, task.text_b, task.label))
        a, b, labels = [], [] if ib is not None else None, []
        for n, row in enumerate(rows, start=2):
            if len(row) < len(header):
                raise ValueError(f"{path}: line {n} has {len(row)} fields, the header has {len(header)}")
            raw = row[il].strip()
            if task.regression:
                try:
                    y = float(raw)
                except ValueError:
                    y = math.nan
                if not 0.0 <= y <= 5.0:
                    raise ValueError(f"{path}: line {n}: {task.label} {raw!r} is not a score in [0, 5]")
            elif raw in task.classes:
                y = task.classes.index(raw)
            else:
                raise ValueError(f"{path}: line {n}: unknown label {raw!r} for {task.name} "
                                 f"(expected one of {list(task.classes)})")
            a.append(row[ia])
            if b is not None:
                b.append(row[ib])
            labels.append(y)
    if not a:
        raise ValueError(f"{path}: no example after the header")
    dtype = torch.float32 if task.regression else torch.int64
    return GlueSet(task, a, b, torch.tensor(labels, dtype=dtype))


def task_file(data_dir: str | Path, task: GlueTask, split: str) -> Path:
    """``data_dir/<task>.<split>.tsv.gz``, or the plain ``.tsv`` when only that exists."""
    gz = Path(data_dir) / f"{task.name}.{split}.tsv.gz"
    plain = gz.with_suffix("")
    return plain if plain.exists() and not gz.exists() else gz


def predictions(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """(N,) predictions from (N, num_labels) logits: the argmax class, or STS-B's score."""
    return logits[:, 0] if task.regression else logits.argmax(-1)


def score(task: GlueTask, pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Dev metrics in 0-100 (GLUE's convention), from scikit-learn and scipy.

    Returns:
        {"accuracy": ...} for SST-2 and RTE; {"f1": ..., "accuracy": ...} for MRPC (F1 of class
        1, "equivalent"); {"spearman": ..., "pearson": ...} for STS-B. ``score[task.metric]`` is
        the task's GLUE figure.
    """
    p, g = pred.detach().cpu().numpy(), gold.detach().cpu().numpy()
    if task.regression:
        from scipy.stats import pearsonr, spearmanr

        return {"spearman": 100 * float(spearmanr(p, g).statistic), "pearson": 100 * float(pearsonr(p, g).statistic)}
    from sklearn.metrics import accuracy_score, f1_score

    out = {"accuracy": 100 * float(accuracy_score(g, p))}
    if task.metric == "f1":
        out = {"f1": 100 * float(f1_score(g, p, pos_label=1)), **out}
    return out
