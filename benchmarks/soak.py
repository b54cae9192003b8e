"""Fault and soak test: open-loop load for minutes, one worker killed in the middle, every answer
checked against the offline answer of the level it reports.

    python -m benchmarks.soak --config configs/demo.yaml [--duration-s 600] [--rate R] [--workers 2]
        [--T 50] [--out benchmarks/results]

- The recipe's model (run_dir/elastic, run_dir/index) is packed as a no-archive directory with
  --workers workers and T, served by one TorchServe on CPU 0 (``config.properties``).
- Locust (benchmarks/openloop.py) sends Poisson arrivals at --rate from CPU 1, each with its
  X-Request-Start, replaying the recipe's dev queries. The default rate is twice the sustainable
  rate of the static 50 % level at this T in benchmarks/results/slo.json (100 req/s if none).
- Half-way through the measured window one worker gets SIGKILL (the first one the management API
  lists). TorchServe restarts it; the others keep serving.
- The workers' RSS (sum over the model's workers, /proc/<pid>/status) is sampled every 10 s,
  and /metrics is scraped once, a quarter of the window after the kill.
- Offline answers: the queries encoded at every level by ElasticEncoder.encode (the offline
  evaluation path, truncated to query_max_length) and scored exactly against every passage
  vector of index.faiss. An OK answer is right when its pids are distinct and each has an
  offline score within 1e-4 of the k-th best, in non-increasing order (ties within 1e-4 may swap).

Writes into --out:
- soak.json with exactly the keys of ``KEYS``: duration_s, rate_rps, requests (sent in the
  measured window), ok (200), shed (503), errors (any other status), lost (no answer at all),
  wrong (200 answers that differ from the offline answer), worker_kills, recovery_s (from the kill
  to the send of the first request after it answered 200 within T), rss_mib_start / rss_mib_end
  (first and last sample of the window), within_T (share of requests answered 200 within T);
- soak.md: those figures, the killed worker's time until READY again, every status seen, 503s
  without Retry-After, the RSS samples and how it ran;
- metrics.txt: the one scrape of /metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from archive.build_mar import run as build_model
from benchmarks.server import ROOT, TorchServe, model_variant, pinned
from elastic.data import read_tsv
from training.config import load_config

KEYS = ("duration_s", "rate_rps", "requests", "ok", "shed", "errors", "lost", "wrong", "worker_kills", "recovery_s",
        "rss_mib_start", "rss_mib_end", "within_T")
TIE_TOL = 1e-4
RSS_EVERY_S = 10.0


def default_rate(slo_json: Path, T_ms: float, fallback: float = 100.0) -> float:
    """Twice the static 50 % level's sustainable rate at T (the highest rate where every run kept
    within_T >= 0.99) in slo.json, else ``fallback``."""
    if not slo_json.exists():
        return fallback
    rows = [r for r in json.loads(slo_json.read_text()) if r["server"] == "static" and r["level"] == 50
            and r["T_ms"] == T_ms]
    rates = sorted({r["rate_rps"] for r in rows})
    ok = [rate for rate in rates if all(r["within_T"] is not None and r["within_T"] >= 0.99
                                        for r in rows if r["rate_rps"] == rate)]
    return 2 * max(ok) if ok else fallback


def offline_scores(model_dir: Path, queries: dict[str, str], max_length: int) -> tuple[dict[int, np.ndarray],
                                                                                         dict[str, int], list[str]]:
    """(level -> (Q, N) exact inner products of every query with every indexed passage, qid -> row,
    pids): the offline answer of each level, from the model directory that is served."""
    import faiss

    from elastic.encoder import ElasticEncoder

    enc = ElasticEncoder(model_dir)
    index = faiss.read_index(str(model_dir / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal)  # (N, d)
    pids = (model_dir / "pids.txt").read_text().split()
    qids = list(queries)
    texts = [queries[q] for q in qids]
    out = {}
    for level in enc.levels:
        q = enc.encode(texts, level, max_length, 128, query=True).numpy()  # (Q, d), as served
        out[level] = q @ vectors.T  # (Q, N)
    return out, {q: i for i, q in enumerate(qids)}, pids


def answer_is_right(scores: np.ndarray, served: list[int], k: int, tol: float = TIE_TOL) -> bool:
    """Whether ``served`` (passage rows, best first) is a top-``k`` of ``scores`` (N,) up to ties
    within ``tol``: min(k, N) distinct rows, each scoring at least the k-th best - tol, in an order
    whose scores never rise by more than tol."""
    k = min(k, scores.shape[0])
    if len(served) != k or len(set(served)) != k or any(not 0 <= j < scores.shape[0] for j in served):
        return False
    kth = np.partition(scores, -k)[-k]
    s = scores[served]
    return bool(np.all(s >= kth - tol) and np.all(np.diff(s) <= tol))


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (/proc/<pid>/status VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pids(ts: TorchServe, model: str) -> list[tuple[int, str]]:
    """(pid, status) of the model's workers (management API)."""
    st = ts.model_status(model) or [{}]
    return [(int(w["pid"]), w.get("status", "")) for w in st[0].get("workers", []) if w.get("pid") not in (None, -1)]


class Observer(threading.Thread):
    """Samples the workers' RSS every RSS_EVERY_S, kills one worker at ``kill_at`` (epoch s) and
    times it back to READY, and scrapes /metrics once at ``scrape_at``."""

    def __init__(self, ts: TorchServe, model: str, metrics_url: str, kill_at: float | None, scrape_at: float,
                 end_at: float):
        super().__init__(daemon=True)
        self.ts, self.model, self.metrics_url = ts, model, metrics_url
        self.kill_at, self.scrape_at, self.end_at = kill_at, scrape_at, end_at
        self.rss: list[tuple[float, float]] = []  # (epoch s, MiB summed over workers)
        self.killed_at: float | None = None
        self.back_s: float | None = None
        self.metrics_text = ""

    def _sample(self) -> None:
        vals = [rss_mib(pid) for pid, _ in worker_pids(self.ts, self.model)]
        vals = [v for v in vals if v is not None]
        if vals:
            self.rss.append((time.time(), round(sum(vals), 1)))

    def run(self) -> None:
        next_rss = time.time()
        victim = None
        while time.time() < self.end_at:
            now = time.time()
            if now >= next_rss:
                self._sample()
                next_rss += RSS_EVERY_S
            if self.killed_at is None and self.kill_at is not None and now >= self.kill_at:
                victim = worker_pids(self.ts, self.model)[0][0]
                os.kill(victim, signal.SIGKILL)
                self.killed_at = time.time()
            if self.killed_at is not None and self.back_s is None:
                ws = worker_pids(self.ts, self.model)
                if ws and victim not in [p for p, _ in ws] and all(s == "READY" for _, s in ws):
                    self.back_s = time.time() - self.killed_at
            if not self.metrics_text and now >= self.scrape_at:
                with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
                    self.metrics_text = r.read().decode()
            time.sleep(0.05)


def summarize(recs: list[dict], T_ms: float, duration_s: float, rate: float, killed_at: float | None,
              offline: tuple[dict[int, np.ndarray], dict[str, int], list[str]], top_k: int,
              rss: list[tuple[float, float]], window: tuple[float, float]) -> tuple[dict, dict]:
    """(soak.json row, details for soak.md) from the measured window's raw records."""
    scores, row_of, pids = offline
    pid_row = {p: i for i, p in enumerate(pids)}
    rows = [r for r in recs if r["scheduled_s"] >= 0]
    ok = [r for r in rows if r["status"] == 200]
    wrong = [r for r in ok if r["level"] not in scores or r["qid"] not in row_of
             or not answer_is_right(scores[r["level"]][row_of[r["qid"]]], [pid_row.get(p, -1) for p in r["pids"]],
                                    top_k)]
    in_time = [r for r in ok if r["latency_ms"] <= T_ms]
    recovery = None
    if killed_at is not None:
        after = sorted((r for r in in_time if r["sent_epoch"] >= killed_at), key=lambda r: r["sent_epoch"])
        recovery = round(after[0]["sent_epoch"] - killed_at, 3) if after else None
    samples = [v for t, v in rss if window[0] <= t <= window[1]]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    row = {"duration_s": duration_s, "rate_rps": rate, "requests": len(rows), "ok": len(ok),
           "shed": sum(r["status"] == 503 for r in rows), "errors": sum(r["status"] not in (0, 200, 503) for r in rows),
           "lost": sum(r["status"] == 0 for r in rows), "wrong": len(wrong), "worker_kills": int(killed_at is not None),
           "recovery_s": recovery, "rss_mib_start": samples[0] if samples else None,
           "rss_mib_end": samples[-1] if samples else None,
           "within_T": round(len(in_time) / len(rows), 4) if rows else None}
    assert tuple(row) == KEYS
    details = {"statuses": statuses, "shed_without_retry_after": sum(r["status"] == 503 and not r["retry_after"]
                                                                      for r in rows),
               "wrong_examples": [{k: r[k] for k in ("qid", "level", "pids")} for r in wrong[:5]],
               "rss_samples_mib": samples, "levels": {},
               # when each unanswered request was sent, from the kill (ms; negative = before it)
               "lost_from_kill_ms": [round((r["sent_epoch"] - killed_at) * 1000, 1) if killed_at is not None else None
                                     for r in rows if r["status"] == 0]}
    for r in ok:
        details["levels"][str(r["level"])] = details["levels"].get(str(r["level"]), 0) + 1
    return row, details


def run_soak(ts_config: Path, store: Path, model_url: str, queries_file: Path, T_ms: float, rate: float,
             duration_s: float, warmup_s: float, drain_s: float, work: Path, ports: tuple[int, int, int],
             max_length: int, top_k: int, workers: int, kill: bool = True) -> tuple[dict, dict, str]:
    """Serve ``store/model_url`` as "elastic", run the soak (module docstring) and return
    (soak.json row, details, metrics text). ``ports``: inference, management, metrics; ``kill``
    False runs the same load without killing a worker (a baseline)."""
    inf, mgmt, met = ports
    queries = read_tsv(queries_file)
    offline = offline_scores(store / model_url, queries, max_length)
    ts = TorchServe(ts_config, store, {}, work / "torchserve", f"http://127.0.0.1:{mgmt}")
    ts.start(cpus="0")
    try:
        ts.wait_up()
        ts.register("elastic", model_url)  # one worker calibrates (or reuses the stored calibration) alone,
        ts.scale("elastic", workers)  # then the others start from the calibration it stored
        raw = work / "raw.jsonl"
        cmd = pinned([sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "openloop.py"), "--headless",
                      "-u", "1", "-r", "1", "--only-summary", "--loglevel", "ERROR",
                      "--host", f"http://127.0.0.1:{inf}",
                      "--queries", str(queries_file), "--model-name", "elastic", "--rate", str(rate),
                      "--warmup-s", str(warmup_s), "--duration-s", str(duration_s), "--drain-s", str(drain_s),
                      "--raw-out", str(raw)], "1")
        t0 = time.time()
        window = (t0 + warmup_s + 1.0, t0 + warmup_s + duration_s + 1.0)  # Locust's start-up ~1 s, approximately
        obs = Observer(ts, "elastic", f"http://127.0.0.1:{met}/metrics",
                       kill_at=window[0] + duration_s / 2 if kill else None,
                       scrape_at=window[0] + 0.75 * duration_s, end_at=window[1] + drain_s)
        obs.start()
        with open(work / "locust.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           timeout=warmup_s + duration_s + drain_s + 120)
        obs.end_at = 0  # stop sampling
        obs.join(timeout=5)
        recs = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
        row, details = summarize(recs, T_ms, duration_s, rate, obs.killed_at, offline, top_k, obs.rss,
                                 (window[0] - 1, window[1] + 1))
        details["worker_back_s"] = round(obs.back_s, 2) if obs.back_s is not None else None
        return row, details, obs.metrics_text
    finally:
        ts.stop()


def write_report(row: dict, details: dict, metrics_text: str, out: Path, how: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(row, indent=1) + "\n")
    (out / "metrics.txt").write_text(metrics_text)
    lines = ["# Fault and soak test", "", how, "",
             "| " + " | ".join(KEYS) + " |", "| " + " | ".join("---" for _ in KEYS) + " |",
             "| " + " | ".join("" if row[k] is None else f"{row[k]:g}" if isinstance(row[k], float) else str(row[k])
                               for k in KEYS) + " |", "",
             (f"- the killed worker was READY again after {details['worker_back_s']} s (TorchServe's restart: a 1-s "
              "back-off, Python start-up and imports, model load; the calibration is the stored one);"
              if row["worker_kills"] else "- no worker was killed (a baseline run);"),
             f"- statuses in the measured window: {details['statuses']}; 503 without Retry-After: "
             f"{details['shed_without_retry_after']}; lost requests sent at (ms from the kill): "
             f"{details['lost_from_kill_ms']};",
             f"- 200 answers per level: {details['levels']};",
             f"- worker RSS (MiB, summed over the model's workers) every {RSS_EVERY_S:g} s: "
             f"{details['rss_samples_mib']};",
             f"- wrong answers (first five): {details['wrong_examples']}.", "",
             "metrics.txt is one scrape of /metrics, a quarter of the window after the kill."]
    (out / "soak.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="Fault and soak test of the elastic server (worker killed mid-run).")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--duration-s", type=float, default=600.0, help="measured seconds")
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--drain-s", type=float, default=15.0, help="seconds to wait for answers after the last send")
    ap.add_argument("--rate", type=float, help="offered requests per second (default: 2x the static 50 %% level's "
                                               "sustainable rate at T in benchmarks/results/slo.json)")
    ap.add_argument("--T", type=float, default=50.0, help="latency constraint, ms")
    ap.add_argument("--workers", type=int, default=2, help="TorchServe workers of the model")
    ap.add_argument("--no-kill", action="store_true", help="the same load without killing a worker (a baseline)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    if a.duration_s <= 0 or a.T <= 0 or a.workers < 1 or (a.rate is not None and a.rate <= 0):
        raise SystemExit("--duration-s, --T and --rate must be > 0, --workers >= 1")
    cfg = load_config(a.config)
    s = cfg.serve
    rate = a.rate or default_rate(Path("benchmarks/results/slo.json"), a.T)
    work = (cfg.run / "soak").resolve()
    store = work / "store"
    base = build_model(cfg, store, "no-archive")
    name = f"soak-w{a.workers}-T{a.T:g}"
    # minWorkers 1: TorchServe starts minWorkers at registration, whatever initial_workers says, and
    # workers that calibrate at once on one core store a t_k 2-3x too slow; run_soak scales up after
    model_variant(base, store, name, {"latency_constraint_ms": a.T}, {"minWorkers": 1, "maxWorkers": a.workers})
    t0 = time.time()
    row, details, text = run_soak(ROOT / "config.properties", store, name, Path(cfg.data.dev_queries), a.T, rate,
                                  a.duration_s, a.warmup_s, a.drain_s, work,
                                  (s.inference_port, s.management_port, s.metrics_port), cfg.encode.query_max_length,
                                  s.top_k, a.workers, not a.no_kill)
    how = (f"`python -m benchmarks.soak {' '.join(sys.argv[1:])}` on this 2-core machine: TorchServe (frontend and "
           f"{a.workers} worker(s), batchSize {s.batch_size}, maxBatchDelay {s.max_batch_delay_ms} ms, T = {a.T:g} ms) "
           f"on CPU 0, Locust open-loop Poisson arrivals at {rate:g} req/s on CPU 1, {a.warmup_s:g} s warm-up + "
           f"{a.duration_s:g} s measured; "
           f"{'no worker killed' if a.no_kill else 'one worker killed (SIGKILL) half-way'}; "
           f"{(time.time() - t0) / 60:.0f} min in all.")
    write_report(row, details, text, a.out, how)
    print(json.dumps(row), flush=True)
    print(f"[soak] wrote {a.out / 'soak.json'}, soak.md and metrics.txt", flush=True)


if __name__ == "__main__":
    main()
