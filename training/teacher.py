"""The teacher's side of the recipe, computed once per run and cached under run_dir/teacher/:
its passage embeddings of the collection (teacher baseline, index of passage side "teacher", distillation targets) and the
pseudo-labels of the unlabeled training queries.

Pseudo-label: the teacher's top-1 passage in the collection for each training query. The
training queries have no qrels; the teacher's own choice is what a student distilled from it
should reproduce, and it is what the teacher's contrastive objective ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.data import read_tsv
from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, teacher_path


@dataclass
class TeacherSide:
    pids: list[str]  # collection order
    texts: list[str]  # passage texts, aligned with ``pids``
    passages: torch.Tensor  # (N, d) teacher passage embeddings
    train_queries: list[str]  # query texts
    positives: list[int]  # row in ``pids`` of each training query's teacher top-1 passage


def teacher_side(cfg: RecipeConfig, teacher: ElasticEncoder | None = None) -> TeacherSide:
    """Load the cache, or encode the collection and training queries with the teacher."""
    cache = cfg.run / "teacher" / "teacher_side.pt"
    collection = read_tsv(cfg.data.collection)
    queries = read_tsv(cfg.data.train_queries)
    key = (str(Path(cfg.data.collection).resolve()), str(teacher_path(cfg).resolve()), len(collection), len(queries))
    if cache.exists():
        obj = torch.load(cache)
        if obj["key"] == key:
            return TeacherSide(obj["pids"], list(collection.values()), obj["passages"], obj["train_queries"],
                               obj["positives"])
    teacher = teacher or ElasticEncoder(teacher_path(cfg))
    pids = list(collection)
    P = teacher.encode(list(collection.values()), 100, cfg.encode.passage_max_length, cfg.encode.batch_size, progress=True)
    qtexts = list(queries.values())
    Q = teacher.encode(qtexts, 100, cfg.encode.query_max_length, 256)
    positives = (Q @ P.T).argmax(1).tolist()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "pids": pids, "passages": P, "train_queries": qtexts, "positives": positives}, cache)
    return TeacherSide(pids, list(collection.values()), P, qtexts, positives)
