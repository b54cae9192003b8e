"""Offline reranking: first-stage candidates reranked by the dense teacher and the ranker's
cross-encoder teacher (paper §4.4, §5.2 Table 6), on any queries, qrels and candidate run.

    python -m benchmarks.rerank --config configs/demo.yaml [--queries F] [--qrels F]
        [--candidates RUN] [--collection F] [--depth 20] [--out DIR]

Defaults: the recipe's dev queries and qrels, the packed BM25 top-20 (``data.candidates``) and
collection. First stages: "bm25" (the given run, in its own order) and, when the recipe's
ElasticDenser exists (run_dir/elastic), "dense": its largest SubLM's top ``depth`` in the
collection (run_dir/index, the index it serves). Systems reranking each first stage's top
``depth``: "dense-teacher" (the bi-encoder teacher's dot products), "ranker-teacher" (the
cross-encoder of training/ranker_teacher.py, or ``ranker.teacher``), and, once training/ranker.py
has run, "elastic" (ElasticRanker, one row per SubLM) and "static" (each level trained alone).
``--denser-run`` takes the dense first stage from another run's ElasticDenser.

Columns (rerank.json: a list of rows with exactly ROW_KEYS): MRR@10; nDCG@10 (ir-measures, null
unless the qrels are graded); GFLOPs per pair (a cross-encoder's forward over a pair of the mean
tokenized length of the reranked pairs; null for BM25 and the bi-encoder, whose passages are
encoded offline); latency per query: the median wall time of scoring one query's ``depth``
pairs in one batch with one thread (the bi-encoder: encoding the query).

Also the pseudo-label check that training/ranker_teacher.py asks for: on these queries, how often
the reciprocal rank fusion of BM25 and the dense teacher (the ranker teacher's training signal)
puts a judged passage first (P@1), with its MRR@10, beside each retriever alone
(rerank_labels.json). Writes rerank.json, rerank.md, rerank_labels.json and rerank.png into DIR
(default run_dir/eval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.evaluate import EvalData, passage_embeddings
from elastic.data import read_run
from elastic.encoder import ElasticEncoder
from elastic.metrics import retrieval_metrics
from elastic.ranker import CrossEncoder, reciprocal_rank_fusion
from elastic.structure import gflops
from training.config import RecipeConfig, load_config, teacher_path
from training.negatives import bm25_index, bm25_search

ROW_KEYS = ("system", "first_stage", "depth", "level", "denser_level", "mrr_at_10", "ndcg_at_10", "gflops_per_pair",
            "latency_ms_per_query")
SYSTEMS = ("bm25", "dense-teacher", "ranker-teacher", "elastic", "static", "pipeline")


def graded(qrels: dict[str, dict[str, int]]) -> bool:
    """Whether the qrels grade relevance (some judgement above 1, TREC Deep Learning style)."""
    return any(r > 1 for per in qrels.values() for r in per.values())


def quality(qrels: dict[str, dict[str, int]], ranked: dict[str, list[str]]) -> dict:
    """MRR@10 and nDCG@10 (None for binary qrels) of ranked lists {qid: [pid, ...]} (best first),
    over every qid of ``qrels``."""
    run = {q: {pid: float(len(pids) - i) for i, pid in enumerate(pids)} for q, pids in ranked.items()}
    m = retrieval_metrics(qrels, run)
    return {"mrr_at_10": round(m["mrr_at_10"], 4), "ndcg_at_10": round(m["ndcg_at_10"], 4) if graded(qrels) else None}


def row(system: str, first_stage: str, depth: int, level, denser_level, q: dict, gflops_per_pair, latency) -> dict:
    r = {"system": system, "first_stage": first_stage, "depth": depth, "level": level, "denser_level": denser_level,
         **q, "gflops_per_pair": gflops_per_pair, "latency_ms_per_query": latency}
    assert tuple(r) == ROW_KEYS and system in SYSTEMS
    return r


def reorder(cands: dict[str, list[str]], scores: dict[str, list[float]]) -> dict[str, list[str]]:
    """Each query's candidates sorted by their scores, best first (stable)."""
    return {q: [p for _, p in sorted(zip(scores[q], pids), key=lambda t: -t[0])] for q, pids in cands.items()}


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block (as a TorchServe worker runs), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of ``fn()`` over ``repeats`` calls after one warm-up, on one thread."""
    with one_thread():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def rerank_cross(model: CrossEncoder, level: int, queries: dict[str, str], texts: dict[str, str],
                 cands: dict[str, list[str]], batch_size: int) -> dict[str, list[float]]:
    """Cross-encoder scores of every (query, candidate) pair, per query in candidate order."""
    qids = list(cands)
    qs = [queries[q] for q in qids for _ in cands[q]]
    ps = [texts[p] for q in qids for p in cands[q]]
    flat = model.score(qs, ps, level, batch_size).tolist()
    out, i = {}, 0
    for q in qids:
        out[q] = flat[i:i + len(cands[q])]
        i += len(cands[q])
    return out


def pair_tokens(model: CrossEncoder, queries: dict[str, str], texts: dict[str, str], cands: dict[str, list[str]]) -> int:
    """Mean tokenized length of the reranked pairs (what GFLOPs per pair is computed at)."""
    qs = [queries[q] for q in cands for _ in cands[q]]
    ps = [texts[p] for q in cands for p in cands[q]]
    ids = model.tokenizer(qs, ps, truncation=model.TRUNCATION, max_length=model.task.max_length)["input_ids"]
    return round(sum(map(len, ids)) / len(ids))


def cross_rows(cfg: RecipeConfig, model: CrossEncoder, system: str, first_stage: str, depth: int, denser_level,
               queries, texts, cands, qrels, device: torch.device = torch.device("cpu")) -> list[dict]:
    """One row per level of a cross-encoder reranking ``cands``: quality scored on ``device``,
    latency always on the CPU (one thread), where the served model runs."""
    tokens = pair_tokens(model, queries, texts, cands)
    sample_q = next(iter(cands))
    model.model.to(device)
    scored = {level: rerank_cross(model, level, queries, texts, cands, cfg.ranker.eval_batch_size)
              for level in model.levels}
    model.model.to("cpu")
    rows = []
    for level, scores in scored.items():
        q = quality(qrels, reorder(cands, scores))
        lat = median_ms(lambda: model.score([queries[sample_q]] * len(cands[sample_q]),
                                            [texts[p] for p in cands[sample_q]], level, depth), 10)
        rows.append(row(system, first_stage, depth, None if system == "ranker-teacher" else level, denser_level, q,
                        round(gflops(model.dims, model.sublm(level), tokens), 4), lat))
    return rows


def pseudo_label_check(cfg: RecipeConfig, queries: dict[str, str], qrels, pids: list[str], ptexts: list[str],
                       P: torch.Tensor, Q: torch.Tensor) -> dict:
    """P@1 and MRR@10 of BM25, the dense teacher and their RRF fusion (ranker.depth each,
    ranker.rrf_k) over the collection, for the judged queries."""
    r = cfg.ranker
    qids = list(queries)
    depth = min(r.depth, len(pids))
    bm25_rows, _ = bm25_search(bm25_index(ptexts), [queries[q] for q in qids], depth)
    dense = (Q @ P.T).topk(depth, dim=1).indices.tolist()
    fused = reciprocal_rank_fusion([bm25_rows.tolist(), dense], r.rrf_k)
    out = {"queries": sum(q in qrels for q in qids), "depth": depth, "rrf_k": r.rrf_k}
    for name, lists in (("bm25", bm25_rows.tolist()), ("dense-teacher", dense), ("rrf", fused)):
        ranked = {q: [pids[j] for j in rows] for q, rows in zip(qids, lists)}
        p1 = sum(bool(qrels.get(q, {}).get(ranked[q][0], 0) > 0) for q in qids if q in qrels) / out["queries"]
        out[name] = {"p_at_1": round(p1, 4), "mrr_at_10": quality(qrels, ranked)["mrr_at_10"]}
    return out


def rankers(cfg: RecipeConfig) -> list[tuple[str, CrossEncoder]]:
    """(system, model) of every cross-encoder the recipe has produced: the teacher, then
    ElasticRanker (run_dir/ranker/elastic) and each static baseline (run_dir/ranker/static/<p>/model,
    largest first) when trained (training/ranker.py)."""
    ranker_dir = cfg.ranker_teacher_dir()
    if not (ranker_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{ranker_dir}: no ranker teacher; run python -m training.ranker_teacher first")
    out = [("ranker-teacher", CrossEncoder(ranker_dir, cfg.ranker.max_length))]
    root = cfg.run / "ranker"
    if (root / "elastic" / "model.safetensors").exists():
        out.append(("elastic", CrossEncoder(root / "elastic", cfg.ranker.max_length)))
    statics = [d for d in (root / "static").glob("*/model") if (d / "model.safetensors").exists()]
    for d in sorted(statics, key=lambda d: -int(d.parent.name)):
        out.append(("static", CrossEncoder(d, cfg.ranker.max_length)))
    return out


def denser_source(cfg: RecipeConfig, denser_run: Path | None = None) -> Path | None:
    """The run directory whose ElasticDenser gives the "dense" first stage: ``denser_run`` when
    given, else run_dir; None when run_dir has no ElasticDenser (then BM25 is the only first stage).

    Raises:
        FileNotFoundError: ``denser_run`` was given and lacks elastic/model.safetensors or
            index/index.faiss (a named run that cannot serve is an error, not a silent BM25-only run).
    """
    run = denser_run or cfg.run
    missing = [f for f in ("elastic/model.safetensors", "index/index.faiss") if not (run / f).exists()]
    if not missing:
        return run
    if denser_run is not None:
        raise FileNotFoundError(f"--denser-run {denser_run}: no {missing[0]} (train ElasticDenser and build its index "
                                f"there, e.g. bash scripts/full.sh for runs/full)")
    return None


def dense_first_stage(cfg: RecipeConfig, data: EvalData, denser_run: Path,
                      depth: int) -> tuple[dict[str, list[str]], int]:
    """({qid: [pid, ...]} best first, level): the largest SubLM of ``denser_run``'s ElasticDenser
    searched in its served index (run_dir/index, as the handler searches it), top ``depth``,
    passages outside the collection dropped."""
    import faiss  # the served index (training/build_index.py)

    index_dir = denser_run / "index"
    denser = ElasticEncoder(denser_run / "elastic")
    level = denser.levels[0]
    Qd = denser.encode(list(data.qtexts), level, cfg.encode.query_max_length, 128, query=True)  # (Q, d)
    served = faiss.read_index(str(index_dir / "index.faiss"))
    served_pids = (index_dir / "pids.txt").read_text().split()
    _, idx = served.search(Qd.numpy(), min(depth, len(served_pids)))
    collection = set(data.pids)
    return {q: [served_pids[j] for j in idx[i] if served_pids[j] in collection] for i, q in enumerate(data.qids)}, level


def write_trec_run(ranked: dict[str, list[str]], path: Path, tag: str) -> None:
    """``ranked`` ({qid: [pid, ...]} best first) as a TREC run (``qid Q0 pid rank score tag``;
    score = depth - rank + 1, so that elastic.data.read_run keeps the order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for q, pids in ranked.items():
            for r, p in enumerate(pids, 1):
                f.write(f"{q} Q0 {p} {r} {len(pids) - r + 1} {tag}\n")


def evaluate(cfg: RecipeConfig, data: EvalData, first: dict[str, list[str]], depth: int,
             denser_run: Path | None = None, dense_first: tuple[dict[str, list[str]], int] | None = None,
             device: torch.device = torch.device("cpu")) -> tuple[list[dict], dict]:
    """(rerank rows, pseudo-label check).

    ``denser_run``: the run directory whose ElasticDenser (elastic/, index/) gives the "dense"
    first stage, as ``denser_source`` resolved it; ``dense_first``: that first stage given instead,
    as ({qid: [pid, ...]}, the ElasticDenser level that made it), e.g. a run file that
    ``--save-dense-run`` wrote on another machine; neither: BM25 only. ``device``: where the
    cross-encoders score for quality (latency is timed on the CPU).

    Raises:
        FileNotFoundError: the ranker's teacher has not been trained (run training.ranker_teacher).
        ValueError: a candidate that the collection lacks, or no candidate query among the queries.
    """
    queries, collection, qrels = dict(zip(data.qids, data.qtexts)), dict(zip(data.pids, data.ptexts)), data.qrels
    cands = {q: pids[:depth] for q, pids in first.items() if q in queries}
    if not cands:
        raise ValueError("rerank: no query of the candidate run is among the queries")
    missing = [p for pids in cands.values() for p in pids if p not in collection]
    if missing:
        raise ValueError(f"rerank: candidate passage {missing[0]!r} is not in the collection "
                         f"({len(missing)} missing)")
    systems = rankers(cfg)
    qids, pids = data.qids, data.pids
    dense = ElasticEncoder(teacher_path(cfg))
    P = passage_embeddings(cfg, data, dense, 100)  # (N, d), cached
    Q = data.teacher_query_embeddings(cfg, dense)  # (Q, d)
    row_of = {p: i for i, p in enumerate(pids)}
    qi = {q: i for i, q in enumerate(qids)}
    stages, dense_level = {"bm25": cands}, None
    if denser_run is not None:
        dense_first = dense_first_stage(cfg, data, denser_run, depth)
    if dense_first is not None:
        ranked, dense_level = dense_first
        stages["dense"] = {q: [p for p in ranked.get(q, []) if p in collection][:depth] for q in qids}
    rows = [row("bm25", "bm25", depth, None, None, quality(qrels, cands), None, None)]
    dense_ms = median_ms(lambda: dense.encode([queries[qids[0]]], 100, cfg.encode.query_max_length, 1), 20)
    for stage, c in stages.items():
        denser_level = dense_level if stage == "dense" else None
        scores = {q: [float(Q[qi[q]] @ P[row_of[p]]) for p in pids_] for q, pids_ in c.items()}
        rows.append(row("dense-teacher", stage, depth, None, denser_level, quality(qrels, reorder(c, scores)), None,
                        dense_ms))
        for system, model in systems:
            rows += cross_rows(cfg, model, system, stage, depth, denser_level, queries, collection, c, qrels, device)
    return rows, pseudo_label_check(cfg, queries, qrels, pids, data.ptexts, P, Q)


def to_markdown(rows: list[dict], labels: dict, how: str) -> str:
    cols = list(ROW_KEYS)
    lines = ["# Reranking", "", how, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    lines += ["", f"## Pseudo-label check (the ranker teacher's training signal, on these {labels['queries']} judged "
              f"queries): each retriever's top {labels['depth']} in the collection and their RRF (k = "
              f"{labels['rrf_k']:g})", "", "| ranking | P@1 | MRR@10 |", "| --- | --- | --- |"]
    for name in ("bm25", "dense-teacher", "rrf"):
        lines.append(f"| {name} | {labels[name]['p_at_1']} | {labels[name]['mrr_at_10']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """MRR@10 against GFLOPs per pair for the cross-encoder rows, one panel per first stage, the
    first stage and the dense teacher as horizontal lines (the paper's Fig. 8 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["first_stage"] for r in rows})
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rs = [r for r in rows if r["first_stage"] == stage]
        for system, marker in (("ranker-teacher", "*"), ("elastic", "o"), ("static", "s")):
            pts = sorted((r["gflops_per_pair"], r["mrr_at_10"]) for r in rs if r["system"] == system)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=system)
        for system, color in (("bm25", "gray"), ("dense-teacher", "k")):
            for r in rs:
                if r["system"] == system:
                    ax.axhline(r["mrr_at_10"], color=color, ls="--", lw=1, label=f"{system} (rerank)"
                               if system == "dense-teacher" else "bm25 order")
        ax.set_title(f"reranking the {stage} top {rs[0]['depth']}")
        ax.set_xlabel("GFLOPs per pair")
        ax.set_ylabel("MRR@10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: RecipeConfig, queries: str | None, qrels: str | None, candidates: str | None, collection: str | None,
        depth: int | None, out: Path | None, denser_run: Path | None = None, dense_candidates: str | None = None,
        denser_level: int | None = None, device: str = "cpu") -> list[dict]:
    t0 = time.time()
    if dense_candidates is not None and denser_run is not None:
        raise ValueError("--dense-candidates and --denser-run: give one dense first stage, not both")
    if (dense_candidates is None) != (denser_level is None):
        raise ValueError("--dense-candidates and --denser-level go together (the run file and the level that made it)")
    dense_first = (read_run(dense_candidates), denser_level) if dense_candidates is not None else None
    source = None if dense_first else denser_source(cfg, denser_run)  # fails before anything loads
    qfile, rfile = queries or cfg.data.dev_queries, qrels or cfg.data.qrels
    cfile, colfile = candidates or cfg.data.candidates, collection or cfg.data.collection
    data, first = EvalData.load(cfg, qfile, rfile, colfile), read_run(cfile)
    depth = depth or cfg.ranker.eval_depth
    rows, labels = evaluate(cfg, data, first, depth, source, dense_first, torch.device(device))
    out = out or cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    how = (f"`python -m benchmarks.rerank` on {qfile} ({len(data.qrels)} judged queries), candidates {cfile}, "
           f"collection {colfile} ({len(data.pids):,} passages); each first stage's top {depth} reranked; latency: "
           f"median of 10, one query's {depth} pairs in one batch, 1 thread; {time.time() - t0:.0f} s in all. First "
           f"stages: BM25 (the run above)"
           + (f" and ElasticDenser's largest SubLM from {source} (its served index)." if source else
              f" and ElasticDenser at {denser_level} % from the run {dense_candidates}." if dense_first else
              f"; no ElasticDenser in {cfg.run}, so no dense first stage (--denser-run names one).")
           + (f" Quality scored on {device}." if device != "cpu" else ""))
    (out / "rerank.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "rerank_labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    md = to_markdown(rows, labels, how)
    (out / "rerank.md").write_text(md)
    plot(rows, out / "rerank.png")
    print(f"[rerank] wrote {out}/rerank.{{json,md,png}}:\n{md}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Rerank first-stage candidates: dense teacher and cross-encoder teacher.")
    ap.add_argument("--config", help="recipe YAML (default: built-in defaults)")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--qrels", help="TREC qrels (default: data.qrels)")
    ap.add_argument("--candidates", help="first-stage run, TREC format or qid pid rank (default: data.candidates)")
    ap.add_argument("--collection", help="pid<TAB>passage file (default: data.collection)")
    ap.add_argument("--depth", type=int, help="candidates reranked per query (default: ranker.eval_depth)")
    ap.add_argument("--out", type=Path, help="output directory (default: run_dir/eval)")
    ap.add_argument("--denser-run", type=Path, help="run directory of the ElasticDenser (elastic/, index/) whose "
                    "largest SubLM's top candidates are the 'dense' first stage (default: run_dir)")
    ap.add_argument("--dense-candidates", help="the dense first stage as a run file instead of --denser-run (one that "
                    "--save-dense-run wrote, e.g. for a machine without the ElasticDenser); needs --denser-level")
    ap.add_argument("--denser-level", type=int, help="the ElasticDenser level (percent) that made --dense-candidates")
    ap.add_argument("--save-dense-run", type=Path, help="only write the dense first stage of --denser-run (its largest "
                    "SubLM's top --depth on --queries) to this TREC run file, and stop")
    ap.add_argument("--device", default="cpu", help="where the cross-encoders score for quality: cpu or cuda "
                    "(latency is always timed on the CPU, one thread)")
    a = ap.parse_args()
    if a.depth is not None and a.depth < 1:
        raise SystemExit("--depth: must be >= 1")
    cfg = load_config(a.config)
    if a.save_dense_run is not None:
        source = denser_source(cfg, a.denser_run)
        if source is None:
            raise SystemExit(f"--save-dense-run: no ElasticDenser in {cfg.run} (--denser-run names one)")
        data = EvalData.load(cfg, a.queries or cfg.data.dev_queries, a.qrels or cfg.data.qrels,
                             a.collection or cfg.data.collection)
        ranked, level = dense_first_stage(cfg, data, source, a.depth or cfg.ranker.eval_depth)
        write_trec_run(ranked, a.save_dense_run, f"elasticdenser-{level}")
        print(f"[rerank] wrote {a.save_dense_run}: ElasticDenser {level} % top {a.depth or cfg.ranker.eval_depth} "
              f"from {source}", flush=True)
        return
    run(cfg, a.queries, a.qrels, a.candidates, a.collection, a.depth, a.out, a.denser_run, a.dense_candidates,
        a.denser_level, a.device)


if __name__ == "__main__":
    main()
