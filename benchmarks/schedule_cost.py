"""The elastic schedule's own cost on the per-batch path, in microseconds.

    python -m benchmarks.schedule_cost [--batch 8] [--levels 7] [--repeats 20000]

Times what the serving core adds per batch for scheduling (elastic/service.py handle_batch):
parsing each request's X-Request-Start, the arrival rate over the batches of the last
rate_window_s (100 batches a second in its window), the plan (plan_batch: shedding and the
level over 7 levels and 4 calibrated batch sizes), the corrections per level
(level_corrections: the served level's own, the others borrowed from all levels as an
additive excess, the costlier path; a full batch also takes the tail of the level's large
batches), and the correction updates after the batch (all levels, the served one and its
large batches). Pure Python, one thread; prints the median and p99.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

from elastic.schedule import (ArrivalRate, Calibration, LatencyCorrection, estimate_age_ms, level_corrections,
                             parse_request_start, plan_batch)
from elastic.service import ElasticServer, HandlerSettings


HANDLER_DEFAULTS = HandlerSettings(latency_constraint_ms=50.0)  # the shipped settings (min_spare, ...)


def main() -> None:
    ap = argparse.ArgumentParser(description="per-batch cost of the elastic schedule (microseconds)")
    ap.add_argument("--batch", type=int, default=8, help="requests per batch (= batchSize)")
    ap.add_argument("--levels", type=int, default=7, help="preserving levels")
    ap.add_argument("--repeats", type=int, default=20000)
    a = ap.parse_args()
    sizes = (1, 2, 4, 8) if a.batch == 8 else (1, a.batch)
    cal = Calibration(sizes, {lv: tuple(0.5 * lv / 5 * s ** 0.7 for s in sizes)
                              for lv in [50, 40, 30, 20, 15, 10, 5][: a.levels]})
    corr = LatencyCorrection()
    per_level = {lv: LatencyCorrection() for lv in cal.ms}
    large = {lv: LatencyCorrection() for lv in cal.ms}  # handler.large_batch_tail: a full batch is large
    served = min(cal.ms)  # the one level with its own window; the others borrow (the costlier path)
    for _ in range(200):
        corr.observe(5.0, 6.0, 0.0, a.batch)
        per_level[served].observe(5.0, 6.0, 0.0, a.batch)
        large[served].observe(5.0, 6.5, 0.0, a.batch)
    history = deque(((i * 0.01, 4, a.batch) for i in range(32)), maxlen=32)
    # λ over the handler's window, in steady state: a batch every 10 ms (100 batches a second), so
    # one leaves the window as one arrives
    arrivals = ArrivalRate(HANDLER_DEFAULTS.rate_window_s)
    step = 0.01
    n_window = int(HANDLER_DEFAULTS.rate_window_s / step)
    for i in range(n_window):
        arrivals.observe(i * step, a.batch)
    spare = ElasticServer.spare_feedback(HANDLER_DEFAULTS)  # as the serving core builds it
    times = []
    for i in range(a.repeats):
        now = time.time()
        headers = [f"t={now - 0.004 * (k + 1):.6f}" for k in range(a.batch)]
        t0 = time.perf_counter()
        ages = [parse_request_start(h, now) for h in headers]
        ages = [x if x is not None else estimate_age_ms(0.33, history, 3.0) for x in ages]
        clock = (n_window + i) * step
        rate = arrivals.rate(clock, a.batch)
        c, cm = level_corrections(corr, per_level, cal, 20, large if a.batch >= 2 else None)
        plan = plan_batch(ages, 6, 50.0, cal, a.batch, 4.0, c, arrival_rate_rps=rate, mean_correction=cm,
                          min_spare=spare.sigma, return_share=HANDLER_DEFAULTS.return_share,
                          spare_from=HANDLER_DEFAULTS.spare_from)
        corr.observe(cal.t(plan.level, a.batch), 5.5, 0.0, a.batch)
        per_level[served].observe(cal.t(served, a.batch), 5.5, 0.0, a.batch)
        large[served].observe(cal.t(served, a.batch), 5.5, 0.0, a.batch)
        history.append((0.33, 6, a.batch))
        arrivals.observe(clock, a.batch)
        spare.observe(clock, a.batch, i % 2, spare.loosened_by(plan.spare_slack))
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    print(f"schedule cost per batch of {a.batch} ({a.levels} levels, {len(sizes)} calibrated batch sizes): "
          f"median {statistics.median(times):.1f} us, p99 {times[int(0.99 * len(times))]:.1f} us "
          f"over {a.repeats} batches")


if __name__ == "__main__":
    main()
