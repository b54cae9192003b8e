"""Elastic schedule (paper §4.3): the largest SubLM that keeps the expected latency within T.

The latency of a request that finds g requests waiting is about (g + 1)·t_k: its own processing
time plus that of the g ahead of it. With batching (TorchServe batchSize b_max > 1) the g waiting
requests leave in ceil(g / b_max) full batches, so the estimate becomes

    latency_k(g, b) = t_k(b) + ceil(g / b_max) · t_k(b_max)

where b is the size of the batch being scheduled and t_k(b) the calibrated processing time of a
b-request batch at level k. With b_max = 1 this is the paper's (g + 1)·t_k.

Every batch also costs a fixed overhead o outside the model (the frontend hands the batch to the
worker over a socket and sends the answers back); the worker serves batches one after another, so
the queue drains at one batch per t_k(b) + o. The estimate therefore uses t_k(b) + o in place of
t_k(b); o is measured online by the handler (the idle gap between consecutive batches while
requests were waiting) and is 0 for the paper's pure form.

Pure functions: no TorchServe, no clock, no I/O; the handler calls them per batch.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """Processing times t_k(b) in milliseconds, measured on this machine at startup.

    Attributes:
        batch_sizes: ascending batch sizes that were measured (the first is 1).
        ms: level (percent) -> milliseconds per batch, one per entry of ``batch_sizes``.
    """

    batch_sizes: tuple[int, ...]
    ms: dict[int, tuple[float, ...]]

    def __post_init__(self) -> None:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ascending, distinct and >= 1, got {self.batch_sizes}")
        for level, times in self.ms.items():
            if len(times) != len(self.batch_sizes):
                raise ValueError(f"level {level}: {len(times)} times for {len(self.batch_sizes)} batch sizes")
            if any(not t > 0 for t in times):
                raise ValueError(f"level {level}: processing times must be > 0 ms, got {times}")

    def t(self, level: int, batch: int) -> float:
        """t_k(batch) in ms, linear between measured batch sizes, extrapolated past the last."""
        bs, ts = self.batch_sizes, self.ms[level]
        if len(bs) == 1:
            return ts[0] * batch / bs[0]
        i = min(max(bisect.bisect_left(bs, batch), 1), len(bs) - 1)
        b0, b1, t0, t1 = bs[i - 1], bs[i], ts[i - 1], ts[i]
        return max(t0 + (t1 - t0) * (batch - b0) / (b1 - b0), 1e-6)


def expected_latency_ms(queue_size: int, t_now_ms: float, t_full_ms: float, max_batch: int) -> float:
    """t_k(b) + ceil(g / b_max)·t_k(b_max): see the module docstring."""
    return t_now_ms + math.ceil(queue_size / max_batch) * t_full_ms


def choose_level(queue_size: int, latency_constraint_ms: float, cal: Calibration, batch: int = 1,
                 max_batch: int = 1, overhead_ms: float = 0.0) -> int:
    """The largest preserving level k with expected latency <= T; the smallest level when none fits.

    Args:
        queue_size: g, requests waiting in the frontend's queue (the batch at hand excluded).
        latency_constraint_ms: T in milliseconds, > 0.
        cal: calibrated processing times per level.
        batch: size of the batch being scheduled; max_batch: TorchServe's batchSize.
        overhead_ms: o, per-batch cost outside the model (milliseconds, >= 0).

    Raises:
        ValueError: g < 0, T <= 0, o < 0, or batch sizes outside 1..max_batch.
    """
    if queue_size < 0:
        raise ValueError(f"queue_size must be >= 0, got {queue_size}")
    if not latency_constraint_ms > 0:
        raise ValueError(f"latency_constraint_ms must be > 0, got {latency_constraint_ms}")
    if overhead_ms < 0:
        raise ValueError(f"overhead_ms must be >= 0, got {overhead_ms}")
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch must be in 1..max_batch={max_batch}, got {batch}")
    levels = sorted(cal.ms, reverse=True)
    for level in levels:
        est = expected_latency_ms(queue_size, cal.t(level, batch) + overhead_ms, cal.t(level, max_batch) + overhead_ms,
                                  max_batch)
        if est <= latency_constraint_ms:
            return level
    return levels[-1]
