"""The paper's Fig. 7 rush with the static levels beside the elastic server, in one figure.

    python -m benchmarks.rush --config configs/demo.yaml [--levels 50 20 5] [--out benchmarks/results]

Each server in turn serves the same Locust rush (benchmarks/locustfile.py: closed-loop users
ramping up to load.peak_users, holding, ramping down; TorchServe on CPU 0, Locust on CPU 1;
benchmarks/online.py): elastic (the deadline schedule) and one static server per --levels
(handler.pin_level, shedding like elastic), all at T = serve.latency_constraint_ms with the same
batching. Writes under --out:

- rush.json: per server and phase: requests, ok, shed (503), p50_ms / p99_ms (200 answers),
  within_T (200 answers within T / requests), mrr_at_10 (over 200 answers) and
  effective_mrr_at_10 (over judged requests; late, shed or failed ones count 0), mean_level;
- rush.md: that table;
- rush.png: per 5-s window, p99 latency, effective MRR@10 and requests per second, one line per
  server (the paper's Fig. 7 with the static baselines in it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from archive.build_mar import run as build_model
from benchmarks.online import run_online
from benchmarks.report import phases
from benchmarks.server import model_variant
from elastic.data import read_qrels
from training.config import load_config

WINDOW_S = 5.0


def read_requests(path: Path, judged_qids: set[str]) -> list[dict]:
    """requests.csv (benchmarks/report.py COLUMNS) as dicts with numbers parsed; ``judged``: the
    query has qrels (it counts in MRR@10, as 0 when not answered)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({"t": float(r["timestamp_s"]), "latency_ms": float(r["latency_ms"]) if r["latency_ms"] else None,
                        "status": int(r["status"]), "level": int(r["level"]) if r["level"] else None,
                        "judged": r["qid"] in judged_qids,
                        "rr": float(r["rr_at_10"]) if r["rr_at_10"] else 0.0})
    return out


def phase_row(rows: list[dict], T_ms: float) -> dict:
    """Figures of one server over some requests (see the module docstring)."""
    ok = [r for r in rows if r["status"] == 200]
    in_time = [r for r in ok if r["latency_ms"] <= T_ms]
    lat = np.array([r["latency_ms"] for r in ok], dtype=float)
    rr_ok = [r["rr"] for r in ok if r["judged"]]
    n_judged = sum(r["judged"] for r in rows)
    levels = [r["level"] for r in ok if r["level"] is not None]
    return {"requests": len(rows), "ok": len(ok), "shed": sum(r["status"] == 503 for r in rows),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "within_T": round(len(in_time) / len(rows), 4) if rows else None,
            "mrr_at_10": round(float(np.mean(rr_ok)), 4) if rr_ok else None,
            "effective_mrr_at_10": round(sum(r["rr"] for r in in_time if r["judged"]) / n_judged, 4)
            if n_judged else None,
            "mean_level": round(float(np.mean(levels)), 2) if levels else None}


def plot(series: dict[str, list[dict]], T_ms: float, bounds, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name, rows in series.items():
        end = max(r["t"] for r in rows)
        edges = np.arange(0, end + WINDOW_S, WINDOW_S)
        mids, p99, eff, rate = [], [], [], []
        for lo in edges[:-1]:
            w = [r for r in rows if lo <= r["t"] < lo + WINDOW_S]
            if not w:
                continue
            f = phase_row(w, T_ms)
            mids.append(lo + WINDOW_S / 2)
            p99.append(f["p99_ms"] if f["p99_ms"] is not None else np.nan)
            eff.append(f["effective_mrr_at_10"] if f["effective_mrr_at_10"] is not None else np.nan)
            rate.append(len(w) / WINDOW_S)
        axes[0].plot(mids, p99, label=name)
        axes[1].plot(mids, eff, label=name)
        axes[2].plot(mids, rate, label=name)
    axes[0].axhline(T_ms, color="k", ls="--", lw=0.8, label=f"T = {T_ms:g} ms")
    axes[0].set_ylabel("p99 latency, ms (200s)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("effective MRR@10")
    axes[2].set_ylabel("requests / s")
    axes[2].set_xlabel(f"seconds since the rush began ({WINDOW_S:g}-s windows)")
    for ax in axes:
        for _, lo, _ in bounds[1:]:
            ax.axvline(lo, color="grey", lw=0.5)
    axes[0].legend(fontsize=8, ncol=3)
    fig.suptitle("Rush (Locust, closed loop): elastic against static SubLMs on one TorchServe")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="The rush replay for elastic and static servers, in one figure.")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--levels", type=int, nargs="+", default=[50, 20, 5], help="static levels beside elastic")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    cfg = load_config(a.config)
    T = cfg.serve.latency_constraint_ms
    work = (cfg.run / "rush").resolve()
    store = work / "store"
    base = build_model(cfg, store, "no-archive")
    servers = {"elastic": model_variant(base, store, "elastic-rush", {"latency_constraint_ms": T})}
    for lv in a.levels:
        servers[f"static {lv} %"] = model_variant(base, store, f"static{lv}-rush",
                                                  {"latency_constraint_ms": T, "pin_level": lv})
    ld = cfg.load
    bounds = phases(ld.ramp_up_s, ld.hold_s, ld.ramp_down_s, ld.tail_s)
    qrels = read_qrels(cfg.data.qrels)
    series, table = {}, []
    for name, model_dir in servers.items():
        out = work / model_dir.name
        run_online(cfg, model_dir, a.queries or cfg.data.dev_queries, cfg.data.qrels, None, out)
        rows = read_requests(out / "requests.csv", set(qrels))
        series[name] = rows
        for ph, lo, hi in bounds + [("overall", 0.0, float("inf"))]:
            sel = [r for r in rows if lo <= r["t"] < hi]
            if sel:
                table.append({"server": name, "phase": ph, **phase_row(sel, T)})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rush.json").write_text(json.dumps({"latency_constraint_ms": T, "rows": table}, indent=1) + "\n")
    lines = ["# Rush: elastic against static SubLMs", "",
             f"`python -m benchmarks.rush {' '.join(sys.argv[1:])}`: the Locust rush of benchmarks/online.py "
             f"({ld.peak_users} users at the peak; {ld.ramp_up_s:g} s up, {ld.hold_s:g} s hold, {ld.ramp_down_s:g} s "
             f"down, {ld.tail_s:g} s tail), T = {T:g} ms, each server in turn on one TorchServe (CPU 0), Locust on "
             "CPU 1. Closed loop: a shed request (503) frees its user sooner, so request counts differ by server.", "",
             "| server | phase | requests | ok | shed | p50 ms | p99 ms | within T | MRR@10 | effective MRR@10 | mean level |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['server']} | {r['phase']} | {r['requests']} | {r['ok']} | {r['shed']} | {r['p50_ms']} | {r['p99_ms']} "
              f"| {r['within_T']} | {r['mrr_at_10']} | {r['effective_mrr_at_10']} | {r['mean_level']} |" for r in table]
    lines += ["", "![rush](rush.png)"]
    (a.out / "rush.md").write_text("\n".join(lines) + "\n")
    plot(series, T, bounds, a.out / "rush.png")
    print(f"[rush] wrote {a.out / 'rush.json'}, rush.md and rush.png", flush=True)


if __name__ == "__main__":
    main()
