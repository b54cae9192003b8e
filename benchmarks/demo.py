"""The main job, end to end on the embedded default:

    python -m benchmarks.demo [--config configs/demo.yaml]

prune the bundled teacher into nested SubLMs -> quick elastic recovery -> FAISS index by the
largest SubLM -> offline MRR@10 (BM25, teacher, every level) -> model_store/elasticdenser.mar ->
TorchServe + Locust rush -> report. Prints where the report is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from archive import build_mar
from benchmarks import evaluate, online
from training import build_index, prune, recover
from training.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description="ElasticDenser end to end: build, pack, serve, replay, report.")
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe YAML")
    cfg = load_config(ap.parse_args().config)
    t0 = time.time()
    prune.run(cfg)
    recover.run(cfg)
    build_index.run(cfg)
    evaluate.run(cfg)
    mar = build_mar.run(cfg, Path("model_store"))
    online.run_online(cfg, mar, cfg.data.dev_queries, cfg.data.qrels, None)
    o, e = cfg.run / "online", cfg.run / "eval"
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min. Report:\n"
          f"  online: {o / 'summary.md'}, {o / 'timeline.png'}, {o / 'requests.csv'}\n"
          f"  offline MRR@10: {e / 'offline.md'}", flush=True)


if __name__ == "__main__":
    main()
