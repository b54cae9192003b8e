"""Offline MRR@10 on the dev queries for BM25, the teacher and every SubLM, same collection.

    python -m benchmarks.evaluate --config configs/demo.yaml

Reads run_dir/elastic, run_dir/index and the teacher cache; writes run_dir/eval/offline.json
and offline.md, and prints the table.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from elastic.data import read_qrels, read_tsv
from elastic.encoder import ElasticEncoder
from elastic.metrics import mrr_at_10
from elastic.structure import gflops, total_params
from training.config import RecipeConfig, config_cli, teacher_path
from training.teacher import teacher_side


def dense_run(q: torch.Tensor, passages, pids: list[str], qids: list[str], k: int = 10) -> dict:
    """Top-k by inner product. passages: a FAISS index or an (N, d) tensor."""
    if isinstance(passages, torch.Tensor):
        scores, idx = torch.topk(q @ passages.T, k, dim=1)
        scores, idx = scores.numpy(), idx.numpy()
    else:
        scores, idx = passages.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
    return {qid: {pids[j]: float(s) for j, s in zip(row_i, row_s)} for qid, row_i, row_s in zip(qids, idx, scores)}


def bm25_run(collection: dict[str, str], queries: dict[str, str], k: int = 10) -> dict:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75, English stopwords, no stemming)."""
    import bm25s

    pids = list(collection)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(collection.values()), stopwords="en", show_progress=False), show_progress=False)
    docs, scores = retriever.retrieve(bm25s.tokenize(list(queries.values()), stopwords="en", show_progress=False),
                                      k=k, show_progress=False)
    return {qid: {pids[j]: float(s) for j, s in zip(d, sc)} for qid, d, sc in zip(queries, docs, scores)}


def evaluate(cfg: RecipeConfig) -> list[dict]:
    import faiss

    queries = read_tsv(cfg.data.dev_queries)
    qrels = read_qrels(cfg.data.qrels)
    collection = read_tsv(cfg.data.collection)
    qids, qtexts = list(queries), list(queries.values())
    rows = [{"system": "bm25", "level": None, "mrr_at_10": mrr_at_10(qrels, bm25_run(collection, queries))}]
    teacher = ElasticEncoder(teacher_path(cfg))
    side = teacher_side(cfg, teacher)
    qt = teacher.encode(qtexts, 100, cfg.encode.query_max_length, 128)
    rows.append({"system": "teacher", "level": None, "mrr_at_10": mrr_at_10(qrels, dense_run(qt, side.passages, side.pids, qids)),
                 "params": total_params(teacher.dims, teacher.dims.full()), "gflops": round(gflops(teacher.dims, teacher.dims.full()), 4)})
    enc = ElasticEncoder(cfg.run / "elastic")
    index = faiss.read_index(str(cfg.run / "index" / "index.faiss"))
    pids = (cfg.run / "index" / "pids.txt").read_text().split()
    sub = enc.submap.to_json(enc.dims)["levels"]
    for level in enc.levels:
        q = enc.encode(qtexts, level, cfg.encode.query_max_length, 128)
        rows.append({"system": "elastic", "level": level, "mrr_at_10": mrr_at_10(qrels, dense_run(q, index, pids, qids)),
                     "params": sub[str(level)]["params"], "gflops": sub[str(level)]["gflops"]})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| system | level % | MRR@10 | params | GFLOPs (128 tokens) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['level'] if r['level'] is not None else '-'} | {r['mrr_at_10']:.4f} | "
                     f"{r.get('params', '-')} | {r.get('gflops', '-')} |")
    return "\n".join(lines) + "\n"


def run(cfg: RecipeConfig) -> list[dict]:
    """Evaluate, write run_dir/eval/offline.json and offline.md, print the table."""
    t0 = time.time()
    rows = evaluate(cfg)
    out = cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = to_markdown(rows)
    (out / "offline.md").write_text(md)
    print(f"[evaluate] MRR@10 on {cfg.data.dev_queries} ({time.time() - t0:.0f} s):\n{md}", flush=True)
    return rows


def main() -> None:
    config_cli("MRR@10 of BM25, the teacher and every SubLM on the dev queries.", run)


if __name__ == "__main__":
    main()
