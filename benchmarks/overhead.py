"""Cost per request outside the model forward, against the no-op handler on the same stack.

    python -m benchmarks.overhead --config configs/demo.yaml [--rates 20 100] [--levels 5 50]
        [--duration-s 20] [--warmup-s 3] [--T 50] [--out benchmarks/results]

Servers, one after the other on the same TorchServe and batching as the SLO benchmark
(TorchServe on CPU 0, Locust open-loop Poisson arrivals on CPU 1): noop (no model: what the
frontend, IPC and JSON cost), static levels (``--levels``) and elastic at T. Each answer carries
``Server-Timing: model;dur=<ms>`` (the batch's encode + search in the handler), so per request

    outside_ms = client latency (from the scheduled send) - model_ms

is everything else: frontend, batching wait, IPC, request parsing, tokenizing, the schedule,
JSON. For noop outside_ms is the whole latency. For the model servers it is split further with
``wait;dur`` (the request's age when its batch began): wait_ms (before the handler: frontend,
batching delay, queueing behind earlier batches) and after_ms = latency - wait - handler (the
answer's way back through IPC and the frontend). ratio_p50 / ratio_p99 divide a server's outside_ms
percentiles by noop's latency percentiles at the same rate (issue target: <= 1.5).

outside_ms still holds the other batches' model time that a request waited behind in the queue:
at 100 req/s a request finds the worker in another batch's forward often, and noop, with no model,
never does. So per request

    net_ms = client latency - model_ms - queued_model_ms

where queued_model_ms is the model time of the other batches that ran while the request waited
(between its send and its batch's start). The batches are recovered from the answers, which share
their batch's model and handler durations (``benchmarks.way_back.batches``). net_ms is what the
serving stack costs a request beside the model forwards: frontend, IPC, batching delay, parsing,
tokenizing, the schedule, the other batches' handler time outside their model, JSON. net_ratio_p50
/ net_ratio_p99 divide its percentiles by noop's latency percentiles.

    python -m benchmarks.overhead --runs runs/demo/slo --T 50 --rates 50 100 200 [--levels 5 50]

reads the raw runs that ``benchmarks.slo`` left instead of running (servers interleaved there, so
the ratios do not carry the drift between runs one after another): one row per run.

Writes overhead.json (one row per server, rate and pass) and overhead.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.server import model_variant
from benchmarks.slo import Server, prepare_store, read_raw, run_rate, serving
from benchmarks.way_back import batches
from training.config import load_config

ROW_KEYS = ("server", "level", "rate_rps", "pass", "requests", "ok", "p50_ms", "p99_ms", "model_p50_ms",
            "outside_p50_ms", "outside_p90_ms", "outside_p99_ms", "wait_p50_ms", "wait_p99_ms", "after_p50_ms",
            "after_p99_ms", "queued_model_p50_ms", "net_p50_ms", "net_p99_ms", "ratio_p50", "ratio_p99",
            "net_ratio_p50", "net_ratio_p99", "mean_level")


def queued_model_ms(records: list[dict]) -> list[float]:
    """Per record (in order; 0 for one without Server-Timing): the model time, ms, of the other
    batches that ran between its send and its own batch's start, from the batches recovered by
    ``benchmarks.way_back.batches`` (each model ran over [end - model, end], epoch ms)."""
    spans = sorted((b["end"] - b["model"], b["end"], b["key"]) for b in batches(records))
    lo = np.array([a for a, _, _ in spans])
    # one worker runs one batch at a time, so the ends are sorted as the starts are, up to the
    # recovery's noise: the scan starts a few spans early and the test e > sent keeps it exact
    hi = np.maximum.accumulate(np.array([e for _, e, _ in spans])) if spans else np.array([])
    out = []
    for r in records:
        if r["status"] != 200 or r.get("wait_ms") is None or r.get("handler_ms") is None:
            out.append(0.0)
            continue
        sent = r["sent_epoch"] * 1000
        began = sent + r["wait_ms"]
        own = (r["model_ms"], r["handler_ms"])
        first = int(np.searchsorted(hi, sent, side="right"))
        out.append(sum(min(e, began) - max(a, sent) for a, e, key in spans[first:int(np.searchsorted(lo, began))]
                       if e > sent and key != own))
    return out


def summarize(records: list[dict], duration_s: float, server: Server, rate: float, rep: int = 1) -> dict:
    """One row from the raw records of one run (measured window only; 200 answers only); ``rep``
    is the pass (from 1) of that server at that rate.

    Raises:
        ValueError: a model server's answer without a Server-Timing model duration.
    """
    ok = [r for r in records if 0 <= r["scheduled_s"] < duration_s and r["status"] == 200]
    lat = np.array([r["latency_ms"] for r in ok], dtype=float)
    if server.kind == "noop":
        model = np.zeros(len(ok))
    else:
        missing = sum(r.get("model_ms") is None for r in ok)
        if missing:
            raise ValueError(f"{server.name}: {missing} of {len(ok)} answers have no Server-Timing model;dur")
        model = np.array([r["model_ms"] for r in ok], dtype=float)
    outside = lat - model
    queued = np.zeros(len(ok)) if server.kind == "noop" else np.array(queued_model_ms(ok))
    net = outside - queued
    # split for the model servers: wait (age when the batch began, from X-Request-Start) and after
    # (from the handler's answer to the client: frontend, IPC back, HTTP)
    timed = [r for r in ok if r.get("wait_ms") is not None and r.get("handler_ms") is not None]
    wait = np.array([r["wait_ms"] for r in timed], dtype=float)
    after = np.array([r["latency_ms"] - r["wait_ms"] - r["handler_ms"] for r in timed], dtype=float)

    def pct(x, q):
        return round(float(np.percentile(x, q)), 3) if len(x) else None

    levels = [r["level"] for r in ok if r.get("level") is not None]
    return {"server": server.kind, "level": server.level, "rate_rps": rate, "pass": rep,
            "requests": sum(0 <= r["scheduled_s"] < duration_s for r in records), "ok": len(ok),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "model_p50_ms": pct(model, 50),
            "outside_p50_ms": pct(outside, 50), "outside_p90_ms": pct(outside, 90), "outside_p99_ms": pct(outside, 99),
            "wait_p50_ms": pct(wait, 50), "wait_p99_ms": pct(wait, 99), "after_p50_ms": pct(after, 50),
            "after_p99_ms": pct(after, 99), "queued_model_p50_ms": pct(queued, 50),
            "net_p50_ms": pct(net, 50), "net_p99_ms": pct(net, 99),
            "ratio_p50": None, "ratio_p99": None, "net_ratio_p50": None, "net_ratio_p99": None, "mean_level": round(float(np.mean(levels)), 2) if levels else None}


def add_ratios(rows: list[dict]) -> None:
    """Fill ratio_p50 / ratio_p99 (outside_ms) and net_ratio_p50 / net_ratio_p99 (net_ms) over
    noop's latency at the same rate: its run of the same pass, else its first."""
    noop: dict = {}
    for r in rows:
        if r["server"] == "noop":
            noop.setdefault(r["rate_rps"], {})[r["pass"]] = r
    for r in rows:
        runs = noop.get(r["rate_rps"])
        base = runs and runs.get(r["pass"], runs[min(runs)])
        if base and base["p50_ms"] and r["outside_p50_ms"] is not None:
            r["ratio_p50"] = round(r["outside_p50_ms"] / base["p50_ms"], 3)
            r["ratio_p99"] = round(r["outside_p99_ms"] / base["p99_ms"], 3)
            r["net_ratio_p50"] = round(r["net_p50_ms"] / base["p50_ms"], 3)
            r["net_ratio_p99"] = round(r["net_p99_ms"] / base["p99_ms"], 3)


def write_md(rows: list[dict], out: Path, how: str) -> None:
    lines = ["# Cost per request outside the model forward, against the no-op handler", "", how, "",
             "outside = client latency - the batch's model time (Server-Timing); net = outside - the other batches' "
             "model time that the request waited behind (queued model); ratio = outside / noop latency, net ratio = "
             "net / noop latency, at the same rate (target <= 1.5).", "",
             "| server | rate req/s | pass | ok | latency p50 / p99 ms | model p50 ms | outside p50 / p90 / p99 ms | "
             "wait p50 / p99 ms | after p50 / p99 ms | queued model p50 ms | net p50 / p99 ms | ratio p50 / p99 | "
             "net ratio p50 / p99 | mean level |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = f"static {r['level']} %" if r["server"] == "static" else r["server"]
        lines.append(f"| {name} | {r['rate_rps']:g} | {r['pass']} | {r['ok']} | {r['p50_ms']} / {r['p99_ms']} "
                     f"| {r['model_p50_ms']} | {r['outside_p50_ms']} / {r['outside_p90_ms']} / {r['outside_p99_ms']} "
                     f"| {r['wait_p50_ms']} / {r['wait_p99_ms']} | {r['after_p50_ms']} / {r['after_p99_ms']} "
                     f"| {r['queued_model_p50_ms']} | {r['net_p50_ms']} / {r['net_p99_ms']} "
                     f"| {r['ratio_p50']} / {r['ratio_p99']} | {r['net_ratio_p50']} / {r['net_ratio_p99']} "
                     f"| {r['mean_level']} |")
    (out / "overhead.md").write_text("\n".join(lines) + "\n")


def from_runs(work: Path, specs: list[Server], rates: list[float]) -> list[dict]:
    """Rows from the raw runs that ``benchmarks.slo`` left under ``work``
    (``<server name>/raw-<rate>-<pass>.jsonl``), one per server, rate and pass.

    Raises:
        SystemExit: a server or rate with no raw run there.
    """
    rows = []
    for spec in specs:
        for rate in rates:
            raws = sorted((work / spec.name).glob(f"raw-{rate:g}-*.jsonl"))
            if not raws:
                raise SystemExit(f"--runs {work}: no raw run of {spec.name} at {rate:g} req/s "
                                 f"(expected {work / spec.name}/raw-{rate:g}-<pass>.jsonl)")
            for raw in raws:
                rep = int(raw.stem.rsplit("-", 1)[1]) + 1
                rows.append(summarize(read_raw(raw), float("inf"), spec, rate, rep))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="per-request cost outside the model forward, against the no-op handler")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0], help="offered rates, requests per second")
    ap.add_argument("--levels", type=int, nargs="+", default=[5, 50], help="static levels to measure")
    ap.add_argument("--T", type=float, default=50.0, help="latency constraint of the static and elastic servers, ms")
    ap.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per run")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="seconds of load before each measured window")
    ap.add_argument("--drain-s", type=float, default=5.0, help="seconds to wait for answers after the last send")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--runs", type=Path, help="score the raw runs that benchmarks.slo left in this work folder "
                    "(e.g. runs/demo/slo) instead of running; every pass there")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    if min(a.rates) <= 0 or a.duration_s <= 0 or a.T <= 0:
        raise SystemExit("--rates, --duration-s and --T must be > 0")
    if not a.runs and not a.config:
        raise SystemExit("give --config RECIPE to run the servers, or --runs DIR to score benchmarks.slo's raw runs")
    specs = [Server("noop")] + [Server("static", lv, a.T) for lv in a.levels] + [Server("elastic", None, a.T)]
    t0 = time.time()
    if a.runs:
        rows = from_runs(a.runs, specs, a.rates)
        how = (f"`python -m benchmarks.overhead {' '.join(sys.argv[1:])}`: the raw runs of `benchmarks.slo` in "
               f"{a.runs} (servers interleaved at each rate, TorchServe on CPU 0, Locust open-loop Poisson on CPU 1; "
               "the whole of each run after its warm-up).")
    else:
        cfg = load_config(a.config)
        s = cfg.serve
        work, store, base = prepare_store(cfg, "overhead")
        queries = a.queries or cfg.data.dev_queries
        host = f"http://127.0.0.1:{s.inference_port}"
        rows = []
        for spec in specs:
            name = "noop" if spec.kind == "noop" else spec.name
            if spec.kind != "noop":
                model_variant(base, store, name, spec.handler_settings())
            with serving(cfg, store, name, work / name):
                for rate in a.rates:
                    recs = run_rate(host, "elastic", queries, rate, a, work / name / f"raw-{rate:g}.jsonl")
                    rows.append(summarize(recs, a.duration_s, spec, rate))
                    print(f"[overhead] {rows[-1]}", flush=True)
        how = (f"`python -m benchmarks.overhead {' '.join(sys.argv[1:])}`: TorchServe on CPU 0, Locust open-loop "
               f"Poisson on CPU 1, batchSize {s.batch_size}, maxBatchDelay {s.max_batch_delay_ms} ms, servers one after "
               f"another, {a.warmup_s:g} s warm-up + {a.duration_s:g} s measured per run, "
               f"{(time.time() - t0) / 60:.0f} min in all.")
    add_ratios(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, a.out, how)
    print(f"[overhead] wrote {a.out / 'overhead.json'} and overhead.md", flush=True)


if __name__ == "__main__":
    main()
