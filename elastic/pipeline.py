"""The elastic two-stage pipeline's configurations: query -> ElasticDenser top-K -> ElasticRanker
-> top-10 (paper §4.4 serves the two models apart; here one schedule chooses both stages).

A configuration is (denser level, ranker level, rerank depth K); K = 0 is dense retrieval alone
(no ranker level). Its offline quality (MRR@10 on judged queries) is measured when the pipeline
is built (benchmarks/pipeline_quality.py) and packed as ``pipeline.json``; its processing time
t is calibrated at load like any SubLM's. The schedule (elastic/schedule.py) steps down an
ordered list of "levels" from the best to the cheapest, so the server orders configurations as
such a list: it keeps the Pareto frontier of (quality, calibrated time), where quality rises
with time, and numbers it 1 (cheapest) .. N (best). A configuration that another one beats in
quality at no more time would never be worth choosing.

The pure parts live here (table validation, the frontier, merging reranked candidates), tested
without a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class PipelineConfig:
    """One configuration of the pipeline.

    Attributes:
        denser_level: ElasticDenser's preserving level (percent) that encodes the query.
        ranker_level: ElasticRanker's level (percent) that rescores the top ``depth``, or None
            when ``depth`` is 0.
        depth: K, candidates reranked (0 = dense retrieval alone).
        mrr_at_10: offline quality measured at build time.
    """

    denser_level: int
    ranker_level: int | None
    depth: int
    mrr_at_10: float

    def describe(self) -> dict:
        return {"denser_level": self.denser_level, "ranker_level": self.ranker_level, "depth": self.depth}


def load_quality_table(path: str | Path, denser_levels: Sequence[int], ranker_levels: Sequence[int],
                       top_k: int) -> list[PipelineConfig]:
    """The configurations of ``pipeline.json`` ({"configs": [{denser_level, ranker_level, depth,
    mrr_at_10}, ...]}), checked against the packed models.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and the entry: a missing field, a level the model lacks, a
            ranker level given with depth 0 (or missing with depth > 0), a negative depth, a
            quality outside [0, 1], a repeated configuration, or no configuration at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (measure it with python -m benchmarks.pipeline_quality)")
    try:
        rows = json.loads(path.read_text())["configs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected a JSON object with a 'configs' list ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: 'configs' must be a non-empty list")
    out, seen = [], set()
    for i, r in enumerate(rows):
        where = f"{path}: configs[{i}]"
        if not isinstance(r, dict) or not {"denser_level", "ranker_level", "depth", "mrr_at_10"} <= set(r):
            raise ValueError(f"{where}: needs denser_level, ranker_level, depth and mrr_at_10")
        d, k, q = r["denser_level"], r["depth"], r["mrr_at_10"]
        rl = r["ranker_level"]
        if d not in denser_levels:
            raise ValueError(f"{where}: denser_level {d!r} is not a level of the denser {list(denser_levels)}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"{where}: depth must be an integer >= 0, got {k!r}")
        if k == 0 and rl is not None:
            raise ValueError(f"{where}: depth 0 (dense only) takes no ranker_level, got {rl!r}")
        if k > 0 and rl not in ranker_levels:
            raise ValueError(f"{where}: ranker_level {rl!r} is not a level of the ranker {list(ranker_levels)}")
        if not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise ValueError(f"{where}: mrr_at_10 must be in [0, 1], got {q!r}")
        cfg = PipelineConfig(int(d), None if k == 0 else int(rl), k, float(q))
        if (cfg.denser_level, cfg.ranker_level, cfg.depth) in seen:
            raise ValueError(f"{where}: repeats configuration {cfg.describe()}")
        seen.add((cfg.denser_level, cfg.ranker_level, cfg.depth))
        out.append(cfg)
    return out


def frontier(configs: Sequence[PipelineConfig], cost_ms: Sequence[float]) -> list[int]:
    """Indices of the configurations on the quality-time Pareto frontier, cheapest first.

    A configuration stays unless another is at least as good and at most as slow, and strictly
    better in one of the two (ties in both: the first listed stays). Along the result, time and
    quality both rise strictly.

    Args:
        configs: the candidates; cost_ms: their calibrated processing time (same order, e.g.
            t at batch size 1).
    """
    if len(configs) != len(cost_ms):
        raise ValueError(f"frontier: {len(configs)} configurations but {len(cost_ms)} costs")
    order = sorted(range(len(configs)), key=lambda i: (cost_ms[i], -configs[i].mrr_at_10, i))
    kept, best = [], float("-inf")
    for i in order:
        if configs[i].mrr_at_10 > best:
            kept.append(i)
            best = configs[i].mrr_at_10
    return kept


def merge_reranked(dense_ids: Sequence[int], rerank_scores: Sequence[float], top_k: int) -> list[int]:
    """The final top ``top_k``: the first len(rerank_scores) dense candidates in the ranker's order
    (best first, stable), then the rest in dense order.

    Args:
        dense_ids: candidate ids, dense order (best first); rerank_scores: ranker scores of the
            first K of them (K <= len(dense_ids)).
    """
    K = len(rerank_scores)
    if K > len(dense_ids):
        raise ValueError(f"merge_reranked: {K} scores for {len(dense_ids)} candidates")
    head = [dense_ids[i] for i in sorted(range(K), key=lambda i: -rerank_scores[i])]
    return (head + list(dense_ids[K:]))[:top_k]
