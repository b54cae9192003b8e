"""Seconds from SIGKILL of an idle worker until TorchServe has it READY again.

    python -m benchmarks.restart_time --config configs/demo.yaml [--kills 3] [--out benchmarks/results]

The recipe's model as a no-archive directory, one worker, TorchServe on CPU 0, no load. The
first load measures t_k and stores it beside the model (elastic/calibration_store.py); each
restart after a kill reuses it. Writes restart.json: the first load's seconds to READY and one
row per kill (seconds until a worker with a new pid is READY), and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from archive.build_mar import run as build_model
from benchmarks.server import ROOT, TorchServe
from benchmarks.soak import worker_pids
from training.config import load_config


def kill_and_time(ts: TorchServe, model: str, timeout_s: float = 120) -> float:
    """SIGKILL the model's first worker; seconds until a worker with another pid is READY."""
    victim = worker_pids(ts, model)[0][0]
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    while time.time() - t0 < timeout_s:
        ws = worker_pids(ts, model)
        if ws and all(p != victim and st == "READY" for p, st in ws):
            return time.time() - t0
        time.sleep(0.05)
    raise TimeoutError(f"no READY worker {timeout_s:.0f} s after the kill")


def main() -> None:
    ap = argparse.ArgumentParser(description="Worker restart time after SIGKILL on an idle server.")
    ap.add_argument("--config", help="recipe YAML (the model is its run_dir/elastic and run_dir/index)")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    cfg = load_config(a.config)
    work = (cfg.run / "restart_time").resolve()
    model = build_model(cfg, work / "store", "no-archive").name
    ts = TorchServe(ROOT / "config.properties", work / "store", {}, work / "torchserve",
                    f"http://127.0.0.1:{cfg.serve.management_port}")
    ts.start(cpus="0")
    try:
        ts.wait_up()
        t0 = time.time()
        ts.register("elastic", model)
        first = time.time() - t0
        print(f"[restart] first load (t_k measured): {first:.2f} s", flush=True)
        kills = []
        for i in range(a.kills):
            time.sleep(3)  # idle
            kills.append(round(kill_and_time(ts, "elastic"), 2))
            print(f"[restart] kill {i + 1}: READY again after {kills[-1]:.2f} s", flush=True)
    finally:
        ts.stop()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "restart.json").write_text(json.dumps({"first_load_s": round(first, 2), "restart_s": kills}, indent=1)
                                         + "\n")


if __name__ == "__main__":
    main()
