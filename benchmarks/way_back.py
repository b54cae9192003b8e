"""How long an answer takes from the handler to the client, against the gap between batches.

    python -m benchmarks.way_back [--runs runs/demo/slo] [--rates 200 300] [--out benchmarks/results]

Reads the raw runs that ``benchmarks.slo`` leaves in its work folder (``<server>/raw-<rate>-<pass>.jsonl``).
Each answer carries ``Server-Timing: wait;dur, model;dur, handler;dur`` (milliseconds; wait is the
request's age when its batch began, from its ``X-Request-Start``), and the client times it from
the scheduled send, so per answer

    way back = latency − wait − handler

is everything after the model: the handler building the answers, TorchServe's worker sending
them, the frontend writing them, the client reading them. A batch is recovered from its answers,
which share its model and handler durations. The gap between two consecutive batches counts as
the per-batch overhead o (as the handler learns it, elastic/service.py) when the later batch's
oldest request was sent before the earlier batch's handler ended, i.e. it was waiting.

The schedule budgets r·o for the way back (``handler.return_share``, elastic/schedule.py). Per
server and run this prints, per batch size, the way back at p50 / p90 / p99, the median o, and the
share of answers whose way back outlasted o/2 and o. Writes way_back.json and way_back.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.slo import raw_runs, read_raw

SIZE_GROUPS = ((1, 2), (3, 4), (5, 6), (7, 8))  # batch sizes, inclusive ranges


def batches(records: list[dict]) -> list[dict]:
    """Batches of one raw run, in order of their start: per batch ``start`` and ``end`` (epoch
    ms of the handler's start and of its model's end), ``key`` (its answers' (model_ms, handler_ms),
    which they share), ``model`` (ms, the model's duration, so it
    ran over [end - model, end]), ``first_sent`` (epoch ms of its oldest request's send) and
    ``way_back`` (ms, one per answer). Only answers 200 with Server-Timing. ``start`` is the median
    over the batch's answers of send + wait, where wait is the age that the schedule took (after
    the handler's parsing), so ``start`` and ``end`` run late by that parsing, about 1 ms."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["status"] == 200 and r.get("wait_ms") is not None and r.get("handler_ms") is not None:
            groups[(r["model_ms"], r["handler_ms"])].append(r)
    out = []
    for (model_ms, handler_ms), rs in groups.items():
        start = float(np.median([r["sent_epoch"] * 1000 + r["wait_ms"] for r in rs]))
        out.append({"key": (model_ms, handler_ms), "start": start, "end": start + handler_ms, "model": model_ms,
                    "first_sent": min(r["sent_epoch"] for r in rs) * 1000,
                    "way_back": [r["latency_ms"] - r["wait_ms"] - r["handler_ms"] for r in rs]})
    return sorted(out, key=lambda b: b["start"])


def summarize(bs: list[dict]) -> dict:
    """The figures of one run (module docstring); None where a group has no answer."""
    gaps = [b["start"] - a["end"] for a, b in zip(bs, bs[1:]) if b["first_sent"] < a["end"] and b["start"] >= a["end"]]
    o = float(np.median(gaps)) if gaps else None
    row: dict = {"batches": len(bs), "o_p50_ms": round(o, 2) if o is not None else None}
    for lo, hi in SIZE_GROUPS + ((1, 8),):
        w = np.array([x for b in bs if lo <= len(b["way_back"]) <= hi for x in b["way_back"]])
        key = f"b{lo}-{hi}" if (lo, hi) != (1, 8) else "all"
        row[key] = None if not len(w) else {
            "answers": int(len(w)), "p50_ms": round(float(np.percentile(w, 50)), 2),
            "p90_ms": round(float(np.percentile(w, 90)), 2), "p99_ms": round(float(np.percentile(w, 99)), 2),
            "over_half_o": round(float(np.mean(w > o / 2)), 3) if o else None,
            "over_o": round(float(np.mean(w > o)), 3) if o else None}
    row["answers"] = sum(len(b["way_back"]) for b in bs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description="An answer's way back to the client against the gap between batches.")
    ap.add_argument("--runs", type=Path, default=Path("runs/demo/slo"), help="benchmarks.slo's work folder")
    ap.add_argument("--rates", type=float, nargs="*", help="only these offered rates (default: all)")
    ap.add_argument("--duration-s", type=float, default=30.0, help="the measured window of each run, seconds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    rows = []
    for d, rate, rep, raw in raw_runs(a.runs, a.rates):
        bs = batches([r for r in read_raw(raw) if 0 <= r["scheduled_s"] < a.duration_s])
        if len(bs) >= 10:
            rows.append({"server": d.name, "rate_rps": rate, "pass": rep, **summarize(bs)})
    if not rows:
        raise SystemExit(f"--runs {a.runs}: no raw run with Server-Timing answers (run benchmarks.slo first)")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "way_back.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# An answer's way back to the client, against the gap o between batches", "",
             f"`python -m benchmarks.way_back {' '.join(sys.argv[1:])}` on the raw runs of `benchmarks.slo` in "
             f"{a.runs}. Way back = client latency − wait − handler (Server-Timing, ms): from the model's end "
             "to the client. o: median gap between consecutive batches while requests waited. Each cell: "
             "p50 / p99 ms of the way back, then the share of answers over o/2 and over o.", "",
             "| server | rate | pass | batches | o p50 ms | " + " | ".join(
                 f"b {lo}–{hi}" for lo, hi in SIZE_GROUPS) + " | all |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in range(len(SIZE_GROUPS) + 1)) + " |"]
    for r in rows:
        cells = []
        for key in [f"b{lo}-{hi}" for lo, hi in SIZE_GROUPS] + ["all"]:
            c = r[key]
            cells.append("" if c is None else f"{c['p50_ms']} / {c['p99_ms']}; {c['over_half_o']} / {c['over_o']}")
        lines.append(f"| {r['server']} | {r['rate_rps']:g} | {r['pass']} | {r['batches']} | {r['o_p50_ms']} | "
                     + " | ".join(cells) + " |")
    (a.out / "way_back.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
