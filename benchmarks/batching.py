"""Batching sweep: the elastic server (deadline rule, shedding) at a few open-loop rates for each
TorchServe batchSize / maxBatchDelay pair; the measured basis of serve.batch_size and
serve.max_batch_delay_ms.

    python -m benchmarks.batching --config configs/demo.yaml [--batch-sizes 1 4 8 16] [--delays-ms 1 2 5]
        [--T 50] [--rates 20 150 300] [--duration-s 20] [--out benchmarks/results]

Every batch size runs at --delay-for-sizes, and every delay at --size-for-delays (not the full
grid). Writes batching.json (slo.json's row keys plus batch_size and max_batch_delay_ms) and
batching.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from archive.build_mar import run as build_model
from benchmarks.server import model_variant
from benchmarks.slo import Server, sweep
from elastic.data import read_qrels
from training.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description="batchSize / maxBatchDelay sweep of the elastic server, open loop.")
    ap.add_argument("--config", help="recipe YAML")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--delay-for-sizes", type=int, default=2, help="maxBatchDelay (ms) while batch sizes vary")
    ap.add_argument("--delays-ms", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--size-for-delays", type=int, default=8, help="batchSize while delays vary")
    ap.add_argument("--T", type=float, default=50.0, help="latency constraint, ms")
    ap.add_argument("--rates", type=float, nargs="+", default=[20, 150, 300], help="offered rates, req/s")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    # what benchmarks.slo.sweep reads: every rate runs (no early stop), no repeats
    a.drain_s, a.stop_below, a.repeats, a.repeat_T, a.queries = 10.0, -1.0, 1, [], None
    cfg = load_config(a.config)
    work = (cfg.run / "batching").resolve()
    store = work / "store"
    base = build_model(cfg, store, "no-archive")
    qrels = read_qrels(cfg.data.qrels)
    grid = [(b, a.delay_for_sizes) for b in a.batch_sizes] + [(a.size_for_delays, d) for d in a.delays_ms]
    grid = list(dict.fromkeys(grid))
    rows = []
    for b, d in grid:
        spec = Server("elastic", None, a.T)
        name = f"elastic-b{b}-d{d}"
        model_variant(base, store, name, spec.handler_settings(), {"batchSize": b, "maxBatchDelay": d})
        for r in sweep(cfg, spec, name, store, work, a, qrels, [a.T]):
            rows.append({**r, "batch_size": b, "max_batch_delay_ms": d})
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "batching.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = ("batch_size", "max_batch_delay_ms", "rate_rps", "within_T", "windows_ok", "p50_ms", "p99_ms", "shed",
            "effective_mrr_at_10", "mean_level")
    lines = [f"# Batching sweep: elastic server, T = {a.T:g} ms, open-loop Poisson, {a.duration_s:g} s per run", "",
             "`python -m benchmarks.batching` (TorchServe on CPU 0, Locust on CPU 1).", "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    (a.out / "batching.md").write_text("\n".join(lines) + "\n")
    print((a.out / "batching.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
