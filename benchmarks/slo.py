"""Open-loop SLO benchmark: every server at fixed Poisson rates and latency constraints T.

    python -m benchmarks.slo --config configs/demo.yaml [--T 25 50 100] [--rates 50 100 200 300 400]
        [--servers elastic elastic-paper static noop] [--static-levels 50 30 20 10 5]
        [--duration-s 30] [--warmup-s 5] [--startup-warmup-s 10] [--repeats 3] [--repeat-T 50] [--out benchmarks/results]
        [--worker-nice -10] [--handler max_utilization=0.9 ...] [--work slo]

Servers, all on the same TorchServe and batching (serve.batch_size, serve.max_batch_delay_ms):
- elastic: the deadline rule with shedding (the default handler settings);
- elastic-paper: the paper's rule (g+1)·t_k <= T, serving late requests (the previous server);
- static: one pinned level (handler.pin_level), same deadline-based shedding as elastic;
- pipeline: the two-stage pipeline (elasticpipeline: this recipe's ElasticDenser, then the
  ElasticRanker of --pipeline-config over its top K, one schedule choosing (denser level, ranker
  level, K) per batch; elastic/service.ElasticPipelineServer), same deadline rule and shedding as
  elastic; its "mean_level" is the mean configuration number (N = best), not a percent;
- noop: benchmarks/noop_handler.py, no model: the ceiling of the serving stack (independent of T,
  so one run per rate is scored against every T).

All servers are registered side by side in one TorchServe on CPU 0 (``interleaved``), each
measuring its t_k at registration (handler.calibration_cache off: no idle worker re-measures in
the background while another is under test); the rates
run in ascending order, and at each rate every server in turn (a rotating order), each run a
warm-up then a measured window of Locust (benchmarks/openloop.py) pinned to CPU 1. A server
leaves the sweep after the first rate where within_T < --stop-below (it has collapsed). Then the
rate of each server's capacity (the highest with within_T >= 0.99) and the next one are run
--repeats times in all, for the constraints in --repeat-T, interleaved the same way.

Writes into --out:
- slo.json: one row per run with exactly the keys of ``ROW_KEYS``;
- slo.md: the sustainable rate of each server at each T (the highest rate where every run had
  within_T >= 0.99), the spread of the repeated points, and the full table;
- slo_within_T.png and slo_effective_mrr.png: against rate, one line per server, one panel per T.

and into the work folder (--work, run_dir/slo by default) the raw runs, one JSON line per request
(``<server>/raw-<rate>-<pass>.jsonl``), and each server's describe.json at registration and
describe_end.json after its last run; a later invocation with the same work folder overwrites them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archive.build_mar import build_noop_mar
from archive.build_mar import run as build_model
from benchmarks.report import with_rr
from benchmarks.server import ROOT, TorchServe, model_variant, pinned
from elastic.data import read_qrels
from training.config import RecipeConfig, load_config

ROW_KEYS = ("server", "level", "T_ms", "rate_rps", "requests", "ok", "shed", "errors", "p50_ms", "p99_ms", "within_T",
            "windows_ok", "mrr_at_10", "effective_mrr_at_10", "mean_level")
SERVERS = ("elastic", "elastic-paper", "static", "pipeline", "noop")


@dataclass(frozen=True)
class Server:
    """One server configuration: kind (SERVERS), pinned level (static only), T (None for noop),
    and for an elastic variant one handler setting (key, value) that differs from the default."""

    kind: str
    level: int | None = None
    T_ms: float | None = None
    variant: tuple[str, object] | None = None

    @property
    def name(self) -> str:
        """The TorchServe model name (letters, digits, - and _)."""
        t = "" if self.T_ms is None else f"-T{self.T_ms:g}"
        v = "" if self.variant is None else "-" + f"{self.variant[0]}{self.variant[1]}".replace(".", "p")
        return f"{self.kind}{self.level or ''}{v}{t}"

    @property
    def label(self) -> str:
        """slo.json's "server": the kind, with an elastic variant's setting."""
        return self.kind if self.variant is None else f"{self.kind} {self.variant[0]}={self.variant[1]}"

    def handler_settings(self) -> dict:
        if self.kind in ("elastic", "pipeline"):
            return {"latency_constraint_ms": self.T_ms, "schedule": "deadline", "late_requests": "shed",
                    **dict([self.variant] if self.variant else [])}
        if self.kind == "elastic-paper":
            return {"latency_constraint_ms": self.T_ms, "schedule": "paper", "late_requests": "serve"}
        if self.kind == "static":
            return {"latency_constraint_ms": self.T_ms, "schedule": "deadline", "late_requests": "shed",
                    "pin_level": self.level}
        return {}


def score(records: list[dict], T_ms: float, duration_s: float, qrels: dict, server: Server, rate: float) -> dict:
    """One row of slo.json from the raw records of one run (measured window only).

    within_T: answers 200 within T / requests. windows_ok: share of 1-s windows (by scheduled send)
    whose p99 is <= T, counting shed, failed and late requests as over T. mrr_at_10: over 200
    answers; effective_mrr_at_10: over every request, late, shed or failed ones scoring 0.
    """
    recs = [r for r in records if 0 <= r["scheduled_s"] < duration_s]
    rows = with_rr(recs, qrels)
    n = len(rows)
    ok = [r for r in rows if r["status"] == 200]
    in_time = [r for r in ok if r["latency_ms"] <= T_ms]
    lat = np.array([r["latency_ms"] for r in ok]) if ok else None
    rr_ok = [r["rr_at_10"] for r in ok if r["rr_at_10"] is not None]
    judged = sum(r["qid"] in qrels for r in rows)
    windows = {}
    for r in rows:
        w = windows.setdefault(int(r["scheduled_s"]), [0, 0])
        w[0] += 1
        w[1] += r["status"] == 200 and r["latency_ms"] <= T_ms
    levels = [r["level"] for r in ok if r["level"] is not None]
    row = {
        "server": server.label, "level": server.level, "T_ms": T_ms, "rate_rps": rate, "requests": n, "ok": len(ok),
        "shed": sum(r["status"] == 503 for r in rows), "errors": sum(r["status"] not in (200, 503) for r in rows),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if ok else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if ok else None,
        "within_T": round(len(in_time) / n, 4) if n else None,
        "windows_ok": round(sum(good >= math.ceil(0.99 * tot) for tot, good in windows.values()) / len(windows), 4)
        if windows else None,
        "mrr_at_10": round(float(np.mean(rr_ok)), 4) if rr_ok else None,
        "effective_mrr_at_10": round(sum(r["rr_at_10"] or 0.0 for r in in_time) / judged, 4) if judged else None,
        "mean_level": round(float(np.mean(levels)), 2) if levels else None,
    }
    assert tuple(row) == ROW_KEYS
    return row


def read_raw(raw: Path) -> list[dict]:
    """The records of one raw run (JSON lines, benchmarks/openloop.py)."""
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]


def raw_runs(work: Path, rates: list[float] | None = None):
    """(server folder, offered rate in req/s, pass from 1, raw file) of every run that ``sweep`` left
    under ``work`` (``<server>/raw-<rate>-<pass>.jsonl``), by server, then rate, then pass; only
    ``rates`` when given."""
    for d in sorted(p for p in work.iterdir() if p.is_dir()):
        for raw in sorted(d.glob("raw-*.jsonl"), key=lambda p: [float(x) for x in re.findall(r"[\d.]+", p.stem)]):
            rate, rep = re.fullmatch(r"raw-([\d.]+)-(\d+)", raw.stem).groups()
            if not rates or float(rate) in rates:
                yield d, float(rate), int(rep) + 1, raw


def run_rate(url_host: str, model: str, queries: str, rate: float, a, raw: Path,
             duration_s: float | None = None) -> list[dict]:
    """One open-loop run (Locust on CPU 1): --warmup-s, then ``duration_s`` (default
    --duration-s) measured seconds; returns its raw records."""
    duration_s = a.duration_s if duration_s is None else duration_s
    cmd = pinned([sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "openloop.py"), "--headless",
                  "-u", "1", "-r", "1", "--only-summary", "--loglevel", "ERROR", "--host", url_host,
                  "--queries", queries, "--model-name", model, "--rate", str(rate), "--warmup-s", str(a.warmup_s),
                  "--duration-s", str(duration_s), "--drain-s", str(a.drain_s), "--raw-out", str(raw)], "1")
    with open(raw.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       timeout=a.warmup_s + duration_s + a.drain_s + 60)
    return read_raw(raw)


@contextlib.contextmanager
def serving(cfg: RecipeConfig, store: Path, model_dir: str, work: Path):
    """TorchServe on CPU 0 with one model registered as ``elastic``; stopped on exit."""
    s = cfg.serve
    ts = TorchServe(ROOT / "config.properties", store, {"elastic": model_dir}, work,
                    f"http://127.0.0.1:{s.management_port}")
    ts.start(cpus="0")
    try:
        ts.wait_ready("elastic")
        yield ts
    finally:
        ts.stop()
        time.sleep(1.0)


def sweep(cfg: RecipeConfig, server: Server, model_dir: str, store: Path, work: Path, a, qrels: dict,
          Ts: list[float]) -> list[dict]:
    """All rates (and repeats) of one server; rows for each T in ``Ts`` (several only for noop)."""
    rows: list[dict] = []
    host = f"http://127.0.0.1:{cfg.serve.inference_port}"
    queries = a.queries or cfg.data.dev_queries
    with serving(cfg, store, model_dir, work / server.name) as ts:
        if server.kind != "noop":
            (work / server.name / "describe.json").write_text(json.dumps(ts.describe("elastic"), indent=1))

        def one(rate: float, rep: int) -> list[dict]:
            raw = work / server.name / f"raw-{rate:g}-{rep}.jsonl"
            recs = run_rate(host, "elastic", queries, rate, a, raw)
            out = [score(recs, T, a.duration_s, qrels, server, rate) for T in Ts]
            for r in out:
                print(f"[slo] {server.name:>22} T={r['T_ms']:>4g} rate={rate:>5g} within_T={r['within_T']} "
                      f"shed={r['shed']} p99={r['p99_ms']} eff_mrr={r['effective_mrr_at_10']} "
                      f"level={r['mean_level']}", flush=True)
            return out

        main_T = Ts[0]
        done = []
        for rate in a.rates:
            out = one(rate, 0)
            rows += out
            done.append(rate)
            if next(r for r in out if r["T_ms"] == main_T)["within_T"] < a.stop_below:
                break
        if a.repeats > 1 and any(T in a.repeat_T for T in Ts):
            T = next(T for T in Ts if T in a.repeat_T)
            held = [r["rate_rps"] for r in rows if r["T_ms"] == T and r["within_T"] >= 0.99]
            cap = max(held) if held else done[0]
            nxt = [r for r in done if r > cap][:1]
            for rate in [cap] + nxt:
                for rep in range(1, a.repeats):
                    rows += one(rate, rep)
        if server.kind != "noop":  # the schedule's learned state (o, c) and counters after the runs
            (work / server.name / "describe_end.json").write_text(json.dumps(ts.describe("elastic"), indent=1))
    return rows


def rotated(xs: list, k: int) -> list:
    """``xs`` started at its element k (mod len): the order of the servers at the k-th rate."""
    return xs[k % len(xs):] + xs[:k % len(xs)] if xs else list(xs)


def repeat_points(ran: dict[Server, list[tuple[float, float]]], repeat_T: list[float]) -> dict[Server, set[float]]:
    """The rates to run again per server: its capacity (the highest rate of pass 1 with within_T
    >= 0.99, else its lowest rate) and the next rate it ran. ``ran``: per server, (rate, within_T
    at its own T) of pass 1 in ascending rate; servers with a T not in ``repeat_T`` are left out
    (noop, whose T is None, always counts)."""
    points: dict[Server, set[float]] = {}
    for spec, done in ran.items():
        if not done or (spec.T_ms is not None and spec.T_ms not in repeat_T):
            continue
        held = [rate for rate, w in done if w >= 0.99]
        cap = max(held) if held else done[0][0]
        points[spec] = {cap, *[rate for rate, _ in done if rate > cap][:1]}
    return points


def interleaved(cfg: RecipeConfig, specs: list[Server], store: Path, work: Path, a, qrels: dict) -> list[dict]:
    """Every server of ``specs`` side by side: one TorchServe on CPU 0 with each server registered
    as its own model (one worker each, registered one after another so no calibration shares the
    core), then for each rate every server in turn, the order rotating from rate to rate. The
    machine is shared and its speed drifts over minutes; running the servers of a rate back to
    back lets that drift fall on all of them alike, where one server's whole sweep after another's
    would compare different minutes.

    Pass 1 runs every rate for every server, leaving out a server's rates after the first where its
    within_T (at its own T; noop at the first T) fell below --stop-below. Passes 2..--repeats run
    again, for each server, the rate of its capacity (the highest with within_T >= 0.99) and the
    next rate it ran, interleaved the same way. Rows for noop are scored at every T of ``a.T``.
    """
    host = f"http://127.0.0.1:{cfg.serve.inference_port}"
    queries = a.queries or cfg.data.dev_queries
    # TorchServe's own folder (logs, tmp, its working directory) is apart from the servers' result
    # folders: it resolves a registered url against its working directory before the model store,
    # and a result folder named like a model would shadow it
    ts = TorchServe(ROOT / "config.properties", store, {}, work / "torchserve",
                    f"http://127.0.0.1:{cfg.serve.management_port}")
    rows: list[dict] = []
    ts.start(cpus="0")
    try:
        ts.wait_up()
        for spec in specs:
            ts.register(spec.name, spec.name)
            print(f"[slo] registered {spec.name}", flush=True)
            (work / spec.name).mkdir(parents=True, exist_ok=True)  # its raw runs and schedule state
            if spec.kind != "noop":
                (work / spec.name / "describe.json").write_text(json.dumps(ts.describe(spec.name), indent=1))
        # every server once at the lowest rate, unscored: the first run after TorchServe started
        # was slow for its whole 30 s (README "Under load", the standing-queue probes)
        if a.startup_warmup_s > 0:
            for spec in specs:
                run_rate(host, spec.name, queries, min(a.rates), a, work / spec.name / "startup-warmup.jsonl",
                         a.startup_warmup_s)
                ts.wait_drained(spec.name)
            print(f"[slo] warmed every server up for {a.startup_warmup_s:g} s at {min(a.rates):g} req/s", flush=True)

        def one(spec: Server, rate: float, rep: int) -> list[dict]:
            raw = work / spec.name / f"raw-{rate:g}-{rep}.jsonl"
            recs = run_rate(host, spec.name, queries, rate, a, raw)
            waited = ts.wait_drained(spec.name)  # nothing left over for the next run to compete with
            if waited > 1:
                print(f"[slo] {spec.name}: {waited:.0f} s until its queue drained after {rate:g} req/s", flush=True)
            Ts = a.T if spec.T_ms is None else [spec.T_ms]
            out = [score(recs, T, a.duration_s, qrels, spec, rate) for T in Ts]
            for r in out:
                print(f"[slo] {spec.name:>22} T={r['T_ms']:>4g} rate={rate:>5g} pass={rep + 1} "
                      f"within_T={r['within_T']} shed={r['shed']} p99={r['p99_ms']} eff_mrr={r['effective_mrr_at_10']} "
                      f"level={r['mean_level']}", flush=True)
            rows.extend(out)
            # partial results survive a stop
            (a.out / "slo.json").write_text(json.dumps(a.prior + rows, indent=1) + "\n")
            return out

        ran: dict[Server, list[tuple[float, float]]] = {spec: [] for spec in specs}  # (rate, within_T at its main T)
        for i, rate in enumerate(a.rates):
            for spec in rotated([sp for sp in specs if not any(w < a.stop_below for _, w in ran[sp])], i):
                out = one(spec, rate, 0)
                main_T = a.T[0] if spec.T_ms is None else spec.T_ms
                ran[spec].append((rate, next(r["within_T"] for r in out if r["T_ms"] == main_T)))
        points = repeat_points(ran, a.repeat_T)
        for rep in range(1, a.repeats):
            for i, rate in enumerate(a.rates):
                for spec in rotated([sp for sp in specs if rate in points.get(sp, ())], i + rep):
                    one(spec, rate, rep)
        for spec in specs:  # the schedule's learned state (o, c) and counters after the runs
            if spec.kind != "noop":
                (work / spec.name / "describe_end.json").write_text(json.dumps(ts.describe(spec.name), indent=1))
    finally:
        ts.stop()
        time.sleep(1.0)
    return rows


def sustainable(rows: list[dict], server: str, level, T: float) -> float | None:
    """Highest rate at which, and at every lower rate run, every run of (server, level, T) had
    within_T >= 0.99 (a rate held after a lower one failed does not count: the lower one shows
    the server does not hold that load reliably)."""
    by_rate: dict[float, list[float]] = {}
    for r in rows:
        if r["server"] == server and r["level"] == level and r["T_ms"] == T:
            by_rate.setdefault(r["rate_rps"], []).append(r["within_T"])
    held = None
    for rate in sorted(by_rate):
        if min(by_rate[rate]) < 0.99:
            break
        held = rate
    return held


def server_order(server: str) -> tuple[int, str]:
    """Sort key of a row's "server": the order of SERVERS, an elastic variant after elastic."""
    return SERVERS.index(server.split()[0]), server


def label(server: str, level) -> str:
    return f"static {level} %" if server == "static" else server


def write_report(rows: list[dict], out: Path, meta: dict) -> None:
    """slo.md and the two plots from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sorted({r["T_ms"] for r in rows})
    servers = sorted({(r["server"], r["level"]) for r in rows},
                     key=lambda s: (server_order(s[0]), -(s[1] or 0)))
    lines = ["# Open-loop SLO benchmark", "", meta["how"], "",
             "## Sustainable rate (req/s): the highest offered rate where every run kept within_T >= 0.99", "",
             "| server | " + " | ".join(f"T = {T:g} ms" for T in Ts) + " |", "| --- |" + " --- |" * len(Ts)]
    for s, lv in servers:
        cells = []
        for T in Ts:
            v = sustainable(rows, s, lv, T)
            cells.append("below the lowest rate" if v is None else f"{v:g}")
        lines.append(f"| {label(s, lv)} | " + " | ".join(cells) + " |")
    lines += ["", "## Repeated points (spread over runs)", "",
              "| server | T ms | rate | runs | within_T min–max | effective MRR@10 min–max | p99 ms min–max |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["level"], r["T_ms"], r["rate_rps"]), []).append(r)
    for (s, lv, T, rate), g in sorted(groups.items(), key=lambda kv: (server_order(kv[0][0]), -(kv[0][1] or 0),
                                                                          kv[0][2], kv[0][3])):
        if len(g) > 1:
            def rng(k):
                vals = [x[k] for x in g if x[k] is not None]
                return f"{min(vals):g}–{max(vals):g}" if vals else "–"
            lines.append(f"| {label(s, lv)} | {T:g} | {rate:g} | {len(g)} | {rng('within_T')} | "
                         f"{rng('effective_mrr_at_10')} | {rng('p99_ms')} |")
    lines += ["", "## Every run", "", "| " + " | ".join(ROW_KEYS) + " |", "|" + " --- |" * len(ROW_KEYS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[k] is None else str(r[k]) for k in ROW_KEYS) + " |")
    (out / "slo.md").write_text("\n".join(lines) + "\n")

    for key, fname, ylabel in (("within_T", "slo_within_T.png", "within T (share of requests)"),
                               ("effective_mrr_at_10", "slo_effective_mrr.png", "effective MRR@10")):
        fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 4), sharey=True, squeeze=False)
        for ax, T in zip(axes[0], Ts):
            for s, lv in servers:
                pts: dict[float, list[float]] = {}
                for r in rows:
                    if r["server"] == s and r["level"] == lv and r["T_ms"] == T and r[key] is not None:
                        pts.setdefault(r["rate_rps"], []).append(r[key])
                if pts:
                    xs = sorted(pts)
                    style = "-" if s.startswith("elastic") else ("--" if s == "static" else ":")
                    ax.plot(xs, [np.median(pts[x]) for x in xs], style, marker="o", ms=3, label=label(s, lv))
            if key == "within_T":
                ax.axhline(0.99, color="grey", lw=0.6)
            ax.set_title(f"T = {T:g} ms")
            ax.set_xlabel("offered rate (req/s)")
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def prepare_store(cfg: RecipeConfig, name: str) -> tuple[Path, Path, Path]:
    """(work, store, base): run_dir/<name> as the work folder (``name`` absolute: itself), its
    model store with the recipe's model as a no-archive directory ``base`` (variants are
    hard-linked copies, model_variant) and the no-op model, both with the recipe's batching."""
    work = (cfg.run / name).resolve()
    store = work / "store"
    base = build_model(cfg, store, "no-archive")
    build_noop_mar(store, cfg.serve.batch_size, cfg.serve.max_batch_delay_ms)
    return work, store, base


def handler_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value parsed as YAML); the handler validates it at load, naming the field."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description="Open-loop SLO benchmark of elastic, paper-rule, static and no-op servers.")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--T", type=float, nargs="+", default=[50.0, 25.0, 100.0], help="latency constraints, ms")
    ap.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 300, 400],
                    help="offered rates, requests per second (ascending)")
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--static-levels", type=int, nargs="+", default=[50, 30, 20, 10, 5])
    ap.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per run")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="seconds of load before each measured window")
    ap.add_argument("--startup-warmup-s", type=float, default=10.0,
                    help="seconds each server is run, unscored, at the lowest rate after TorchServe starts (0 = none)")
    ap.add_argument("--drain-s", type=float, default=10.0, help="seconds to wait for answers after the last send")
    ap.add_argument("--stop-below", type=float, default=0.5, help="stop a server's sweep after within_T < this")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the points at and past each server's capacity")
    ap.add_argument("--repeat-T", type=float, nargs="+", default=[50.0], help="constraints whose capacity is repeated")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--worker-nice", type=int, help="handler.worker_nice of every model server (default: serve.worker_nice)")
    ap.add_argument("--handler", nargs="+", type=handler_setting, default=[], metavar="KEY=VALUE",
                    help="extra handler settings of every model server, e.g. max_utilization=0.9 (elastic/service.py)")
    ap.add_argument("--elastic-variants", nargs="+", type=handler_setting, default=[], metavar="KEY=VALUE",
                    help="one more elastic server per KEY=VALUE, with that handler setting (e.g. max_utilization=0.85)")
    ap.add_argument("--pipeline-config", help="recipe YAML of the ElasticRanker and its run_dir/pipeline/pipeline.json "
                    "(benchmarks.pipeline_quality), for the pipeline server (its denser is this --config's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", default="slo",
                    help="work folder under the recipe's run_dir (or a path) for the model store, the raw runs "
                         "(<server>/raw-<rate>-<pass>.jsonl) and each server's describe.json; a probe given its "
                         "own keeps a sweep's raw runs, which benchmarks.overhead and benchmarks.batch_excess "
                         "read (--runs), from being overwritten")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --out/slo.json")
    ap.add_argument("--report-only", metavar="HOW", help="write slo.md and the plots from --out/slo.json as it is "
                                                         "(e.g. after a stopped run), HOW being the line on how it ran")
    a = ap.parse_args()
    if a.report_only:
        write_report(json.loads((a.out / "slo.json").read_text()), a.out, {"how": a.report_only})
        print(f"[slo] wrote {a.out / 'slo.md'} and plots from {a.out / 'slo.json'}", flush=True)
        return
    a.handler = dict(a.handler)
    if sorted(a.rates) != list(a.rates) or min(a.rates) <= 0:
        raise SystemExit("--rates: expected positive rates in ascending order")
    if min(a.T) <= 0 or a.duration_s <= 0 or a.warmup_s < 0 or a.startup_warmup_s < 0 or a.repeats < 1:
        raise SystemExit("--T, --duration-s must be > 0, --warmup-s and --startup-warmup-s >= 0, --repeats >= 1")
    if "pipeline" in a.servers and not a.pipeline_config:
        raise SystemExit("--servers pipeline: needs --pipeline-config (the ElasticRanker's recipe)")
    cfg = load_config(a.config)
    s = cfg.serve
    work, store, base = prepare_store(cfg, a.work)
    pipeline_base = None
    if "pipeline" in a.servers:
        from archive.build_mar import run_pipeline

        pipeline_base = run_pipeline(load_config(a.pipeline_config), cfg.run, store, "no-archive")
    qrels = read_qrels(cfg.data.qrels)
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = json.loads((a.out / "slo.json").read_text()) if a.append and (a.out / "slo.json").exists() else []
    t0 = time.time()
    # every worker measures t_k at its registration, one after another; a stored calibration would
    # be re-measured in the background by each idle worker, on the core of the server under test
    # (seen: the first pass at 50 req/s lost up to 15 % of its requests, the no-op server's too)
    extra = {"calibration_cache": False}
    if a.worker_nice is not None:
        extra["worker_nice"] = a.worker_nice
    extra.update(a.handler)
    specs = [Server("noop")] if "noop" in a.servers else []
    for T in a.T:
        specs += [Server(k, None, T) for k in ("elastic", "elastic-paper") if k in a.servers]
        specs += [Server("elastic", None, T, v) for v in a.elastic_variants]
        if "pipeline" in a.servers:
            specs.append(Server("pipeline", None, T))
        if "static" in a.servers:
            specs += [Server("static", lv, T) for lv in a.static_levels]
    for spec in specs:
        if spec.kind != "noop":
            model_variant(pipeline_base if spec.kind == "pipeline" else base, store, spec.name,
                          {**spec.handler_settings(), **extra})
    a.prior = rows
    rows = rows + interleaved(cfg, specs, store, work, a, qrels)
    (a.out / "slo.json").write_text(json.dumps(rows, indent=1) + "\n")
    how = (f"`python -m benchmarks.slo {' '.join(sys.argv[1:])}` (last invocation) on this 2-core machine: "
           "one TorchServe (frontend and a worker per server, each calibrated at registration) on CPU 0, the "
           "servers interleaved at each rate, "
           f"Locust open-loop Poisson arrivals on CPU 1; worker nice "
           f"{extra.get('worker_nice', cfg.serve.worker_nice)}; batchSize {s.batch_size}, maxBatchDelay "
           f"{s.max_batch_delay_ms} ms; each server first run {a.startup_warmup_s:g} s unscored at "
           f"{min(a.rates):g} req/s after the start; {a.warmup_s:g} s warm-up + {a.duration_s:g} s measured per run; "
           f"{(time.time() - t0) / 60:.0f} min in all. Static servers pin one level and shed like elastic; "
           "elastic-paper is the paper's rule serving late requests; noop has no model (one run scored at every T).")
    write_report(rows, a.out, {"how": how})
    print(f"[slo] wrote {a.out / 'slo.json'}, slo.md and plots", flush=True)


if __name__ == "__main__":
    main()
