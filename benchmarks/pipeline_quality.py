"""The two-stage pipeline's quality table: MRR@10 of every configuration (ElasticDenser level,
ElasticRanker level, rerank depth K; K = 0: dense only) on judged queries, measured when the
pipeline is built (elastic/pipeline.py; archive.build_mar --pipeline packs it).

    python -m benchmarks.pipeline_quality --config configs/ranker.yaml --denser-run runs/full
        [--queries F --qrels F --collection F] [--depths 5 10 20] [--ranker-levels 50 20 10 5]

For each denser level: its query embeddings, the exact top max(K, 10) of the served index
(denser_run/index, as the handler searches it); for each ranker level and K: the top K
rescored by ElasticRanker's SubLM and merged with the dense tail (``merge_reranked``). A pair's
score does not depend on K or on the denser level that retrieved it, so each (query, passage,
ranker level) is scored once. Cost per query in GFLOPs: the denser level's query encoding plus K
pairs at the ranker level (``elastic.structure.gflops`` at the mean tokenized lengths).

Writes DIR/pipeline_quality.json (every configuration: quality, GFLOPs, on the GFLOPs frontier
or not), DIR/pipeline.json (the frontier's configurations: what the server calibrates at load
and chooses among) and DIR/pipeline_quality.md (default DIR: run_dir/pipeline). The quality
comes from the queries given; with the default dev500 queries, the same queries that report
the pipeline's quality elsewhere order its configurations here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.evaluate import EvalData
from benchmarks.rerank import quality
from elastic.encoder import ElasticEncoder
from elastic.pipeline import PipelineConfig, frontier, merge_reranked
from elastic.ranker import CrossEncoder
from elastic.structure import gflops
from training.config import RecipeConfig, load_config

TOP_K = 10  # results a pipeline answer returns, and MRR's cutoff


def measure(cfg: RecipeConfig, data: EvalData, denser_run: Path, depths: list[int],
            ranker_levels: list[int] | None) -> list[dict]:
    """One row per configuration: denser_level, ranker_level, depth, mrr_at_10, gflops_per_query.

    Raises:
        FileNotFoundError: no ElasticDenser with its index under ``denser_run``, or no
            ElasticRanker under run_dir/ranker/elastic (training/ranker.py).
        ValueError: a ranker level the ranker lacks, or a depth < 1.
    """
    import faiss

    for f in (denser_run / "elastic" / "model.safetensors", denser_run / "index" / "index.faiss",
              cfg.run / "ranker" / "elastic" / "model.safetensors"):
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing (train ElasticDenser and its index, and training.ranker)")
    if any(k < 1 for k in depths):
        raise ValueError(f"--depths: every K must be >= 1 (K = 0, dense only, is always measured), got {depths}")
    denser = ElasticEncoder(denser_run / "elastic")
    ranker = CrossEncoder(cfg.run / "ranker" / "elastic", cfg.ranker.max_length)
    ranker_levels = ranker_levels or ranker.levels
    bad = [r for r in ranker_levels if r not in ranker.levels]
    if bad:
        raise ValueError(f"--ranker-levels: {bad} are not levels of the ranker {ranker.levels}")
    index = faiss.read_index(str(denser_run / "index" / "index.faiss"))
    served = (denser_run / "index" / "pids.txt").read_text().split()
    texts = dict(zip(data.pids, data.ptexts))
    queries = dict(zip(data.qids, data.qtexts))
    qids = [q for q in data.qids if q in data.qrels]
    depth = min(max([TOP_K, *depths]), len(served))
    q_tokens = sum(len(t) for t in denser.tokenizer([queries[q] for q in qids], truncation=True,
                                                    max_length=cfg.encode.query_max_length)["input_ids"]) / len(qids)
    lists: dict[int, dict[str, list[str]]] = {}
    for d in denser.levels:
        Q = denser.encode([queries[q] for q in qids], d, cfg.encode.query_max_length, 128, query=True)
        _, idx = index.search(Q.numpy(), depth)
        lists[d] = {q: [served[j] for j in row if j >= 0 and served[j] in texts] for q, row in zip(qids, idx)}
    enc = {d: gflops(denser.dims, denser.sublm(d), round(q_tokens)) for d in denser.levels}  # query encoding
    rows = []
    for d in denser.levels:
        rows.append({"denser_level": d, "ranker_level": None, "depth": 0,
                     "mrr_at_10": quality(data.qrels, {q: ls[:TOP_K] for q, ls in lists[d].items()})["mrr_at_10"],
                     "gflops_per_query": round(enc[d], 4)})
    kmax = max(depths)
    pairs = sorted({(q, p) for d in denser.levels for q in qids for p in lists[d][q][:kmax]})
    ids = ranker.tokenizer([queries[q] for q, _ in pairs], [texts[p] for _, p in pairs], truncation=ranker.TRUNCATION,
                           max_length=ranker.task.max_length)["input_ids"]
    pair_tokens = round(sum(map(len, ids)) / len(ids))
    for r in ranker_levels:
        t0 = time.time()
        flat = ranker.score([queries[q] for q, _ in pairs], [texts[p] for _, p in pairs], r,
                            cfg.ranker.eval_batch_size).tolist()
        score = dict(zip(pairs, flat))
        per_pair = gflops(ranker.dims, ranker.sublm(r), pair_tokens)
        print(f"[pipeline-quality] ranker level {r}%: {len(pairs)} pairs in {time.time() - t0:.0f} s", flush=True)
        for d in denser.levels:
            for k in depths:
                ranked = {q: [ls[i] for i in _merge(ls, [score[(q, p)] for p in ls[:k]])]
                          for q, ls in lists[d].items()}
                rows.append({"denser_level": d, "ranker_level": r, "depth": k,
                             "mrr_at_10": quality(data.qrels, ranked)["mrr_at_10"],
                             "gflops_per_query": round(enc[d] + k * per_pair, 4)})
    return rows


def _merge(candidates: list[str], head_scores: list[float]) -> list[int]:
    """Positions in ``candidates`` of the merged top 10 (merge_reranked over positions)."""
    return merge_reranked(list(range(len(candidates))), head_scores, TOP_K)


def gflops_frontier(rows: list[dict]) -> list[int]:
    """Indices of the rows on the quality-GFLOPs Pareto frontier, cheapest first."""
    cands = [PipelineConfig(r["denser_level"], r["ranker_level"], r["depth"], r["mrr_at_10"]) for r in rows]
    return frontier(cands, [r["gflops_per_query"] for r in rows])


def to_markdown(rows: list[dict], how: str) -> str:
    cols = ("denser_level", "ranker_level", "depth", "mrr_at_10", "gflops_per_query", "frontier")
    lines = ["# Pipeline quality table", "", how, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in sorted(rows, key=lambda r: r["gflops_per_query"]):
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: RecipeConfig, denser_run: Path, queries: str | None, qrels: str | None, collection: str | None,
        depths: list[int], ranker_levels: list[int] | None, out: Path | None) -> list[dict]:
    t0 = time.time()
    qfile, rfile, cfile = queries or cfg.data.dev_queries, qrels or cfg.data.qrels, collection or cfg.data.collection
    data = EvalData.load(cfg, qfile, rfile, cfile)
    rows = measure(cfg, data, denser_run, depths, ranker_levels)
    keep = set(gflops_frontier(rows))
    for i, r in enumerate(rows):
        r["frontier"] = i in keep
    out = out or cfg.run / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = [{k: r[k] for k in ("denser_level", "ranker_level", "depth", "mrr_at_10")} for r in rows if r["frontier"]]
    (out / "pipeline.json").write_text(json.dumps({"configs": table, "queries": qfile, "qrels": rfile,
                                                   "denser": str(denser_run / "elastic"),
                                                   "ranker": str(cfg.run / "ranker" / "elastic")}, indent=1) + "\n")
    how = (f"`python -m benchmarks.pipeline_quality` on {qfile} ({len(data.qrels)} judged queries), denser "
           f"{denser_run / 'elastic'} with its index, ranker {cfg.run / 'ranker' / 'elastic'}; top {TOP_K} returned; "
           f"{len(table)} of {len(rows)} configurations on the quality-GFLOPs frontier (pipeline.json); "
           f"{time.time() - t0:.0f} s.")
    md = to_markdown(rows, how)
    (out / "pipeline_quality.md").write_text(md)
    print(f"[pipeline-quality] wrote {out}/pipeline.json and pipeline_quality.{{json,md}}:\n{md}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure the two-stage pipeline's quality per configuration.")
    ap.add_argument("--config", help="recipe YAML with the ElasticRanker (run_dir/ranker/elastic)")
    ap.add_argument("--denser-run", type=Path, help="run directory of the ElasticDenser (elastic/, index/); "
                    "default: run_dir")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--qrels", help="TREC qrels (default: data.qrels)")
    ap.add_argument("--collection", help="pid<TAB>passage file (default: data.collection)")
    ap.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20], help="rerank depths K >= 1 (K = 0 always)")
    ap.add_argument("--ranker-levels", type=int, nargs="+", help="ranker levels measured (default: all)")
    ap.add_argument("--out", type=Path, help="output directory (default: run_dir/pipeline)")
    a = ap.parse_args()
    cfg = load_config(a.config)
    run(cfg, a.denser_run or cfg.run, a.queries, a.qrels, a.collection, a.depths, a.ranker_levels, a.out)


if __name__ == "__main__":
    main()
