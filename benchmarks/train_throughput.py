"""Throughput of one query-distillation step (every SubLM forward + backward, AdamW) on this
machine, against batch size, torch threads, precision and the library of the matrix products:

    python -m benchmarks.train_throughput --config configs/full.yaml --batch-sizes 32 64 128 --threads 1 2 \
        [--precisions fp32 bf16] [--backends mkl onednn] [--out DIR]

The model is run_dir/pruned (run ``python -m training.prune`` first), the teacher side comes from
its cache. Each setting runs ``--warmup`` untimed steps and then ``--steps`` timed ones on
random training queries; prints and writes run_dir/eval/train_throughput.{json,md} with steps/s
and queries/s (training queries through all K SubLMs per second). Also compares two ways of
filling a batch: uniform sampling and the recipe's ``query_distill.length_window`` (queries of
similar token length together, less padding). ``bf16`` runs each SubLM's forward and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (weights and optimizer stay fp32), for CPUs with
bf16 matrix units (AMX, AVX512-BF16); where the CPU has none it is refused, since it would only
measure emulation. ``--backends``: MKL's sgemm (``torch.backends.mkldnn.enabled = False``, what
``train.onednn: false`` runs) and/or oneDNN (torch's default on CPU); within each batch of a
setting the backends alternate step by step, so drift on a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.evaluate import to_markdown
from elastic.encoder import ElasticEncoder
from training.config import load_config, teacher_path
from training.loop import matrix_products
from training.query_distill import QueryDistillObjective, batch_sampler, teacher_candidates
from training.teacher import teacher_side


BACKENDS = {"mkl": False, "onednn": True}  # name -> torch.backends.mkldnn.enabled


def measure(obj: QueryDistillObjective, model: torch.nn.Module, levels: list[int], batches: list[list[int]],
            warmup: int, precision: str = "fp32", backends: tuple[str, ...] = ("mkl",)) -> dict[str, float]:
    """Median seconds of one optimizer step over ``batches`` (after ``warmup`` of them), per backend
    of ``backends`` (``BACKENDS``), the backends taking turns on each batch; ``precision`` "bf16"
    autocasts each SubLM's forward and loss (module docstring). The caller's backend flag is
    restored."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i, b in enumerate(batches):
        for backend in backends:
            with matrix_products(BACKENDS[backend]):
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                prep = obj.prepare(b)
                for level in levels:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = obj.loss(b, prep, level)
                    (loss / len(levels)).backward()
                opt.step()
            if i >= warmup:
                times[backend].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description="Steps/s of query distillation against batch size and threads.")
    ap.add_argument("--config", default="configs/full.yaml")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="bf16: autocast forward and loss (needs a CPU with bf16 matrix units)")
    ap.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=["mkl"],
                    help="matrix-product library: mkl (train.onednn false) and/or onednn, alternating step by step")
    ap.add_argument("--out", help="output directory (default: run_dir/eval)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    if "bf16" in a.precisions and not torch.cpu._is_avx512_bf16_supported():
        ap.error("--precisions bf16: this CPU has no bf16 matrix units (AVX512-BF16 / AMX); it would time emulation")
    cfg = load_config(a.config)
    side = teacher_side(cfg)
    top = teacher_candidates(side, cfg.query_distill.candidates, cfg.run / "teacher" / f"top{cfg.query_distill.candidates}.pt")
    student = ElasticEncoder(cfg.run / "pruned")
    student.model.train()
    student.model.embeddings.word_embeddings.weight.requires_grad_(not cfg.query_distill.freeze_word_embeddings)
    obj = QueryDistillObjective(student, side, top, cfg, torch.device("cpu"))
    tok_len = [len(x) for x in student.tokenizer(side.train_queries, truncation=True,
                                                 max_length=cfg.encode.query_max_length)["input_ids"]]
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for bs in a.batch_sizes:
            n = a.steps + a.warmup
            for window in (0, cfg.query_distill.length_window):
                name = "uniform" if window == 0 else f"length window {window}"
                sample = batch_sampler(tok_len, bs, window)
                batches = [sample(random.Random(i)) for i in range(n)]
                for precision in a.precisions:
                    secs = measure(obj, student.model, student.levels, batches, a.warmup, precision,
                                   tuple(a.backends))
                    for backend, sec in secs.items():
                        rows.append({"threads": threads, "batch_size": bs, "sampling": name, "precision": precision,
                                     "backend": backend, "step_s": round(sec, 3), "steps_per_s": round(1 / sec, 3),
                                     "queries_per_s": round(bs / sec, 1)})
                        print(rows[-1], flush=True)
    out = Path(a.out) if a.out else cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = (f"Query distillation, {len(student.levels)} SubLMs per step, teacher {teacher_path(cfg).name}; median of "
          f"{a.steps} steps after {a.warmup} warm-up.\n\n" + to_markdown(rows, list(rows[0])))
    (out / "train_throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
