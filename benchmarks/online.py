"""Online simulation (paper §5.3): TorchServe serving elasticdenser.mar, Locust replaying MS
MARCO queries in a rush, and the report.

    python -m benchmarks.online --config configs/demo.yaml [--mar model_store/elasticdenser.mar]
        [--queries FILE] [--qrels FILE] [--latency-constraint-ms T]

TorchServe (frontend and worker) is pinned to CPU 0 and Locust to CPU 1 so the load generator
does not steal what it measures. Writes run_dir/online/: requests.csv, summary.json,
summary.md, timeline.png, calibration.json, logs/. Stops the server at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import phases, write_report
from benchmarks.server import ROOT, TorchServe, pinned
from training.config import RecipeConfig, load_config


def run_online(cfg: RecipeConfig, mar: Path, queries: str, qrels: str, T_ms: float | None, out: Path | None = None) -> dict:
    """Serve ``mar``, replay ``queries`` in a rush, write the report into ``out`` (default
    run_dir/online); T_ms overrides the .mar's T through ELASTIC_LATENCY_CONSTRAINT_MS."""
    out = (out or cfg.run / "online").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"ELASTIC_LATENCY_CONSTRAINT_MS": str(T_ms)} if T_ms else {}
    s, ld = cfg.serve, cfg.load
    server = TorchServe(ROOT / "config.properties", mar.parent.resolve(), {"elastic": mar.name}, out,
                        f"http://127.0.0.1:{s.management_port}", env)
    t0 = time.time()
    server.start(cpus="0")
    try:
        server.wait_ready("elastic")
        cal = server.describe("elastic")
        (out / "calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
        print(f"[online] TorchServe ready in {time.time() - t0:.0f} s; T = {cal['latency_constraint_ms']} ms; "
              f"t_k at batch 1 (ms): { {k: v[0] for k, v in cal['processing_ms'].items()} }", flush=True)
        cmd = pinned([sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless",
                      "--only-summary", "--loglevel", "WARNING", "--host", f"http://127.0.0.1:{s.inference_port}",
                      "--queries", queries, "--raw-out", str(out / "raw.jsonl"), "--peak-users", str(ld.peak_users),
                      "--ramp-up-s", str(ld.ramp_up_s), "--hold-s", str(ld.hold_s), "--ramp-down-s", str(ld.ramp_down_s),
                      "--tail-s", str(ld.tail_s), "--min-wait-s", str(ld.min_wait_s), "--max-wait-s", str(ld.max_wait_s)]
                     + (["--start-header"] if ld.start_header else []),
                     "1")
        print(f"[online] Locust rush: {ld.peak_users} users at peak, "
              f"{ld.ramp_up_s + ld.hold_s + ld.ramp_down_s + ld.tail_s:.0f} s", flush=True)
        with open(out / "locust.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # exit 1 = some failures: reported below
    finally:
        server.stop()
    summary = write_report(out / "raw.jsonl", Path(qrels), out, phases(ld.ramp_up_s, ld.hold_s, ld.ramp_down_s, ld.tail_s),
                           cal["latency_constraint_ms"])
    print(f"[online] report in {out}:\n{(out / 'summary.md').read_text()}", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description="TorchServe + Locust rush replay of MS MARCO queries, with report.")
    ap.add_argument("--config", help="recipe YAML (default: built-in defaults)")
    ap.add_argument("--mar", type=Path, default=Path("model_store/elasticdenser.mar"))
    ap.add_argument("--queries", help="qid<TAB>query file to replay (default: data.dev_queries)")
    ap.add_argument("--qrels", help="TREC qrels for rr_at_10 (default: data.qrels)")
    ap.add_argument("--latency-constraint-ms", type=float, help="override T (ELASTIC_LATENCY_CONSTRAINT_MS); "
                    "a huge T pins the largest SubLM: the static baseline")
    ap.add_argument("--out", type=Path, help="report folder (default: run_dir/online)")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if not a.mar.exists():
        raise SystemExit(f"{a.mar}: missing; run python -m archive.build_mar first")
    run_online(cfg, a.mar, a.queries or cfg.data.dev_queries, a.qrels or cfg.data.qrels, a.latency_constraint_ms, a.out)


if __name__ == "__main__":
    main()
