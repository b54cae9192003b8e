"""The teacher's side of the recipe, computed once per run and cached under run_dir/teacher/:
its passage embeddings of the collection (teacher baseline, index of passage side "teacher", distillation targets),
its embeddings of the unlabeled training queries (targets of query-side distillation) and their
pseudo-labels. The training queries are every file of ``data.train_queries``, deduplicated; an
evaluation query (``data.dev_queries``) among them fails here, before any training. Query-side
distillation may add ``query_distill.pseudo_queries`` spans of WikiText (training/pseudo_queries.py),
encoded and cached apart (pseudo_queries.pt); pruning and the ranker's teacher take the real ones only.

Pseudo-label: the teacher's top-1 passage in the collection for each training query. The
training queries have no qrels; the teacher's own choice is what a student distilled from it
should reproduce, and it is what the teacher's contrastive objective ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elastic.data import normalize_query, read_queries, read_query_files, read_tsv, read_wikitext
from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, teacher_path
from training.pseudo_queries import cut_pseudo_queries


@dataclass
class TeacherSide:
    pids: list[str]  # collection order
    texts: list[str]  # passage texts, aligned with ``pids``
    passages: torch.Tensor  # (N, d) teacher passage embeddings
    train_queries: list[str]  # query texts
    positives: list[int]  # row in ``pids`` of each training query's teacher top-1 passage
    queries: torch.Tensor  # (Q, d) teacher embeddings of ``train_queries``


def teacher_side(cfg: RecipeConfig, teacher: ElasticEncoder | None = None, pseudo: bool = False) -> TeacherSide:
    """Load the caches, or encode the collection and the training queries with the teacher.

    Passages and queries are cached apart (run_dir/teacher/passages.pt, queries.pt), each under
    a key of its inputs, so that a new query file does not re-encode the collection. With
    ``pseudo`` and ``query_distill.pseudo_queries`` > 0, that many pseudo-queries follow the real
    ones in ``train_queries`` (and ``queries``, ``positives``), cached in pseudo_queries.pt.

    Raises:
        FileNotFoundError / ValueError: a missing, empty or malformed data file (named), or an
            evaluation query among the training queries.
    """
    collection = read_tsv(cfg.data.collection)
    qtexts = read_query_files(cfg.data.train_queries, held_out=cfg.data.dev_queries)
    root = cfg.run / "teacher"
    tkey = str(teacher_path(cfg).resolve())
    pkey = [str(Path(cfg.data.collection).resolve()), tkey, len(collection), cfg.encode.passage_max_length]
    qkey = [[str(Path(f).resolve()) for f in cfg.data.train_queries], tkey, len(qtexts), cfg.encode.query_max_length]

    def cached(name: str, key: list, compute):
        f = root / name
        if f.exists():
            obj = torch.load(f)
            if obj["key"] == key:
                return obj["value"]
        value = compute()
        root.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "value": value}, f.with_suffix(".tmp"))
        f.with_suffix(".tmp").replace(f)
        return value

    def enc() -> ElasticEncoder:
        nonlocal teacher
        teacher = teacher or ElasticEncoder(teacher_path(cfg))
        return teacher

    P = cached("passages.pt", pkey, lambda: enc().encode(list(collection.values()), 100, cfg.encode.passage_max_length,
                                                         cfg.encode.batch_size, progress=True))
    Q = cached("queries.pt", qkey, lambda: enc().encode(qtexts, 100, cfg.encode.query_max_length, 256, progress=True))
    qd = cfg.query_distill
    if pseudo and qd.pseudo_queries > 0:
        held = {normalize_query(q) for q in read_queries(cfg.data.dev_queries)} if cfg.data.dev_queries else set()
        cut = (qd.pseudo_queries, qd.pseudo_query_min_words, qd.pseudo_query_max_words, qd.seed)
        paragraphs = [p for f in cfg.distill.text for p in read_wikitext(f)]
        ptexts = cut_pseudo_queries(paragraphs, *cut, exclude=held | {normalize_query(q) for q in qtexts})
        xkey = [[str(Path(f).resolve()) for f in cfg.distill.text], list(cut), qkey]
        X = cached("pseudo_queries.pt", xkey,
                   lambda: enc().encode(ptexts, 100, cfg.encode.query_max_length, 256, progress=True))
        qtexts, Q = qtexts + ptexts, torch.cat([Q, X])
    positives = torch.cat([(q @ P.T).argmax(1) for q in Q.split(4096)]).tolist()
    return TeacherSide(list(collection), list(collection.values()), P, qtexts, positives, Q)
