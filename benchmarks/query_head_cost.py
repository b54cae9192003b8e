"""What a query head adds to a batch: median milliseconds of one query batch through each level,
with and without the level's head (elastic/query_head.py), on the worker's thread count.

    python -m benchmarks.query_head_cost --model runs/demo/elastic [--batch 8] [--tokens 12] [--repeats 300]

Prints one line per level: without, with, and the difference (ms and percent). Runs the two
alternately in halves (without, with, without, with) and averages each one's two medians, so a
slow stretch of this shared machine hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from elastic.encoder import ElasticEncoder


@torch.inference_mode()
def median_ms(enc: ElasticEncoder, batch: dict, level: int, query: bool, repeats: int) -> float:
    """Median wall milliseconds of ``enc.embed(batch, level, query)`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc.embed(batch, level, query)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description="Per-batch cost of the query heads, level by level.")
    ap.add_argument("--model", required=True, help="model directory with query_heads.safetensors")
    ap.add_argument("--batch", type=int, default=8, help="queries per batch (serve.batch_size)")
    ap.add_argument("--tokens", type=int, default=12, help="tokens per query")
    ap.add_argument("--repeats", type=int, default=300, help="timed calls per (level, with/without), in two halves")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the worker's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    enc = ElasticEncoder(a.model)
    if enc.query_heads is None:
        raise SystemExit(f"{a.model}: no query_heads.safetensors (python -m training.align fits them)")
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, enc.dims.vocab_size, (a.batch, a.tokens), generator=g),
             "attention_mask": torch.ones(a.batch, a.tokens, dtype=torch.long)}
    print(f"batch {a.batch} x {a.tokens} tokens, {a.threads} thread(s), median of {a.repeats} calls each")
    for level in enc.levels:
        median_ms(enc, batch, level, True, 20)  # warm-up
        half = a.repeats // 2
        off, on = [], []
        for _ in range(2):  # alternately: without, with, without, with
            off.append(median_ms(enc, batch, level, False, half))
            on.append(median_ms(enc, batch, level, True, half))
        without, with_ = statistics.mean(off), statistics.mean(on)
        print(f"level {level:>3}%: without {without:.3f} ms, with {with_:.3f} ms, "
              f"+{with_ - without:.3f} ms ({100 * (with_ - without) / without:+.1f} %)")


if __name__ == "__main__":
    main()
