"""Turn the Locust replay's raw records into requests.csv, a per-phase summary and a plot.

    python -m benchmarks.report --raw runs/demo/online/raw.jsonl --qrels data/msmarco/qrels.dev500.tsv \
        --out runs/demo/online --ramp-up-s 40 --hold-s 30 --ramp-down-s 20 --tail-s 15

requests.csv columns: timestamp_s,latency_ms,status,level,queue_size,qid,rr_at_10 (seconds
since the test started; milliseconds; HTTP status; preserving level in percent; queue size g the
handler saw; query id; reciprocal rank at 10 from the qrels, empty where the qid has none or the
request failed). summary.json / summary.md: p50/p95/p99 latency, MRR@10 and the share of each
level, per phase and overall. timeline.png: latency, MRR@10 and level over time.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from elastic.data import read_qrels
from elastic.metrics import rr_at_10_per_query

COLUMNS = ["timestamp_s", "latency_ms", "status", "level", "queue_size", "qid", "rr_at_10", "wait_ms", "model_ms",
           "handler_ms"]


def server_timing(value: str | None) -> dict:
    """{"wait_ms", "model_ms", "handler_ms"} from a ``Server-Timing: wait;dur=W, model;dur=X,
    handler;dur=Y`` header (W3C Server Timing; other metrics ignored), each None when absent or
    not a number."""
    out = {"wait_ms": None, "model_ms": None, "handler_ms": None}
    for metric in (value or "").split(","):
        name, _, params = metric.strip().partition(";")
        key = {"wait": "wait_ms", "model": "model_ms", "handler": "handler_ms"}.get(name.strip())
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if key and k == "dur":
                try:
                    out[key] = float(v)
                except ValueError:
                    pass
    return out


def with_rr(records: list[dict], qrels: dict[str, dict[str, int]]) -> list[dict]:
    """Each record plus ``rr_at_10`` (ir-measures RR@10 of its own ranking; None without qrels)."""
    run = {str(i): {pid: 10.0 - r for r, pid in enumerate(rec["pids"])}
           for i, rec in enumerate(records) if rec["status"] == 200 and rec["qid"] in qrels}
    per = rr_at_10_per_query({i: qrels[records[int(i)]["qid"]] for i in run}, run)
    return [{**rec, "rr_at_10": per.get(str(i))} for i, rec in enumerate(records)]


def phases(ramp_up_s: float, hold_s: float, ramp_down_s: float, tail_s: float) -> list[tuple[str, float, float]]:
    """(name, start_s, end_s) of the rush's phases."""
    b = np.cumsum([0, ramp_up_s, hold_s, ramp_down_s, tail_s])
    return [(n, float(b[i]), float(b[i + 1])) for i, n in enumerate(["ramp_up", "peak", "ramp_down", "tail"])]


def summarize(rows: list[dict], T_ms: float | None = None) -> dict:
    """p50/p95/p99 latency (ms), MRR@10, error count and level shares of some rows; with T
    (ms), ``within_T``: the share of requests answered 200 within T. ``wait_p50_ms`` /
    ``wait_p99_ms``: the Server-Timing wait (the age the schedule used; None without it);
    ``after_p50_ms`` / ``after_p99_ms``: latency − wait − handler, the answer's way back to the
    client plus, where the age was estimated (no X-Request-Start), the wait the estimate missed."""

    def pct(values, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if len(values) else None

    ok = [r for r in rows if r["status"] == 200]
    lat = np.array([r["latency_ms"] for r in ok]) if ok else np.array([np.nan])
    timed = [r for r in ok if r.get("wait_ms") is not None and r.get("handler_ms") is not None]
    wait = [r["wait_ms"] for r in timed]
    after = [r["latency_ms"] - r["wait_ms"] - r["handler_ms"] for r in timed]
    rr = [r["rr_at_10"] for r in ok if r["rr_at_10"] is not None]
    levels = sorted({r["level"] for r in ok}, reverse=True)
    return {
        "requests": len(rows), "errors": len(rows) - len(ok),
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mrr_at_10": round(float(np.mean(rr)), 4) if rr else None,
        "level_share": {str(lv): round(sum(r["level"] == lv for r in ok) / len(ok), 3) for lv in levels},
        "mean_queue_size": round(float(np.mean([r["queue_size"] for r in ok])), 2) if ok else None,
        "within_T": round(sum(r["latency_ms"] <= T_ms for r in ok) / len(rows), 4) if T_ms and rows else None,
        "wait_p50_ms": pct(wait, 50), "wait_p99_ms": pct(wait, 99),
        "after_p50_ms": pct(after, 50), "after_p99_ms": pct(after, 99),
    }


def plot(rows: list[dict], bounds: list[tuple[str, float, float]], T_ms: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r["status"] == 200), key=lambda r: r["timestamp_s"])
    t = np.array([r["timestamp_s"] for r in ok])
    fig, ax = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ax[0].scatter(t, [r["latency_ms"] for r in ok], s=3, alpha=0.5)
    if T_ms:
        ax[0].axhline(T_ms, color="red", ls="--", label=f"T = {T_ms:g} ms")
        ax[0].legend(loc="upper right")
    ax[0].set_ylabel("latency (ms)")
    ax[0].set_yscale("log")
    ax[1].scatter(t, [r["level"] for r in ok], s=3, alpha=0.3, color="tab:green", label="per request")
    bins = np.arange(0, (t.max() if len(t) else 0) + 2, 2)
    lv = np.array([r["level"] for r in ok], dtype=float)
    which = np.digitize(t, bins)
    mean_lv = [(bins[i - 1] + 1, lv[which == i].mean()) for i in np.unique(which)]
    ax[1].plot(*zip(*mean_lv), color="black", lw=1.2, label="mean over 2 s")
    ax[1].legend(loc="lower left")
    ax[1].set_ylabel("SubLM level (%)")
    ax[2].plot(t, [r["queue_size"] for r in ok], lw=0.8, color="tab:orange")
    ax[2].set_ylabel("queue size g")
    # MRR@10 over 5-second windows
    edges = np.arange(0, (t.max() if len(t) else 0) + 5, 5)
    mids, mrr = [], []
    for a, b in zip(edges, edges[1:]):
        rr = [r["rr_at_10"] for r in ok if a <= r["timestamp_s"] < b and r["rr_at_10"] is not None]
        if rr:
            mids.append((a + b) / 2)
            mrr.append(np.mean(rr))
    ax[3].plot(mids, mrr, marker="o", color="tab:purple")
    ax[3].set_ylabel("MRR@10 (5 s windows)")
    ax[3].set_xlabel("time since start (s)")
    for a in ax:
        for name, s, e in bounds:
            a.axvline(s, color="grey", lw=0.5)
    for name, s, e in bounds:
        ax[0].text((s + e) / 2, ax[0].get_ylim()[1], name, ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(raw: Path, qrels_path: Path, out: Path, bounds: list[tuple[str, float, float]],
                 T_ms: float | None = None) -> dict:
    """Write requests.csv, summary.json, summary.md and timeline.png into ``out``; return the summary."""
    records = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{raw}: no requests were recorded")
    rows = with_rr(records, read_qrels(qrels_path))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in sorted(rows, key=lambda r: r["timestamp_s"]):
            w.writerow(["" if r.get(c) is None else r[c] for c in COLUMNS])
    summary = {"latency_constraint_ms": T_ms, "overall": summarize(rows, T_ms)}
    for name, s, e in bounds:
        part = [r for r in rows if s <= r["timestamp_s"] < e]
        if part:
            summary[name] = summarize(part, T_ms)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| phase | requests | errors | p50 ms | p95 ms | p99 ms | within T | wait p50 / p99 ms | after p50 / p99 ms "
             "| MRR@10 | mean g | level share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ["ramp_up", "peak", "ramp_down", "tail", "overall"]:
        if name in summary:
            s = summary[name]
            share = ", ".join(f"{k}%: {v:.0%}" for k, v in s["level_share"].items())
            lines.append(f"| {name} | {s['requests']} | {s['errors']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
                         f"{s['within_T']} | {s['wait_p50_ms']} / {s['wait_p99_ms']} | "
                         f"{s['after_p50_ms']} / {s['after_p99_ms']} | {s['mrr_at_10']} | "
                         f"{s['mean_queue_size']} | {share} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, bounds, T_ms, out / "timeline.png")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description="requests.csv, per-phase summary and plot of a Locust replay.")
    ap.add_argument("--raw", type=Path, required=True, help="raw.jsonl written by benchmarks/locustfile.py")
    ap.add_argument("--qrels", type=Path, default=Path("data/msmarco/qrels.dev500.tsv"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--latency-constraint-ms", type=float, default=None, help="T, drawn on the plot")
    for name, default in (("ramp-up-s", 40.0), ("hold-s", 30.0), ("ramp-down-s", 20.0), ("tail-s", 15.0)):
        ap.add_argument(f"--{name}", type=float, default=default)
    a = ap.parse_args()
    write_report(a.raw, a.qrels, a.out, phases(a.ramp_up_s, a.hold_s, a.ramp_down_s, a.tail_s), a.latency_constraint_ms)
    print((a.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
