"""Does a worker that has served other SubLMs run a level's slice slower? Off line, one process.

    python -m benchmarks.level_history --model DIR [--before mixed|only] [--level 5] [--batch 8] [--packed-levels]
        [--onednn]

The model directory is what a served archive holds (an ElasticDenser with submap.json and, beside
it, index.faiss and pids.txt). The process builds the serving core (``ElasticRetriever``, one
torch thread, as a worker does), then, for ``--rounds`` rounds, runs ``--warm`` batches of
random sizes 1..batch either at random levels (``--before mixed``, as an elastic worker does
under a changing load) or at ``--level`` only (``only``, as a static worker does), and times
``--timed`` batches of ``--batch`` dev queries at ``--level``: the model path that the schedule
predicts as t_k (encode and search), with the levels sliced from the stored weights or, with
``--packed-levels``, each from its own contiguous copy (handler.packed_levels), and the matrix
products in MKL's sgemm or, with ``--onednn``, in oneDNN (handler.onednn). Prints the median
milliseconds per round. Run it in several
processes, alternating ``--before``, and pin each to one core (``taskset -c 0``): the spread
between processes is part of what it shows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from elastic.data import read_tsv
from elastic.service import ElasticRetriever, FixedQueue, HandlerSettings


def main() -> None:
    ap = argparse.ArgumentParser(description="a level's batch time after serving mixed levels or that level only")
    ap.add_argument("--model", type=Path, required=True,
                    help="model directory with submap.json, index.faiss and pids.txt (as in a served archive)")
    ap.add_argument("--queries", type=Path, default=Path("data/msmarco/queries.dev500.tsv"),
                    help="qid<TAB>query file")
    ap.add_argument("--before", choices=("mixed", "only"), default="mixed",
                    help="what runs before each timed round: random levels, or --level only")
    ap.add_argument("--level", type=int, default=5, help="preserving level timed, percent")
    ap.add_argument("--batch", type=int, default=8, help="queries per timed batch (the largest warm batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=600, help="batches before each timed round")
    ap.add_argument("--timed", type=int, default=1500, help="timed batches per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packed-levels", action="store_true",
                    help="serve each level from its own contiguous copy (handler.packed_levels)")
    ap.add_argument("--onednn", action="store_true", help="matrix products through oneDNN (handler.onednn)")
    a = ap.parse_args()
    settings = HandlerSettings(latency_constraint_ms=50.0, calibration_cache=False, calibration_repeats=5,
                               packed_levels=a.packed_levels, onednn=a.onednn)
    server = ElasticRetriever(a.model, settings, max_batch=a.batch, queue=FixedQueue(0))
    if a.level not in server.levels:
        raise SystemExit(f"--level: {a.level} is not a level of {a.model}/submap.json {server.levels}")
    queries = list(read_tsv(a.queries).values())
    if len(queries) < a.batch:
        raise SystemExit(f"--queries: {a.queries} has {len(queries)} queries, fewer than --batch {a.batch}")
    items = server._prepare([{"query": q} for q in queries])  # the task's hook: (token ids, truncated) per query
    rng = random.Random(a.seed)
    for round_ in range(a.rounds):
        for _ in range(a.warm):
            level = rng.choice(server.levels) if a.before == "mixed" else a.level
            server._run(rng.sample(items, rng.randint(1, a.batch)), level)
        ms = []
        for _ in range(a.timed):
            batch = rng.sample(items, a.batch)
            t0 = time.perf_counter()
            server._run(batch, a.level)
            ms.append((time.perf_counter() - t0) * 1000)
        print(f"before={a.before} packed={a.packed_levels} onednn={a.onednn} round {round_}: level {a.level}, "
              f"batch {a.batch}: median {statistics.median(ms):.3f} ms over {a.timed} batches", flush=True)


if __name__ == "__main__":
    main()
