"""Exact top-k search over the passage index per batch: FAISS IndexFlatIP.search against one
sgemm + torch.topk over the same vectors (what the serving core uses, elastic.service.flat_ip_vectors).

    python -m benchmarks.search_cost --index runs/demo/index [--batch-sizes 1 2 4 8 16] [--repeats 300]

One thread (as the worker runs), random unit queries of the index's dimension, top-10. Checks
that both return the same passages (ties aside) and writes search.{json,md} under --out with the
median and p99 milliseconds per batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from elastic.service import flat_ip_vectors


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


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description="per-batch exact search cost: FAISS flat vs sgemm + topk")
    ap.add_argument("--index", type=Path, required=True, help="directory with index.faiss")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(a.index / "index.faiss"))
    vectors = flat_ip_vectors(index)
    if vectors is None:
        raise SystemExit(f"{a.index / 'index.faiss'}: not an IndexFlatIP; nothing to compare")
    rng = np.random.default_rng(0)
    rows = []
    for b in a.batch_sizes:
        q = rng.standard_normal((b, index.d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        qt = torch.from_numpy(q)
        _, ref = index.search(q, a.top_k)
        mine = torch.topk(qt @ vectors.T, a.top_k, dim=1).indices.numpy()
        agree = float(np.mean([len(set(r) & set(m)) / a.top_k for r, m in zip(ref, mine)]))
        f50, f99 = _timed(lambda: index.search(q, a.top_k), a.repeats)
        s50, s99 = _timed(lambda: torch.topk(qt @ vectors.T, a.top_k, dim=1), a.repeats)
        rows.append({"batch": b, "faiss_p50_ms": f50, "faiss_p99_ms": f99, "sgemm_p50_ms": s50, "sgemm_p99_ms": s99,
                     "same_top_k": round(agree, 4)})
        print(rows[-1], flush=True)
    meta = {"index": str(a.index), "vectors": index.ntotal, "dim": index.d, "threads": 1, "top_k": a.top_k,
            "repeats": a.repeats, "faiss": faiss.__version__, "torch": torch.__version__}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "search.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Exact top-{a.top_k} search per batch: FAISS IndexFlatIP against sgemm + topk", "",
             f"`python -m benchmarks.search_cost --index {a.index}`: {index.ntotal:,} x {index.d} float32, "
             f"one thread, {a.repeats} batches per cell, faiss {faiss.__version__}, torch {torch.__version__}.", "",
             "| batch | FAISS p50 ms | FAISS p99 ms | sgemm+topk p50 ms | sgemm+topk p99 ms | same top-k |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['faiss_p50_ms']} | {r['faiss_p99_ms']} | {r['sgemm_p50_ms']} | {r['sgemm_p99_ms']} "
              f"| {r['same_top_k']} |" for r in rows]
    (a.out / "search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
