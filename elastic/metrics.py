"""Retrieval metrics through ir-measures (pytrec_eval underneath)."""

from __future__ import annotations


def rr_at_10_per_query(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Reciprocal rank at 10 per qid of ``run`` ({qid: {pid: score}}); a qid with qrels but no
    relevant passage in its top 10 scores 0. Qids without qrels are left out."""
    import ir_measures
    from ir_measures import RR

    out = {qid: 0.0 for qid in run if qid in qrels}
    for m in ir_measures.iter_calc([RR @ 10], qrels, run):
        if m.query_id in out:
            out[m.query_id] = float(m.value)
    return out


def mrr_at_10(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    """MRR@10 over every qid in ``qrels`` (a qid missing from ``run`` scores 0)."""
    per = rr_at_10_per_query(qrels, run)
    return sum(per.values()) / len(qrels)


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """MRR@10, nDCG@10, R@20 and R@100 averaged over every qid in ``qrels`` (ir-measures' RR@10,
    nDCG@10, R@20, R@100; a qid missing from ``run`` counts 0). nDCG@10 uses the graded
    relevance of the qrels (TREC Deep Learning: 0-3) as gains; with binary qrels it still ranks
    by position. RR and R count a passage relevant when its relevance is >= 1. ``run`` should
    hold at least 100 passages per query for R@100."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    measures = [RR @ 10, nDCG @ 10, R @ 20, R @ 100]
    names = dict(zip(map(str, measures), ("mrr_at_10", "ndcg_at_10", "r_at_20", "r_at_100")))
    sums = dict.fromkeys(names.values(), 0.0)
    for m in ir_measures.iter_calc(measures, qrels, {q: r for q, r in run.items() if q in qrels}):
        sums[names[str(m.measure)]] += float(m.value)
    return {k: v / len(qrels) for k, v in sums.items()}
