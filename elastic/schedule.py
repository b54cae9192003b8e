"""Elastic schedule (paper §4.3): per batch, the best SubLM that keeps every request within T.

The paper's rule
----------------
A request that finds g requests waiting is served after them, so its latency is about
(g + 1)·t_k. The paper keeps the largest level k with

    (g + 1)·t_k <= T.                                                        (paper §4.3)

With TorchServe batching (batchSize b_max) the g waiting requests leave in ceil(g / b_max)
batches, and every batch also pays a cost o outside the model (frontend, IPC). The paper's rule
then reads

    t_k(b) + o + ceil(g / b_max)·(t_k(b_max) + o) <= T                       (rule "paper")

and with b_max = 1 and o = 0 it is exactly (g + 1)·t_k <= T.

What changed, and why (rule "deadline", the default)
----------------------------------------------------
The paper's inequality describes a request that arrives now. It ignores three things that put
the measured p99 at 1.2-2.6 T:

1. The requests of the batch at hand have already waited (in the frontend's queue and its batch
   delay). Each request i carries its age a_i: from the ``X-Request-Start`` header that load
   balancers set, else an estimate (``estimate_age_ms``). Its own deadline must hold:

       max_i a_i + c·t_k(b) + o/2 <= T                                       (own deadline)

   o is the gap between consecutive batches while requests wait: the answer's way back to the
   frontend plus the next batch's way to the worker. Only the first half lies between the
   handler's end and the client, hence o/2 (the age already holds the way in).

2. The calibrated t_k was measured on an idle worker. Under load the frontend shares the core and
   the machine is noisy, so the schedule multiplies t_k by corrections learned online from
   observed / predicted batch time (``LatencyCorrection``): the batch at hand's own deadline uses
   a high quantile c of that ratio (its tail; handler.deadline_quantile), and everything that adds up over many batches
   (shedding, the queue bound, utilization) uses its mean c̄. A tail applied to every future
   batch would shed requests that the worker can serve.

3. A request that cannot meet T even at the smallest SubLM (c̄·t_min + o/2 after its age) is
   better answered at once with 503
   (and Retry-After) than late. Its computation would only delay everyone behind it. Such
   requests are shed, oldest first, until the rest fit at the smallest level; a request already
   past its deadline is never computed. ``late="serve"`` keeps the paper's behaviour and serves
   them late.

The queue behind the batch still matters (the paper's point), with the same correction:

       c̄·t_k(b) + o + ceil(g / b_max)·(c̄·t_k(b_max) + o) <= T                (queue bound)

That bound sees only the requests already waiting, not those that arrive while the batch is
served. Near capacity a greedy choice of a large level lets the queue grow, and the next batches
pay for it in shed or late answers. So a level must also keep up with the arrival rate λ
(requests per second the worker has seen lately), with headroom for Poisson bursts:

       λ · (c̄·t_k(b_max) + o) / b_max <= ρ_max · 1000 ms/s                 (utilization)

The deadline rule picks the largest k that meets all three. If no level meets them, the smallest
level serves whatever was not shed.

Everything here is pure: no TorchServe, no clock, no I/O. The serving core passes the ages, g,
the calibration and c in, and gets a ``Plan`` back. Times are milliseconds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

RULES = ("deadline", "paper")
LATE_POLICIES = ("shed", "serve")


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


@dataclass(frozen=True)
class Plan:
    """What to do with one batch.

    Attributes:
        level: preserving level (percent) that serves the batch; None when every request is shed.
        serve: per request of the batch, True = compute it, False = shed it (503).
        predicted_ms: predicted processing time c·t_k(b) of the served part (0 when none).
    """

    level: int | None
    serve: tuple[bool, ...]
    predicted_ms: float


def expected_latency_ms(queue_size: int, t_now_ms: float, t_full_ms: float, max_batch: int) -> float:
    """t_k(b) + ceil(g / b_max)·t_k(b_max): the queue bound (module docstring)."""
    return t_now_ms + math.ceil(queue_size / max_batch) * t_full_ms


def _check(queue_size: int, latency_constraint_ms: float, overhead_ms: float, batch: int, max_batch: int) -> None:
    if queue_size < 0:
        raise ValueError(f"queue_size must be >= 0, got {queue_size}")
    if not latency_constraint_ms > 0:
        raise ValueError(f"latency_constraint_ms must be > 0, got {latency_constraint_ms}")
    if overhead_ms < 0:
        raise ValueError(f"overhead_ms must be >= 0, got {overhead_ms}")
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch must be in 1..max_batch={max_batch}, got {batch}")


def plan_batch(ages_ms: Sequence[float], queue_size: int, latency_constraint_ms: float, cal: Calibration,
               max_batch: int, overhead_ms: float = 0.0, correction: float = 1.0, rule: str = "deadline",
               late: str = "shed", pin_level: int | None = None, arrival_rate_rps: float = 0.0,
               max_utilization: float = 1.0, mean_correction: float | None = None) -> Plan:
    """Level and shed decisions for one batch (module docstring: rules "deadline" and "paper").

    Args:
        ages_ms: per request of the batch, how long it has already waited (ms, >= 0).
        queue_size: g, requests still waiting behind the batch.
        latency_constraint_ms: T (ms, > 0).
        cal: calibrated t_k(b) per level.
        max_batch: TorchServe's batchSize (>= len(ages_ms)).
        overhead_ms: o, per-batch cost outside the model (ms, >= 0).
        correction: c, a high quantile of observed / predicted processing time (> 0), for the
            batch's own deadline; the paper's rule ignores it.
        mean_correction: c̄, the mean of that ratio (> 0), for shedding, the queue bound and
            utilization; None = c.
        rule: "deadline" (own deadline and queue bound, corrected) or "paper" (queue bound only).
        late: "shed" (a request that cannot meet T at the smallest level is not computed) or
            "serve" (every request is computed, however late).
        pin_level: serve every batch at this level (static baseline); shedding still applies.
        arrival_rate_rps: λ, requests per second arriving lately (0 = unknown: no utilization bound).
        max_utilization: ρ_max in (0, 1], the share of the worker's time the chosen level may fill
            at rate λ (deadline rule only).

    Returns:
        A Plan; ``serve`` has one flag per entry of ``ages_ms``.

    Raises:
        ValueError: an empty batch, a bad rule / late policy / pinned level, a negative age, or
            g < 0, T <= 0, o < 0, or more requests than max_batch.
    """
    if not ages_ms:
        raise ValueError("ages_ms: the batch is empty")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if late not in LATE_POLICIES:
        raise ValueError(f"late must be one of {LATE_POLICIES}, got {late!r}")
    if pin_level is not None and pin_level not in cal.ms:
        raise ValueError(f"pin_level {pin_level} is not a calibrated level {sorted(cal.ms)}")
    mean_correction = correction if mean_correction is None else mean_correction
    if not correction > 0 or not mean_correction > 0:
        raise ValueError(f"correction must be > 0, got {correction}, mean {mean_correction}")
    if arrival_rate_rps < 0 or not 0 < max_utilization <= 1:
        raise ValueError(f"arrival_rate_rps must be >= 0 and max_utilization in (0, 1], got {arrival_rate_rps}, "
                         f"{max_utilization}")
    if min(ages_ms) < 0:
        raise ValueError(f"ages_ms must be >= 0, got {min(ages_ms)}")
    _check(queue_size, latency_constraint_ms, overhead_ms, len(ages_ms), max_batch)
    T, o = latency_constraint_ms, overhead_ms
    c, cm = (correction, mean_correction) if rule == "deadline" else (1.0, 1.0)
    levels = [pin_level] if pin_level is not None else sorted(cal.ms, reverse=True)
    smallest = levels[-1]

    serve = [True] * len(ages_ms)
    if late == "shed":  # drop the oldest while even the smallest level would answer it after T
        by_age = sorted(range(len(ages_ms)), key=lambda i: ages_ms[i], reverse=True)
        n = len(ages_ms)
        for i in by_age:
            if ages_ms[i] + cm * cal.t(smallest, n) + o / 2 <= T:
                break
            serve[i] = False
            n -= 1
    b = sum(serve)
    if b == 0:
        return Plan(None, tuple(serve), 0.0)
    oldest = max(a for a, s in zip(ages_ms, serve) if s)

    chosen = smallest
    for level in levels:
        queue_ok = expected_latency_ms(queue_size, cm * cal.t(level, b) + o, cm * cal.t(level, max_batch) + o,
                                       max_batch) <= T
        own_ok = rule == "paper" or oldest + c * cal.t(level, b) + o / 2 <= T
        busy_ok = rule == "paper" or arrival_rate_rps * (cm * cal.t(level, max_batch) + o) / max_batch \
            <= max_utilization * 1000
        if queue_ok and own_ok and busy_ok:
            chosen = level
            break
    return Plan(chosen, tuple(serve), c * cal.t(chosen, b))


def estimate_age_ms(now_s: float, history: Sequence[tuple[float, int, int]], idle_wait_ms: float,
                    last_end_s: float | None = None) -> float:
    """Age of the oldest request of the batch starting at ``now_s``, when no request carries a
    start time: a lower bound from the queue sizes seen at earlier batches (FIFO queue).

    The head of this batch was already waiting when batch j-m started if the g seen then
    exceeded the requests served since: g_{j-m} >= b_{j-m+1} + ... + b_{j-1} + 1. The earliest
    such start bounds its age from below. Where no earlier batch saw it waiting, it arrived
    after the previous batch started: it waited at most since then, and about ``idle_wait_ms``
    (batch delay plus IPC) if the worker was idle.

    Args:
        now_s: start of this batch (seconds, any monotonic clock shared with ``history``).
        history: (start_s, g, b) of earlier batches, oldest first: their start, the queue size g
            seen at their start, and their batch size.
        idle_wait_ms: what a request that finds the worker idle waits before the handler sees it.
        last_end_s: when the previous batch ended (same clock). A gap longer than ``idle_wait_ms``
            means the worker sat idle, so the frontend held nothing and no request of this batch
            waited longer than ``idle_wait_ms``, whatever earlier batches saw.

    Returns:
        Estimated age in milliseconds (>= 0).
    """
    if not history:
        return idle_wait_ms
    if last_end_s is not None and (now_s - last_end_s) * 1000 > idle_wait_ms:
        return idle_wait_ms
    since = 0  # requests served by the batches after batch j-m
    age = None
    for start_s, g, b in reversed(history):
        if g >= since + 1:
            age = (now_s - start_s) * 1000
            since += b
        else:
            break
    if age is not None:
        return max(age, 0.0)
    return max(min((now_s - history[-1][0]) * 1000, idle_wait_ms), 0.0)


class LatencyCorrection:
    """c (``value``): a high quantile, and c̄ (``mean``): the mean, of observed / predicted
    processing time over recent batches.

    The calibration runs on an idle worker; under load the frontend shares the core and the
    machine is noisy. The quantile (not the mean) budgets for jitter, so that T holds for the
    tail. c starts at 1 and stays within [min_c, max_c].

    Args:
        window: batches remembered. quantile: in (0, 1]. min_c, max_c: clipping bounds (> 0).
    """

    def __init__(self, window: int = 200, quantile: float = 0.9, min_c: float = 0.5, max_c: float = 4.0):
        if window < 1 or not 0 < quantile <= 1 or not 0 < min_c <= 1 <= max_c:
            raise ValueError(f"LatencyCorrection: bad window={window}, quantile={quantile}, min_c={min_c}, max_c={max_c}")
        self.quantile, self.min_c, self.max_c = quantile, min_c, max_c
        self._ratios: deque[float] = deque(maxlen=window)
        self.value = 1.0
        self.mean = 1.0

    def observe(self, predicted_ms: float, observed_ms: float) -> float:
        """Record one batch (both in ms, predicted without the correction) and return the new c."""
        if predicted_ms > 0 and observed_ms >= 0:
            self._ratios.append(observed_ms / predicted_ms)
            ranked = sorted(self._ratios)
            q = ranked[min(len(ranked) - 1, int(self.quantile * len(ranked)))]
            self.value = min(max(q, self.min_c), self.max_c)
            self.mean = min(max(sum(ranked) / len(ranked), self.min_c), self.max_c)
        return self.value


def parse_request_start(value: str | None, now_epoch_s: float, max_age_ms: float = 60_000.0,
                        max_skew_ms: float = 1_000.0) -> float | None:
    """Age in ms from an ``X-Request-Start`` header value, or None when absent or absurd.

    Accepted forms (as load balancers write them): ``t=1700000000.123`` or ``1700000000.123``
    (seconds), or an integer timestamp in milliseconds, microseconds or nanoseconds (nginx
    ``t=${msec}``, Heroku ms, New Relic's microseconds); the unit is read from the magnitude.
    A start up to ``max_skew_ms`` in the future counts as age 0 (clock skew). Further in the
    future, older than ``max_age_ms``, not a number, or not finite: None (the caller ignores the
    header for that request and counts it).
    """
    if value is None:
        return None
    v = value.strip()
    if v.startswith("t="):
        v = v[2:]
    try:
        x = float(v)
    except ValueError:
        return None
    if not math.isfinite(x) or x <= 0:
        return None
    for scale in (1.0, 1e3, 1e6, 1e9):  # seconds, ms, us, ns since the epoch
        if x / scale < 1e11:
            x /= scale
            break
    age = (now_epoch_s - x) * 1000
    if age < -max_skew_ms or age > max_age_ms:
        return None
    return max(age, 0.0)
