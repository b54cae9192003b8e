"""Pseudo-queries cut from unlabeled text, added to the label-free training queries of query-side
distillation (issue "retention in the small SubLMs", item 2: all the query text there is).

A pseudo-query is a span of ``min_words``..``max_words`` consecutive words (length uniform) at a
uniform position of a uniformly drawn paragraph. Words are whitespace tokens holding a letter or a
digit: punctuation tokens and WikiText's ``<unk>`` are dropped first, since queries have little
punctuation and no unknown-word marker. A pseudo-query's only targets are the teacher's own
embedding and ranking, as for the real questions. The source is ``distill.text`` (WikiText-2), never the
passage collection: the evaluation's judged passages are in the collection, and spans of them
would train the query encoder on the evaluation's answers.
"""

from __future__ import annotations

import random

from elastic.data import normalize_query


def cut_pseudo_queries(paragraphs: list[str], n: int, min_words: int, max_words: int, seed: int,
                       exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct spans of ``paragraphs`` (seeded; the same inputs give the same list).

    Args:
        paragraphs: source texts; one of fewer than ``min_words`` words (module docstring) is never drawn.
        n: pseudo-queries wanted.
        min_words, max_words: span length in whitespace words, both included (1 <= min <= max).
        exclude: normalized texts (``elastic.data.normalize_query``) a span must not equal: the
            real training queries and the evaluation queries.

    Raises:
        ValueError: bad lengths, no paragraph long enough, or fewer than ``n`` distinct spans
            found in 20·n draws.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"cut_pseudo_queries: need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    words = [[t for t in p.split() if t != "<unk>" and any(c.isalnum() for c in t)] for p in paragraphs]
    words = [w for w in words if len(w) >= min_words]
    if n > 0 and not words:
        raise ValueError(f"cut_pseudo_queries: no paragraph of at least {min_words} words")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    for _ in range(20 * n):
        if len(out) == n:
            break
        w = rng.choice(words)
        k = rng.randint(min_words, min(max_words, len(w)))
        start = rng.randint(0, len(w) - k)
        text = " ".join(w[start:start + k])
        key = normalize_query(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    if len(out) < n:
        raise ValueError(f"cut_pseudo_queries: found {len(out)} distinct spans of {n} wanted")
    return out
