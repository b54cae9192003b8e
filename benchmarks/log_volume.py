"""Log volume per 1,000 requests: bytes TorchServe writes under its log folder while it answers
1,000 queries, for each logging setup.

    python -m benchmarks.log_volume --config configs/demo.yaml [--before OLD_LOG4J2_XML]
        [--requests 1000] [--out benchmarks/results]

Setups, each on a fresh TorchServe (the recipe's model, CPU 0; the client on CPU 1, 4 requests in
flight): ``before`` (--before, e.g. the log4j2.xml of an earlier commit), ``default`` (the
project's log4j2.xml) and ``request-logs`` (the same with ELASTIC_REQUEST_LOGS=ACCEPT, which
brings the per-request lines back). Bytes are counted after start-up and model load, so only
what the requests add. Writes logs.json (one row per setup: setup, requests, bytes per file,
bytes_per_1000) and logs.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from archive.build_mar import run as build_model
from benchmarks.server import ROOT, TorchServe
from elastic.data import read_tsv
from training.config import load_config


def log_bytes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.glob("*.log"))}


def measure(store: Path, model: str, work: Path, queries: list[str], port: int, mgmt: int, n: int,
            log_config: Path, env: dict) -> dict[str, int]:
    """Bytes per log file added while ``n`` requests are answered."""
    ts = TorchServe(ROOT / "config.properties", store, {"elastic": model}, work, f"http://127.0.0.1:{mgmt}", env,
                    log_config)
    ts.start(cpus="0")
    try:
        ts.wait_ready("elastic", 300)
        time.sleep(2)
        before = log_bytes(work / "logs")

        def one(i):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/elastic",
                                         data=json.dumps({"query": queries[i % len(queries)]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(one, range(n)))
        assert statuses.count(200) == n, f"{n - statuses.count(200)} requests failed"
        time.sleep(2)  # the last lines flushed
        after = log_bytes(work / "logs")
        return {f: after[f] - before.get(f, 0) for f in after}
    finally:
        ts.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Bytes of logs per 1,000 requests, per logging setup.")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--before", type=Path, help="an earlier log4j2.xml to measure beside the current one")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    cfg = load_config(a.config)
    work = (cfg.run / "log_volume").resolve()
    store = work / "store"
    model = build_model(cfg, store, "no-archive").name
    queries = list(read_tsv(cfg.data.dev_queries).values())
    setups = ([("before", a.before, {})] if a.before else []) + [
        ("default", ROOT / "log4j2.xml", {}), ("request-logs", ROOT / "log4j2.xml", {"ELASTIC_REQUEST_LOGS": "ACCEPT"})]
    rows = []
    for name, log_config, env in setups:
        files = measure(store, model, work / name, queries, cfg.serve.inference_port, cfg.serve.management_port,
                        a.requests, log_config, env)
        total = sum(files.values())
        rows.append({"setup": name, "requests": a.requests, "bytes": files,
                     "bytes_per_1000": round(total * 1000 / a.requests)})
        print(f"[logs] {name}: {rows[-1]['bytes_per_1000']} bytes per 1,000 requests {files}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "logs.json").write_text(json.dumps(rows, indent=1) + "\n")
    files = sorted({f for r in rows for f in r["bytes"]})
    lines = ["# Log volume per 1,000 requests", "",
             f"`python -m benchmarks.log_volume {' '.join(sys.argv[1:])}`: bytes added under TorchServe's "
             f"log folder while {a.requests} queries were answered (4 in flight), after start-up.", "",
             "| setup | bytes per 1,000 requests | " + " | ".join(files) + " |",
             "| --- | --- | " + " | ".join("---" for _ in files) + " |"]
    lines += [f"| {r['setup']} | {r['bytes_per_1000']:,} | " + " | ".join(f"{r['bytes'].get(f, 0):,}" for f in files)
              + " |" for r in rows]
    (a.out / "logs.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
