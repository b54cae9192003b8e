"""BM25 retrieval with bm25s: the BM25 baseline and the hard negatives of fine-tuning (eq. 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def bm25_index(passages: list[str]):
    """A bm25s index (bm25s defaults: Lucene variant, k1 = 1.5, b = 0.75; English stopwords, no
    stemming) over ``passages``."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def bm25_search(retriever, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) passage rows and (Q, k) scores, best first, from a :func:`bm25_index`."""
    import bm25s

    docs, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                      k=min(k, retriever.scores["num_docs"]), show_progress=False)
    return np.asarray(docs), np.asarray(scores)


def hard_negative_pools(passages: list[str], queries: list[str], positives: list[int], depth: int,
                        cache: Path | None = None) -> list[list[int]]:
    """Per training query, its BM25 top-``depth`` passage rows without its pseudo-positive.

    Cached in ``cache`` (a .pt file) keyed by the sizes and the depth.

    Raises:
        ValueError: a query whose pool is empty (the collection is smaller than 2 passages).
    """
    key = (len(passages), len(queries), depth, sum(positives))
    if cache is not None and cache.exists():
        obj = torch.load(cache)
        if obj["key"] == key:
            return obj["pools"]
    rows, _ = bm25_search(bm25_index(passages), queries, depth)
    pools = [[int(r) for r in row if r != pos] for row, pos in zip(rows, positives)]
    if any(not p for p in pools):
        raise ValueError("hard negatives: a training query has no BM25 negative (collection too small)")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "pools": pools}, cache)
    return pools
