"""How much slower than calibrated the model path ran under load, per server and rate of an SLO sweep.

    python -m benchmarks.batch_excess [--runs runs/demo/slo] [--rates 300] [--servers static50-T50]
        [--tails 1 8]

Reads the raw runs that ``benchmarks.slo`` leaves in its work folder (``<server>/raw-<rate>-<pass>.jsonl``)
and each server's calibration (``<server>/describe.json``). A batch is recovered from its answers,
which share the batch's ``model`` and ``handler`` durations (Server-Timing). Per run it prints:
batches, mean batch size, the batch's model time at p50 (ms), c̄ as the ratio of sums
(observed / calibrated t_k(b)), and the least-squares line observed − t_k(b) = a + e·b (ms, ms
per request). An excess e that is the same at every level, with a ratio that falls as t_k grows,
is what ``elastic.schedule.transfer_correction`` assumes.

With ``--tails B ...`` it prints instead, per run, level and batch size B, the batch's model time
at p50 and p98 and their ratio: how the tail spreads with the batch (``handler.large_batch_tail``,
elastic/schedule.py point 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.slo import raw_runs, read_raw
from elastic.schedule import Calibration


def batches(raw: Path) -> list[tuple[int, int, float]]:
    """(level, batch size, model ms) of each batch of one raw run (answers with status 200)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for r in read_raw(raw):
        if r["status"] == 200 and r.get("model_ms") is not None:
            groups[(r["model_ms"], r["handler_ms"])].append(r["level"])
    return [(levels[0], len(levels), key[0]) for key, levels in groups.items()]


def fit(cal: Calibration, bs: list[tuple[int, int, float]]) -> dict:
    """The figures of one run (module docstring)."""
    b = np.array([n for _, n, _ in bs], dtype=float)
    t = np.array([cal.t(lv, n) for lv, n, _ in bs])
    obs = np.array([ms for _, _, ms in bs])
    a, e = np.linalg.lstsq(np.stack([np.ones_like(b), b], 1), obs - t, rcond=None)[0]
    return {"batches": len(bs), "mean_batch": round(float(b.mean()), 2),
            "model_p50_ms": round(statistics.median(obs.tolist()), 2), "ratio_of_sums": round(float(obs.sum() / t.sum()), 3),
            "excess_a_ms": round(float(a), 2), "excess_ms_per_request": round(float(e), 3)}


def tails(bs: list[tuple[int, int, float]], sizes: list[int]) -> list[tuple[int, int, int, float, float]]:
    """(level, batch size, batches, p50 ms, p98 ms) of one run's batches of each size in ``sizes``
    (levels and sizes with at least 10 batches)."""
    by: dict[tuple[int, int], list[float]] = defaultdict(list)
    for level, n, ms in bs:
        if n in sizes:
            by[(level, n)].append(ms)
    return [(level, n, len(v), float(np.percentile(v, 50)), float(np.percentile(v, 98)))
            for (level, n), v in sorted(by.items(), reverse=True) if len(v) >= 10]


def main() -> None:
    ap = argparse.ArgumentParser(description="Observed against calibrated batch time in an SLO sweep's raw runs.")
    ap.add_argument("--runs", type=Path, default=Path("runs/demo/slo"), help="benchmarks.slo's work folder")
    ap.add_argument("--rates", type=float, nargs="*", help="only these offered rates (default: all)")
    ap.add_argument("--servers", nargs="*", help="only these server folders, e.g. static50-T50 (default: all)")
    ap.add_argument("--tails", type=int, nargs="*", metavar="B",
                    help="instead: model time p50 / p98 per level at these batch sizes")
    a = ap.parse_args()
    if a.tails:
        print("| server | rate | pass | level | batch | batches | model p50 ms | p98 ms | p98 / p50 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d, rate, rep, raw in raw_runs(a.runs, a.rates):
            if a.servers and d.name not in a.servers:
                continue
            for level, n, count, p50, p98 in tails(batches(raw), a.tails):
                print(f"| {d.name} | {rate:g} | {rep} | {level} | {n} | {count} | {p50:.1f} | {p98:.1f} | {p98 / p50:.2f} |")
        return
    print("| server | rate | pass | batches | mean b | model p50 ms | c̄ (ratio of sums) | excess a ms | excess ms / request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cals = {}
    for d, rate, rep, raw in raw_runs(a.runs, a.rates):
        if not (d / "describe.json").exists() or (a.servers and d.name not in a.servers):
            continue
        if d not in cals:
            desc = json.loads((d / "describe.json").read_text())
            cals[d] = Calibration(tuple(desc["batch_sizes"]), {int(k): tuple(v) for k, v in desc["processing_ms"].items()})
        bs = batches(raw)
        if len(bs) < 10:
            continue
        f = fit(cals[d], bs)
        print(f"| {d.name} | {rate:g} | {rep} | {f['batches']} | {f['mean_batch']} | {f['model_p50_ms']} | "
              f"{f['ratio_of_sums']} | {f['excess_a_ms']} | {f['excess_ms_per_request']} |")


if __name__ == "__main__":
    main()
