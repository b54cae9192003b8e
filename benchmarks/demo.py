"""The main job, end to end on the embedded default:

    python -m benchmarks.demo [--config configs/demo.yaml] [--device cuda]

prune the bundled teacher into nested SubLMs -> [task-agnostic elastic distillation (MiniLMv2
relations), when the recipe enables it] -> the task stage (query-side distillation to the
teacher's index, or fine-tuning) -> [query heads per level, after query distillation] -> [static baselines, when the recipe enables them]
-> FAISS index -> offline evaluation (BM25, teacher, every level) ->
model_store/elasticdenser.mar -> TorchServe + Locust rush -> report. Prints where the report is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from archive import build_mar
from benchmarks import evaluate, online
from training import build_index, prune, static, train
from training.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description="ElasticDenser end to end: build, pack, serve, replay, report.")
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe YAML")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if a.device:
        cfg.train.device = a.device
    t0 = time.time()
    prune.run(cfg)
    train.run(cfg)
    if cfg.static.enabled:
        static.run(cfg)
    build_index.run(cfg)
    evaluate.run(cfg)
    mar = build_mar.run(cfg, Path("model_store"))
    online.run_online(cfg, mar, cfg.data.dev_queries, cfg.data.qrels, None)
    o, e = cfg.run / "online", cfg.run / "eval"
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min. Report:\n"
          f"  online: {o / 'summary.md'}, {o / 'timeline.png'}, {o / 'requests.csv'}\n"
          f"  offline: {e / 'offline.md'}, {e / 'offline.png'}", flush=True)


if __name__ == "__main__":
    main()
