"""Exact top-k search per batch: FAISS IndexFlatIP.search against one sgemm + torch.topk over
the same vectors, laid out as FAISS stores them (N, d rows: ``q @ V.T``) and as the serving core
holds them (d, N columns: ``q @ M``, elastic.service.flat_ip_matrix).

    python -m benchmarks.search_cost --index runs/demo/index [--model runs/demo/elastic --levels 5 20 50]
        [--batch-sizes 1 2 3 4 5 6 7 8 16] [--repeats 300]

One thread (as the worker runs), top-10. "search": random unit queries of the index's dimension,
the search alone; checks that all three return the same passages (ties aside). With --model,
"encode + search": the first queries of --queries, tokenized once, then per
batch the served query path (ElasticEncoder.embed at the level, through its query head) and the
search, back to back as a worker runs them; the two layouts differ there more than in the search
alone, because the passage matrix and the encoder's weights evict each other from the caches.
Writes search.{json,md} under --out: median and p99 milliseconds per batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from elastic.service import flat_ip_matrix


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median, p99) milliseconds of ``fn()`` over ``repeats`` calls after 10 warm-up calls."""
    for _ in range(10):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(ts)), 3), round(float(np.percentile(ts, 99)), 3)


def _agree(ref: np.ndarray, mine: np.ndarray) -> float:
    """Mean share of ``ref``'s top k that ``mine`` also returns, per query."""
    return float(np.mean([len(set(r) & set(m)) / len(r) for r, m in zip(ref, mine)]))


def search_rows(index, rows: torch.Tensor, matrix: torch.Tensor, batch_sizes: list[int], top_k: int,
                repeats: int) -> list[dict]:
    """The search alone, per batch size: FAISS, sgemm over (N, d) rows, sgemm over (d, N) columns."""
    rng = np.random.default_rng(0)
    out = []
    for b in batch_sizes:
        q = rng.standard_normal((b, index.d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        qt = torch.from_numpy(q)
        _, ref = index.search(q, top_k)
        agree = min(_agree(ref, torch.topk(qt @ rows.T, top_k, dim=1).indices.numpy()),
                    _agree(ref, torch.topk(qt @ matrix, top_k, dim=1).indices.numpy()))
        f50, f99 = _timed(lambda: index.search(q, top_k), repeats)
        r50, r99 = _timed(lambda: torch.topk(qt @ rows.T, top_k, dim=1), repeats)
        c50, c99 = _timed(lambda: torch.topk(qt @ matrix, top_k, dim=1), repeats)
        out.append({"path": "search", "level": None, "batch": b, "faiss_p50_ms": f50, "faiss_p99_ms": f99,
                    "rows_p50_ms": r50, "rows_p99_ms": r99, "columns_p50_ms": c50, "columns_p99_ms": c99,
                    "same_top_k": round(agree, 4)})
        print(out[-1], flush=True)
    return out


def encode_search_rows(encoder, index, queries: list[str], rows: torch.Tensor, matrix: torch.Tensor,
                       levels: list[int], batch_sizes: list[int], top_k: int, repeats: int) -> list[dict]:
    """Encode (the served query path at each level) then search, per level and batch size: FAISS,
    or one sgemm over either layout."""
    out = []
    with torch.inference_mode():
        for level in levels:
            for b in batch_sizes:
                batch = encoder.tokenize(queries[:b], 32)
                rows_fn = lambda: torch.topk(encoder.embed(batch, level, query=True) @ rows.T, top_k, dim=1)  # noqa: E731
                cols_fn = lambda: torch.topk(encoder.embed(batch, level, query=True) @ matrix, top_k, dim=1)  # noqa: E731
                faiss_fn = lambda: index.search(np.ascontiguousarray(encoder.embed(batch, level, query=True).numpy()),  # noqa: E731
                                                top_k)
                ref = faiss_fn()[1]
                same = min(_agree(ref, rows_fn().indices.numpy()), _agree(ref, cols_fn().indices.numpy()))
                f50, f99 = _timed(faiss_fn, repeats)
                r50, r99 = _timed(rows_fn, repeats)
                c50, c99 = _timed(cols_fn, repeats)
                out.append({"path": "encode+search", "level": level, "batch": b, "faiss_p50_ms": f50,
                            "faiss_p99_ms": f99, "rows_p50_ms": r50, "rows_p99_ms": r99, "columns_p50_ms": c50,
                            "columns_p99_ms": c99, "same_top_k": round(same, 4)})
                print(out[-1], flush=True)
    return out


def main() -> None:
    import faiss

    from elastic.data import read_tsv
    from elastic.encoder import ElasticEncoder

    ap = argparse.ArgumentParser(description="per-batch exact search cost: FAISS flat vs sgemm + topk, two layouts")
    ap.add_argument("--index", type=Path, required=True, help="directory with index.faiss")
    ap.add_argument("--model", type=Path, help="an ElasticDenser model directory: also time encode + search")
    ap.add_argument("--levels", type=int, nargs="+", default=[5, 20, 50], help="levels for encode + search")
    ap.add_argument("--queries", type=Path, default=Path("data/msmarco/queries.dev500.tsv"),
                    help="qid<TAB>query file for encode + search (the first max(batch-sizes) queries)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8, 16])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(a.index / "index.faiss"))
    matrix = flat_ip_matrix(index)
    if matrix is None:
        raise SystemExit(f"{a.index / 'index.faiss'}: not an IndexFlatIP; nothing to compare")
    rows = matrix.T.contiguous()  # (N, d): the layout FAISS stores (and the serving core used before)
    out = search_rows(index, rows, matrix, a.batch_sizes, a.top_k, a.repeats)
    if a.model:
        queries = list(read_tsv(a.queries).values())
        out += encode_search_rows(ElasticEncoder(a.model), index, queries, rows, matrix, a.levels, a.batch_sizes,
                                  a.top_k, a.repeats)
    meta = {"index": str(a.index), "model": a.model and str(a.model), "vectors": index.ntotal, "dim": index.d,
            "threads": 1, "top_k": a.top_k, "repeats": a.repeats, "faiss": faiss.__version__,
            "torch": torch.__version__}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "search.json").write_text(json.dumps({"meta": meta, "rows": out}, indent=1) + "\n")
    cmd = f"python -m benchmarks.search_cost --index {a.index}" + (f" --model {a.model}" if a.model else "")
    lines = [f"# Exact top-{a.top_k} search per batch: FAISS IndexFlatIP against sgemm + topk over rows and columns",
             "", f"`{cmd}`: {index.ntotal:,} x {index.d} float32, one thread, {a.repeats} batches per cell, "
             f"faiss {faiss.__version__}, torch {torch.__version__}. Rows: `q @ V.T` over FAISS's (N, d) layout "
             "(served before); columns: `q @ M` over the (d, N) copy that the serving core holds "
             "(`elastic.service.flat_ip_matrix`). Encode + search: the served query path at that level, then "
             "the search, back to back.", "",
             "| path | level | batch | FAISS p50 ms | rows p50 ms | columns p50 ms | columns / rows | rows p99 ms "
             "| columns p99 ms | same top-k |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['path']} | {r['level'] if r['level'] is not None else ''} | {r['batch']} | "
              f"{r['faiss_p50_ms'] if r['faiss_p50_ms'] is not None else ''} | {r['rows_p50_ms']} | "
              f"{r['columns_p50_ms']} | {r['columns_p50_ms'] / r['rows_p50_ms']:.2f} | {r['rows_p99_ms']} | "
              f"{r['columns_p99_ms']} | {r['same_top_k']} |" for r in out]
    (a.out / "search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
