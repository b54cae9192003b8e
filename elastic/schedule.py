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

       max_i a_i + c·t_k(b) + r·o <= T                                       (own deadline)

   a_i is taken when the level is chosen, so it holds the handler's own time before the model
   (parsing, tokenizing). o is the gap between consecutive batches while requests wait: the
   answer's way back to the frontend plus the next batch's way to the worker. r·o budgets the
   answer's way back from the handler to the client (r: ``return_share``, 1/2 by default: the
   gap taken as split evenly between the two ways). Measured, it does not split evenly: in the
   raw runs of an SLO probe (``python -m benchmarks.way_back``, benchmarks/results/slo_probes/
   return-share/way_back.md) the way back grows with the batch, from 1.4-2.3 ms at p50 for
   batches of 1-2 to 3.7-8.5 ms for batches of 7-8 against o of 4.0-5.1 ms, because the
   frontend writes a batch's answers while the worker already runs the next one. Yet budgeting
   the whole gap (r = 1) in the same probe shed 3-6 times as many requests at 100 req/s and
   kept no more of them within T (README "Under load", "The way back"), so r stays 1/2.

2. The calibrated t_k was measured on an idle worker. Under load the frontend shares the core and
   the machine is noisy, so the schedule multiplies t_k by corrections learned online from
   observed / predicted batch time (``LatencyCorrection``): the batch at hand's own deadline uses
   a high quantile c of that ratio (its tail; handler.deadline_quantile), and everything that adds
   up over many batches (shedding, the queue bound, the rate bound) uses its mean c̄. A tail
   applied to every future batch would shed requests that the worker can serve. The ratio is
   learned per level (c_k, c̄_k) once the level has served enough recent batches. A level that
   has not borrows the ratio of the levels that did, carried over as an additive excess
   (``transfer_correction``): what the frontend takes from the shared core goes with the
   requests, not with the level, so the same milliseconds make a larger ratio on a smaller
   SubLM. In the SLO sweep before this change (its raw runs since overwritten) a least-squares
   fit of observed − t_k(b) against the batch size b gave 0.6-0.75 ms per request at 300 req/s
   for static 5, 10, 20 and 30 % alike, and c̄ was 1.73 for static 10 % against 1.47 for static
   20 %: borrowing the ratio made a level that the rush had not served look slower than it was.
   The sweep after it, calibrated in a slow stretch, gives a noisier -0.05 to 0.51 ms per
   request for the static levels at 300 req/s (``python -m benchmarks.batch_excess --rates 300``,
   benchmarks/results/batch_excess.md).

   The tail grows with the batch. Large batches come in bursts, while the frontend on the same
   core takes in the burst and writes out the previous batch's answers, so their ratios spread
   wider than those of small batches at the same level. In the SLO sweep of 2026-11-24 at
   200 req/s, static 50 % ran batches of 1 at a p98 / median of model time of 7.9 / 6.6 ms
   (1.2) and batches of 8 at 40.9 / 21.6 ms (1.9), and in the three runs of the sweep after it
   1.28-1.33 and 1.64-2.16 (``python -m benchmarks.batch_excess --rates 200 --servers
   static50-T50 --tails 1 8``, benchmarks/results/slo_probes/sweep-large-tail/tails.md); the
   elastic server's answers past T in the first sweep came from its large level-50 batches. A
   quantile pooled over all batch sizes budgets for the small batches' tail, which are most of
   them. So a large batch at hand
   (more than half of batchSize, ``handler.large_batch_tail``) budgets for the larger of the
   level's pooled tail and the tail of its large batches alone, where the level has run
   enough of them lately.

3. A request that cannot meet T even at the smallest SubLM (c̄·t_min + r·o after its age) is
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
(requests per second over the batches of the last ``rate_window_s``, ``ArrivalRate``) within T.
At level k the worker runs in cycles of C(b) = c̄·t_k(b) + o, each serving what arrived during
the one before; the batch settles at the smallest b whose cycle keeps up, with headroom ρ_max
for Poisson bursts, and a request waits at most the cycle under way before its own:

       b_s = min { b <= b_max : λ · C(b) <= ρ_max · b · 1000 ms/s }
       b_s exists and 2 · C(b_s) <= T                                       (rate bound)

(An earlier form, λ · C(b_max) / b_max <= ρ_max · 1000, only asked for throughput: it let a
level whose full batches take more than T/2 carry a rate that it keeps up with but not within T;
static 30 % at 200 req/s, which that form allowed, kept only 0.89 of requests within 50 ms.)

Near the stack's last capacity the rate bound is a gamble. A larger level at utilization near
ρ_max rides out a Poisson burst only by stepping down to a smaller one for the batches the burst
lasts, and that works while the smallest SubLM has time to spare. In the SLO sweep of
2026-11-22 (README "Under load"), ρ_max 1.0 held 0.984-0.992 of requests within T at 200-300
req/s, but only 0.930 at 400 req/s, where static 5 % held 0.995-1.000. ρ_max 0.7 held 400 req/s
and gave up 0.06 effective MRR@10 at 300. So an optional spare margin σ (``min_spare``; 0 = off)
looks at the smallest level's utilization at full batches:

       u_j = λ · (c̄_j·t_j(b_max) + o) / (b_max · 1000 ms/s)
       a level k above the smallest needs u_j <= 1 - σ                       (spare bound)

where j, the rung that a burst steps down to (``spare_from``), is the next level below k
("next", the default) or the smallest ("smallest", the first form). With "smallest" one test
gates every level above the smallest at once, so near u_min = 1 - σ the per-batch estimate of λ
flips the batch between the largest level the other bounds allow and the smallest: in the SLO
sweep of 2026-11-23 at 400 req/s elastic served 5 % and 20 % about half the time each (30 1-s
windows of mean level 5 to 21), and the mix scored 0.362-0.386 effective MRR@10, under pure 10 %
(0.401) and 20 % (0.427-0.431). With "next" each level is guarded by the one below it: as λ
rises the level steps down one rung at a time, a batch's noise moves it between neighbours, and
near the smallest level's own capacity (u_min > 1 - σ) the bound is the first form's.

The handler's defaults are "next" and σ = 0.25, set by the probe of 2026-11-24 (README "Under
load", "The spare bound from the next level"; 3 runs a point, interleaved): at 300-400 req/s
they scored 0.398-0.442 effective MRR@10 at 0.990-0.9999 within T, against 0.367-0.431 for
"smallest" at σ 0.4 (the previous default, which 0.4 was set for: its probe in a slow stretch
raised the lowest within T from 0.951 to 0.988 at 400 req/s), and "next" at σ 0.4 stepped down
to level 5-11 already at 300-400 req/s (0.347-0.393).

The deadline rule picks the largest k that meets all of these. If no level meets them, the smallest
level serves whatever was not shed.

4. A standing queue is drained, not served at its limit (``standing_interval_ms``; 0 = off).
   Shedding request by request keeps each answer within T, but near the smallest level's
   capacity it can also hold the server in a second, worse equilibrium. Once a transient has
   filled the frontend's queue, every batch is full, its oldest requests are shed, and the rest
   are served just inside T; the model path costs about as much for the few that remain as for
   a full batch (in the SLO probe of 2026-11-24 at 600 req/s, level 5: 6.3 ms for 4 requests,
   7.9 ms for 8), so the worker still moves only a full batch per cycle, as many as arrive, and
   the queue never drains. The first run of the demo's elastic server at 600 req/s fell into
   it twice in a row after its first batches ran at level 50 on a cold worker: 0.72 within T,
   3,700-4,000 shed in 30 s, the youngest request of a batch 26.5 ms old at the median (3.5 ms
   in the runs that did not fall in), while static 5 % beside it kept 0.97-0.996. A batch that
   sheds every request costs the worker almost nothing, so shedding whole batches while the
   queue stands empties it in a few batches, after which every batch is young again. The test
   is CoDel's (Nichols & Jacobson, "Controlling Queue Delay", ACM Queue 2012): the queue stands
   when the youngest request of every batch for the last ``standing_interval_ms`` was older
   than the target τ = ``standing_target``·T (``StandingQueue``):

       standing_ms >= standing_interval_ms   =>   shed every request of the batch   (drain)

   The drain goes on batch by batch while the youngest request stays older than τ, and ends at
   the first batch younger than that. It is part of shedding (``late="shed"``) only. Measured
   beside the same archive without it (three SLO probes of 2026-11-24, T = 50 ms): past the 5 %
   level's capacity, at 800 req/s, 0.61-0.90 of requests within T against 0.41-0.73 (9
   pairings of 9); near it, at 600 req/s, 0.1-1.5 points fewer in 6 pairings of 7, the price
   of spells it drains that would have cleared alone.

5. σ is learned, not fixed (``SpareFeedback``; handler.spare_feedback, on by default). The
   spare bound trades quality at moderate load for T near the last rung's capacity, and where
   that trade lies depends on the machine: σ = 0.25 was set on a 2-core machine where t_50(1)
   was 6.1 ms; on one where it was 4.6 ms (probes of 2026-11-24, 18:30-20:00, README "Under
   load", "A spare bound that learns") the fixed 0.25 held the elastic server at a mean level
   of 18-24 at 600 req/s, 0.445-0.455 effective MRR@10, while static 30 % kept 0.99-1.00 within
   T for 0.465-0.473; σ = 0 matched static 30 % there (level 29.9, 0.4722) but missed 0.99 at
   800 and 1000 req/s (0.987, 0.988), where the fixed 0.25 held 0.998-1.000. So the serving
   core counts, per second, the requests that missed T (shed, or past T as the handler sees
   it) and moves σ within [0.02, min_spare]: down by a fifth after a second that missed at
   most a quarter of the budget (0.5 % of requests), up by 0.1 after one that missed more while
   some batch of it served a level that the fixed σ would have kept out (``Plan.spare_slack``:
   misses that the fixed σ would have had too are no reason to tighten), and not down again
   past the σ that missed (plus 0.05) until that floor has faded. It is never more cautious
   than the fixed σ.

Everything here is pure: no TorchServe, no clock, no I/O. The serving core passes the ages, g,
the calibration and c in, and gets a ``Plan`` back. Times are milliseconds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence

RULES = ("deadline", "paper")
LATE_POLICIES = ("shed", "serve")
SPARE_RUNGS = ("next", "smallest")
# what can hold a batch below the largest level (Plan.limited_by): the next larger level's failed bounds, or
# "standing" for a batch shed whole to drain a standing queue
BOUNDS = ("deadline", "queue", "rate", "spare", "standing")


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
        # t_k(b) for every whole b up to the last measured size, read by the per-batch path
        # (``t`` is called ~40 times per batch; the lookup halves the schedule's cost)
        table = {level: [0.0] + [self._interpolate(level, b) for b in range(1, self.batch_sizes[-1] + 1)]
                 for level in self.ms}
        object.__setattr__(self, "_table", table)

    def t(self, level: int, batch: float) -> float:
        """t_k(batch) in ms, linear between measured batch sizes, extrapolated past the last."""
        if type(batch) is int and 1 <= batch <= self.batch_sizes[-1]:
            return self._table[level][batch]
        return self._interpolate(level, batch)

    def _interpolate(self, level: int, batch: float) -> float:
        bs, ts = self.batch_sizes, self.ms[level]
        if len(bs) == 1:
            return ts[0] * batch / bs[0]
        i = min(max(bisect.bisect_left(bs, batch), 1), len(bs) - 1)
        b0, b1, t0, t1 = bs[i - 1], bs[i], ts[i - 1], ts[i]
        return max(t0 + (t1 - t0) * (batch - b0) / (b1 - b0), 1e-6)


def monotone_calibration(batch_sizes: Sequence[int], ms: dict[int, Sequence[float]]) -> Calibration:
    """A Calibration whose t_k(b) never falls as the level or the batch grows.

    A SubLM is a prefix of every larger one and a batch a prefix of every larger batch, so the
    true t_k(b) is non-decreasing in both; a measured table is not when a noisy second lands on
    one cell (on this shared machine a level-20 cell once read 14.7 ms beside level 30's 15.1 and
    level 15's 8.3). Per batch size, the times are fitted by isotonic regression over the levels
    (scikit-learn's IsotonicRegression: the closest non-decreasing sequence in least squares);
    then each level's times are made non-decreasing in the batch size by a running maximum,
    which keeps the order over levels.

    Args:
        batch_sizes: ascending batch sizes. ms: level -> measured milliseconds per batch size.

    Returns:
        The smoothed Calibration (the same levels and batch sizes).
    """
    from sklearn.isotonic import IsotonicRegression

    levels = sorted(ms)
    cols = []
    for j in range(len(batch_sizes)):
        y = [ms[k][j] for k in levels]
        cols.append(IsotonicRegression(increasing=True).fit_transform(levels, y) if len(levels) > 1 else y)
    out = {}
    for i, k in enumerate(levels):
        row, top = [], 0.0
        for j in range(len(batch_sizes)):
            top = max(top, float(cols[j][i]))
            row.append(top)
        out[k] = tuple(row)
    return Calibration(tuple(batch_sizes), out)


@dataclass(frozen=True)
class Plan:
    """What to do with one batch.

    Attributes:
        level: preserving level (percent) that serves the batch; None when every request is shed.
        serve: per request of the batch, True = compute it, False = shed it (503).
        predicted_ms: predicted processing time c·t_k(b) of the served part (0 when none).
        limited_by: the bounds that the next larger level failed ("deadline", "queue", "rate",
            "spare"), or those the smallest failed when none met them all; ("standing",) for a
            batch shed whole to drain a standing queue; empty when the largest level serves. Names
            from ``BOUNDS``. Counted by the server and exported (``ElasticLimitedBatches``), so ops
            can see what holds the level down.
        spare_slack: 1 - u_j of the chosen level's rung j (the largest σ at which the spare bound
            would still have let this level in), or None where the bound did not apply (the
            smallest level, a pinned level, no rate, σ = 0). ``SpareFeedback`` reads it.
    """

    level: int | None
    serve: tuple[bool, ...]
    predicted_ms: float
    limited_by: tuple[str, ...] = ()
    spare_slack: float | None = None


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


def keeps_up(arrival_rate_rps: float, cycle_ms: float, batch: int, max_utilization: float) -> bool:
    """λ·C(b) <= ρ·b·1000: cycles of ``cycle_ms`` serving ``batch`` requests each keep up with
    ``arrival_rate_rps`` (req/s) while filling at most ``max_utilization`` of the worker's time
    (the rate bound's and the spare bound's test, module docstring)."""
    return arrival_rate_rps * cycle_ms <= max_utilization * batch * 1000


def steady_cycle_ms(arrival_rate_rps: float, cal: Calibration, level: int, max_batch: int, overhead_ms: float,
                    mean_correction: float, max_utilization: float) -> float | None:
    """C(b_s) of the rate bound (module docstring): the cycle c̄·t_k(b) + o in ms at the smallest
    batch b <= max_batch that keeps up with ``arrival_rate_rps`` within the headroom
    ``max_utilization``, or None when not even full batches keep up."""
    def cycle(b: int) -> float:
        return mean_correction * cal.t(level, b) + overhead_ms

    def fits(b: int) -> bool:
        return keeps_up(arrival_rate_rps, cycle(b), b, max_utilization)

    if not fits(max_batch):  # per-request cost falls with b: full batches are the last chance
        return None
    return cycle(next(b for b in range(1, max_batch + 1) if fits(b)))


def plan_batch(ages_ms: Sequence[float], queue_size: int, latency_constraint_ms: float, cal: Calibration,
               max_batch: int, overhead_ms: float = 0.0, correction: float | Mapping[int, float] = 1.0,
               rule: str = "deadline", late: str = "shed", pin_level: int | None = None,
               arrival_rate_rps: float = 0.0, max_utilization: float = 1.0,
               mean_correction: float | Mapping[int, float] | None = None, min_spare: float = 0.0,
               return_share: float = 0.5, spare_from: str = "next", standing_ms: float = 0.0,
               standing_interval_ms: float = 0.0) -> Plan:
    """Level and shed decisions for one batch (module docstring: rules "deadline" and "paper").

    Args:
        ages_ms: per request of the batch, how long it has already waited (ms, >= 0).
        queue_size: g, requests still waiting behind the batch.
        latency_constraint_ms: T (ms, > 0).
        cal: calibrated t_k(b) per level.
        max_batch: TorchServe's batchSize (>= len(ages_ms)).
        overhead_ms: o, per-batch cost outside the model (ms, >= 0).
        correction: c, a high quantile of observed / predicted processing time (> 0), for the
            batch's own deadline: one for all levels, or one per level (level -> c_k, every
            calibrated level); the paper's rule ignores it.
        mean_correction: c̄, the mean of that ratio (> 0), for shedding, the queue bound and
            the rate bound, likewise one or per level; None = c.
        rule: "deadline" (own deadline and queue bound, corrected) or "paper" (queue bound only).
        late: "shed" (a request that cannot meet T at the smallest level is not computed) or
            "serve" (every request is computed, however late).
        pin_level: serve every batch at this level (static baseline); shedding still applies.
        arrival_rate_rps: λ, requests per second arriving lately (0 = unknown: no rate bound).
        max_utilization: ρ_max in (0, 1], the share of the worker's time the chosen level may fill
            at rate λ in the rate bound (deadline rule only).
        min_spare: σ in [0, 1), the spare bound (module docstring): a level above the smallest
            is chosen only while the smallest would fill at most 1 - σ of the worker's time at
            rate λ (deadline rule with λ > 0 only; 0 = off).
        return_share: r in [0, 2], the share of o budgeted for an answer's way back from the
            handler to the client (own deadline and shedding; module docstring).
        spare_from: the rung j whose spare the spare bound tests for a level k: "next" (the
            next calibrated level below k) or "smallest" (module docstring).
        standing_ms: how long the frontend's queue has stood (ms, >= 0; ``StandingQueue``).
        standing_interval_ms: drain a queue that has stood this long (ms, >= 0; 0 = off): every
            request of the batch is shed (module docstring, point 4). Shedding only.

    Returns:
        A Plan; ``serve`` has one flag per entry of ``ages_ms``.

    Raises:
        ValueError: an empty batch, a bad rule / late policy / pinned level, a negative age, or
            g < 0, T <= 0, o < 0, more requests than max_batch, min_spare outside [0, 1),
            return_share outside [0, 2], spare_from not in SPARE_RUNGS, or a negative
            standing_ms or standing_interval_ms.
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
    c_of, cm_of = _per_level(correction, cal, "correction"), _per_level(mean_correction, cal, "mean_correction")
    if arrival_rate_rps < 0 or not 0 < max_utilization <= 1:
        raise ValueError(f"arrival_rate_rps must be >= 0 and max_utilization in (0, 1], got {arrival_rate_rps}, "
                         f"{max_utilization}")
    if not 0 <= min_spare < 1:
        raise ValueError(f"min_spare must be in [0, 1), got {min_spare}")
    if not 0 <= return_share <= 2:
        raise ValueError(f"return_share must be in [0, 2], got {return_share}")
    if spare_from not in SPARE_RUNGS:
        raise ValueError(f"spare_from must be one of {SPARE_RUNGS}, got {spare_from!r}")
    if min(ages_ms) < 0:
        raise ValueError(f"ages_ms must be >= 0, got {min(ages_ms)}")
    if standing_ms < 0 or standing_interval_ms < 0:
        raise ValueError(f"standing_ms and standing_interval_ms must be >= 0, got {standing_ms}, "
                         f"{standing_interval_ms}")
    _check(queue_size, latency_constraint_ms, overhead_ms, len(ages_ms), max_batch)
    if late == "shed" and standing_interval_ms > 0 and standing_ms >= standing_interval_ms:
        return Plan(None, (False,) * len(ages_ms), 0.0, ("standing",))  # drain the standing queue
    T, o = latency_constraint_ms, overhead_ms
    way_back = return_share * o  # ms from the handler's end to the client (own deadline, shedding)
    if rule == "paper":
        c_of = cm_of = {k: 1.0 for k in cal.ms}
    levels = [pin_level] if pin_level is not None else sorted(cal.ms, reverse=True)
    smallest = levels[-1]

    serve = [True] * len(ages_ms)
    if late == "shed":  # drop the oldest while even the smallest level would answer it after T
        by_age = sorted(range(len(ages_ms)), key=lambda i: ages_ms[i], reverse=True)
        n = len(ages_ms)
        for i in by_age:
            if ages_ms[i] + cm_of[smallest] * cal.t(smallest, n) + way_back <= T:
                break
            serve[i] = False
            n -= 1
    b = sum(serve)
    if b == 0:
        return Plan(None, tuple(serve), 0.0)
    oldest = max(a for a, s in zip(ages_ms, serve) if s)

    spare_on = rule == "deadline" and arrival_rate_rps > 0 and min_spare > 0
    chosen, failed, chosen_slack = smallest, (), None
    for i, level in enumerate(levels):
        c, cm = c_of[level], cm_of[level]
        queue_ok = expected_latency_ms(queue_size, cm * cal.t(level, b) + o, cm * cal.t(level, max_batch) + o,
                                       max_batch) <= T
        own_ok = rule == "paper" or oldest + c * cal.t(level, b) + way_back <= T
        rate_ok = True
        if rule == "deadline" and arrival_rate_rps > 0:
            cycle = steady_cycle_ms(arrival_rate_rps, cal, level, max_batch, o, cm, max_utilization)
            rate_ok = cycle is not None and 2 * cycle <= T
        # the spare bound: a level above the smallest needs its rung j (the next level down, or
        # the smallest) to fill at most 1 - σ of the worker's time at λ and full batches
        level_spare_ok, slack = True, None
        if spare_on and level != smallest:
            rung = smallest if spare_from == "smallest" else levels[i + 1]
            cycle_j = cm_of[rung] * cal.t(rung, max_batch) + o
            level_spare_ok = keeps_up(arrival_rate_rps, cycle_j, max_batch, 1 - min_spare)
            slack = 1 - arrival_rate_rps * cycle_j / (max_batch * 1000)  # 1 - u_j
        if queue_ok and own_ok and rate_ok and level_spare_ok:
            chosen, chosen_slack = level, slack
            break
        failed = tuple(name for name, ok in (("deadline", own_ok), ("queue", queue_ok), ("rate", rate_ok),
                                             ("spare", level_spare_ok)) if not ok)
    return Plan(chosen, tuple(serve), c_of[chosen] * cal.t(chosen, b), failed, chosen_slack)


class StandingQueue:
    """How long the frontend's queue has stood: the time since which the youngest request of
    every batch was older than a target (CoDel's sojourn test; module docstring, point 4).

    The serving core calls ``observe`` once per batch with the batch's start (seconds, any
    monotonic clock) and its youngest request's age; a batch at or under the target ends the
    standing spell, and so does an idle worker, whose next batch is young.
    """

    def __init__(self) -> None:
        self.since: float | None = None  # start of the first batch of the current spell

    def observe(self, now_s: float, youngest_ms: float, target_ms: float) -> float:
        """Record a batch and return how long the queue has stood (ms; 0 when this batch's
        youngest request is within ``target_ms``, or the spell starts with this batch).

        >>> q = StandingQueue(); q.observe(0.0, 30, 20), q.observe(0.05, 25, 20), q.observe(0.1, 5, 20)
        (0.0, 50.0, 0.0)
        """
        if youngest_ms <= target_ms:
            self.since = None
            return 0.0
        if self.since is None:
            self.since = now_s
        return (now_s - self.since) * 1000


class SpareFeedback:
    """σ of the spare bound, learned from the requests that lately missed T (module docstring,
    point 5): tightened at once after an interval that missed more than the budget, loosened a
    little after each interval that missed none of it, and not again below the σ that last
    missed until that memory has faded.

    The serving core calls ``observe`` once per batch with the batch's start (seconds, any
    monotonic clock), its requests (the bad ones left out) and how many of them missed T (shed,
    or answered past T as the handler sees it). An interval closes once ``interval_s`` has passed
    and it holds at least ``min_requests`` (a quiet spell's handful is no evidence); then, with
    m = missed / requests of the interval and B = ``miss_budget``:

        m > B, and a batch of the interval got its level only because σ < σ_high
                    ->  floor = σ + margin;  σ = min(σ_high, σ + step_up)      (tighten)
        m <= B / 4  ->  σ = max(σ_low, floor, σ · decay);  floor = floor · fade  (loosen)
        otherwise   ->  σ unchanged

    The floor is TCP's slow-start threshold in another guise (Jacobson 1988): a loosening that
    ran into misses at σ is not repeated at once, or near the last rung's capacity, where every
    loosening lets a larger level in that cannot keep up, the loop would spend the budget on
    probing over and over (measured: README "Under load", "A spare bound that learns"). The floor
    fades by ``fade`` per clean interval (0.97: half in 23 s), so a machine or a load that got
    faster is found again.

    σ starts at ``start`` (handler.min_spare). σ_low > 0 keeps the bound on (0 would switch it
    off; schedule.plan_batch). Cost: O(1) per batch.

    >>> f = SpareFeedback(0.25, low=0.02, high=0.5, miss_budget=0.01, interval_s=1.0, min_requests=10)
    >>> [round(f.observe(t, 8, 0), 3) for t in (0.0, 1.0)]   # 16 requests in 1 s, none missed
    [0.25, 0.2]
    >>> [round(f.observe(t, 8, m), 3) for t, m in ((1.5, 2), (2.5, 0))]   # 2 of 16 missed
    [0.2, 0.3]
    >>> [round(f.observe(t, 16, 0), 4) for t in (3.5, 4.5)]   # clean: down to the floor (0.2 + 0.05), fading
    [0.25, 0.2425]
    """

    def __init__(self, start: float, low: float = 0.02, high: float = 0.5, miss_budget: float = 0.005,
                 interval_s: float = 1.0, min_requests: int = 50, step_up: float = 0.1, decay: float = 0.8,
                 margin: float = 0.05, fade: float = 0.97):
        if not 0 < low <= high < 1 or not low <= start <= high:
            raise ValueError(f"SpareFeedback: need 0 < low <= start <= high < 1, got low={low}, start={start}, "
                             f"high={high}")
        if not 0 < miss_budget < 1 or not interval_s > 0 or min_requests < 1 or not step_up > 0 \
                or not 0 < decay < 1 or not margin >= 0 or not 0 < fade <= 1:
            raise ValueError(f"SpareFeedback: need miss_budget in (0, 1), interval_s > 0, min_requests >= 1, "
                             f"step_up > 0, decay in (0, 1), margin >= 0, fade in (0, 1]; got {miss_budget}, "
                             f"{interval_s}, {min_requests}, {step_up}, {decay}, {margin}, {fade}")
        self.sigma, self.low, self.high = start, low, high
        self.miss_budget, self.interval_s, self.min_requests = miss_budget, interval_s, min_requests
        self.step_up, self.decay, self.margin, self.fade = step_up, decay, margin, fade
        self.floor = 0.0  # σ + margin at the last interval that missed, fading
        self._since: float | None = None  # start of the open interval
        self._requests = self._missed = 0
        self._loosened = False  # a batch of the open interval got its level only from a σ below high
        self.tightened = self.loosened = 0  # intervals that moved σ up / down (ops read them in describe)

    def loosened_by(self, spare_slack: float | None) -> bool:
        """Whether a batch whose plan had this ``Plan.spare_slack`` got its level only because σ
        was below ``high`` (what ``observe``'s ``loosened`` takes)."""
        return spare_slack is not None and spare_slack < self.high

    def observe(self, now_s: float, requests: int, missed: int, loosened: bool = True) -> float:
        """Record a batch; returns σ for the batches that follow.

        ``loosened``: this batch's level got in only because σ was below ``high`` (its spare
        slack, ``Plan.spare_slack``, was under ``high``). An interval's misses tighten σ only if
        one of its batches was such: misses that the fixed σ would have had as well (a burst at
        a level that σ = ``high`` lets in too) are not the loosening's doing.
        """
        if requests < 0 or not 0 <= missed <= requests:
            raise ValueError(f"SpareFeedback.observe: need 0 <= missed <= requests, got {missed}, {requests}")
        if self._since is None:
            self._since = now_s
        self._requests += requests
        self._missed += missed
        self._loosened = self._loosened or loosened
        if now_s - self._since >= self.interval_s and self._requests >= self.min_requests:
            share = self._missed / self._requests
            if share > self.miss_budget:
                if self._loosened:  # else the misses came at levels that σ = high lets in too: σ holds
                    self.floor = min(self.high, self.sigma + self.margin)
                    self.sigma = min(self.high, self.sigma + self.step_up)
                    self.tightened += 1
            elif share <= self.miss_budget / 4:
                self.sigma = max(self.low, self.floor, self.sigma * self.decay)
                self.floor *= self.fade
                self.loosened += 1
            self._since, self._requests, self._missed, self._loosened = now_s, 0, 0, False  # the next one
        return self.sigma


class ArrivalRate:
    """λ, the arrival rate that the rate and spare bounds read (requests per second): the requests
    of the batches that started within the last ``window_s`` seconds, this one included, over the
    time since the oldest of them started, taken as at least ``min_span_s`` (a few requests close
    together after a quiet spell are not a rush). Batches older than the window leave it, so a
    rush that has passed stops holding the level down.

    Why a window in seconds, not in batches: the first estimator read the last 32 batches that
    the age estimate keeps, which at 300-400 req/s (batches of 3-4) is 0.3-0.4 s, about 120
    arrivals: a Poisson count with a standard deviation near 9 %. The spare bound compares λ
    with a threshold, so that noise moved the level batch by batch between neighbours (module
    docstring, point 3), and near a static level's capacity the mix scored under that level.
    Over 2 s at 300 req/s the deviation is about 4 %; the batch's own deadline and the queue
    bound still see a burst at once.

    Cost: amortised O(1) per batch (a deque and a running sum).

    >>> r = ArrivalRate(window_s=1.0); r.observe(0.0, 4); r.observe(0.5, 4); r.rate(1.0, 2)
    10.0
    >>> r.rate(1.25, 2)  # the batch at 0.0 left the window: (4 + 2) / 0.75 s
    8.0
    """

    def __init__(self, window_s: float = 2.0, min_span_s: float = 0.25):
        if not (window_s > 0 and math.isfinite(window_s)) or not 0 < min_span_s <= window_s:
            raise ValueError(f"ArrivalRate: window_s must be > 0 and min_span_s in (0, window_s], got {window_s}, "
                             f"{min_span_s}")
        self.window_s, self.min_span_s = window_s, min_span_s
        self._batches: deque[tuple[float, int]] = deque()  # (start s, requests), oldest first
        self._sum = 0
        self._seen = False

    @property
    def batches(self) -> int:
        """Batches in the window as of the last ``rate`` call (older ones leave it there)."""
        return len(self._batches)

    def observe(self, start_s: float, requests: int) -> None:
        """Record a batch of ``requests`` that started at ``start_s`` (seconds, any monotonic clock)."""
        self._batches.append((start_s, requests))
        self._sum += requests
        self._seen = True

    def rate(self, now_s: float, requests: int) -> float:
        """λ at ``now_s`` for a batch of ``requests`` starting then (req/s); 0 before any batch."""
        while self._batches and now_s - self._batches[0][0] > self.window_s:
            self._sum -= self._batches.popleft()[1]
        if not self._batches:
            return requests / self.window_s if self._seen else 0.0
        return (self._sum + requests) / max(now_s - self._batches[0][0], self.min_span_s)


def youngest_age_ms(ages_ms: Sequence[float], from_header: Sequence[bool]) -> float:
    """The age of a batch's youngest request (ms): the least of the ages read from start headers;
    where none was, the FIFO estimate (``estimate_age_ms``, the oldest of n arrivals spread
    evenly over a window D: D·n/(n + 1)) divided by n, the youngest's D/(n + 1).

    Raises:
        ValueError: an empty batch, or lists of different lengths.
    """
    if not ages_ms or len(ages_ms) != len(from_header):
        raise ValueError(f"youngest_age_ms: {len(ages_ms)} ages and {len(from_header)} header flags")
    read = [a for a, h in zip(ages_ms, from_header) if h]
    if read:
        return min(read)
    return min(ages_ms) / len(ages_ms)


def _per_level(value: float | Mapping[int, float], cal: Calibration, name: str) -> dict[int, float]:
    """A correction given once or per level, as level -> value for every calibrated level."""
    per = dict(value) if isinstance(value, Mapping) else {k: value for k in cal.ms}
    if set(per) != set(cal.ms):
        raise ValueError(f"{name}: levels {sorted(per)} do not match the calibrated levels {sorted(cal.ms)}")
    if not all(isinstance(v, (int, float)) and v > 0 for v in per.values()):
        raise ValueError(f"{name} must be > 0, got {value}")
    return per


def transfer_correction(ratio: float, from_ms: float, to_ms: float, min_c: float = 0.5,
                        max_c: float = 4.0) -> float:
    """A ratio of observed / predicted time learned on batches predicted to take ``from_ms``,
    carried to a level predicted to take ``to_ms`` at the same batch sizes, the excess
    (ratio − 1)·from_ms being additive (module docstring, point 2):

        c_k = 1 + (ratio − 1) · from_ms / to_ms,   clipped to [min_c, max_c].

    Args:
        ratio: the learned c or c̄ (> 0). from_ms, to_ms: predicted milliseconds (> 0) of the
            batches it was learned on and of the level it goes to, at the same batch sizes.

    Returns:
        The level's ratio; ``ratio`` itself when either time is not positive.

    >>> transfer_correction(2.0, 4.0, 8.0)  # 4 ms lost on a 4-ms batch: 12 ms for an 8-ms one
    1.5
    """
    if not (from_ms > 0 and to_ms > 0):
        return ratio
    return min(max(1.0 + (ratio - 1.0) * from_ms / to_ms, min_c), max_c)


def level_corrections(every: "LatencyCorrection", own: Mapping[int, "LatencyCorrection"], cal: Calibration,
                      min_batches: int, large: Mapping[int, "LatencyCorrection"] | None = None
                      ) -> tuple[dict[int, float], dict[int, float]]:
    """(c_k, c̄_k) per level for plan_batch: a level's own ratios once its window holds
    ``min_batches`` batches, else those of ``every`` (all levels) carried to it as an additive
    excess at the window's mean batch size (``transfer_correction``; 1 when ``every`` is empty).

    Args:
        every: the correction over all levels' batches. own: level -> that level's correction
            (every calibrated level). cal: the calibration the ratios were taken against.
        min_batches: batches a level's own window needs before it is used (>= 1).
        large: for a large batch at hand (module docstring, point 2), level -> the correction
            over that level's large batches only: c_k is then the larger of the two tails where
            that window holds ``min_batches`` batches. c̄_k is unchanged (it adds up over
            batches of every size).
    """
    from_ms, b = every.predicted_mean_ms, every.batch_mean
    c, cm = {}, {}
    for k, mine in own.items():
        if mine.count >= min_batches:
            c[k], cm[k] = mine.value, mine.mean
        else:
            to_ms = cal.t(k, b) if b >= 1 else 0.0
            c[k] = transfer_correction(every.value, from_ms, to_ms, every.min_c, every.max_c)
            cm[k] = transfer_correction(every.mean, from_ms, to_ms, every.min_c, every.max_c)
        if large is not None and large[k].count >= min_batches:
            c[k] = max(c[k], large[k].value)
    return c, cm


def estimate_age_ms(now_s: float, history: Sequence[tuple[float, int, int]], idle_wait_ms: float,
                    last_end_s: float | None = None, batch_size: int = 1) -> float:
    """Age of the oldest request of the batch starting at ``now_s``, when no request carries a
    start time: the bound that the queue sizes seen at earlier batches put on it (FIFO queue).

    The head of this batch was already waiting when batch j-m started if the g seen then
    exceeded the requests served since: g_{j-m} >= b_{j-m+1} + ... + b_{j-1} + 1. Walking back
    from the previous batch, the first batch that did not see it waiting started before the
    head arrived: the head came within the window D from that start to now. Where no earlier
    batch saw it waiting, that is the previous batch's start: the head arrived while that batch
    ran. The n requests of this batch arrived in that window; taken as uniform in it (Poisson
    arrivals), the oldest of them is D·n/(n + 1) old on average, which is returned. (An age taken
    too low makes answers late; the whole window D, taken in a first version of this change,
    shed requests that had just arrived whenever the previous batch ran long.) Where every
    remembered batch saw the head waiting, the earliest of their starts is all that is known (a
    lower bound), and no estimate is below it. If the worker sat idle before this batch, the
    head waited about ``idle_wait_ms`` (batch delay plus IPC).

    Measured in the demo's rush (benchmarks/results/rush_probes/age-estimate/): with
    X-Request-Start on every request, the previous batch's start bounded the oldest request's
    true age to within 0.8 ms in 90 % of the batches that followed a busy worker (oldest /
    bound 0.8 at the median), while the earlier estimate, that bound capped at ``idle_wait_ms``,
    put ages of 13 ms (median) at about 7 ms; within T at the rush's peak rose from 0.914-0.948
    to 0.974-0.977 without the header (0.979-0.989 with it).

    Args:
        now_s: start of this batch (seconds, any monotonic clock shared with ``history``).
        history: (start_s, g, b) of earlier batches, oldest first: their start, the queue size g
            seen at their start, and their batch size.
        idle_wait_ms: what a request that finds the worker idle waits before the handler sees it.
        last_end_s: when the previous batch ended (same clock). A gap longer than ``idle_wait_ms``
            means the worker sat idle, so the frontend held nothing and no request of this batch
            waited longer than ``idle_wait_ms``, whatever earlier batches saw.
        batch_size: n, the requests of this batch (>= 1).

    Raises:
        ValueError: batch_size < 1.

    Returns:
        Estimated age in milliseconds (>= 0).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not history:
        return idle_wait_ms
    if last_end_s is not None and (now_s - last_end_s) * 1000 > idle_wait_ms:
        return idle_wait_ms
    since = 0  # requests served by the batches after batch j-m
    seen_at = None  # start of the earliest batch that saw the head waiting
    for start_s, g, b in reversed(history):
        if g >= since + 1:
            seen_at = start_s
            since += b
        else:  # it arrived after this batch started: the oldest of n uniform arrivals in the window
            age = (now_s - start_s) * 1000 * batch_size / (batch_size + 1)
            if seen_at is not None:  # ... and was already waiting when batch j-m started
                age = max(age, (now_s - seen_at) * 1000)
            return max(age, 0.0)
    return max((now_s - seen_at) * 1000, 0.0)


class LatencyCorrection:
    """c (``value``): a high quantile, and c̄ (``mean``): the mean, of observed / predicted
    processing time over recent batches.

    The calibration runs on an idle worker; under load the frontend shares the core and the
    machine is noisy. The quantile (not the mean) budgets for jitter, so that T holds for the
    tail. c starts at 1 and stays within [min_c, max_c].

    With ``max_age_s``, a ratio older than that leaves the window (``expire``); an empty window
    means c = c̄ = 1 again (the calibration, with no evidence against it). Why: a level whose
    ratios were high during a stall is not chosen again, so without an age limit nothing would
    ever replace them and the level would stay locked out (seen after an SLO sweep: c_40 at the
    4.0 clip from a stall, level 40 not served again).

    Args:
        window: batches remembered. quantile: in (0, 1]. min_c, max_c: clipping bounds (> 0).
        max_age_s: seconds a ratio counts (None: until ``window`` newer ones push it out).
    """

    def __init__(self, window: int = 200, quantile: float = 0.9, min_c: float = 0.5, max_c: float = 4.0,
                 max_age_s: float | None = None):
        if window < 1 or not 0 < quantile <= 1 or not 0 < min_c <= 1 <= max_c or (max_age_s is not None
                                                                                   and not max_age_s > 0):
            raise ValueError(f"LatencyCorrection: bad window={window}, quantile={quantile}, min_c={min_c}, "
                             f"max_c={max_c}, max_age_s={max_age_s}")
        self.quantile, self.min_c, self.max_c, self.max_age_s = quantile, min_c, max_c, max_age_s
        # (time s, ratio, predicted ms, batch size) in arrival order
        self._ratios: deque[tuple[float, float, float, int]] = deque(maxlen=window)
        # the same ratios sorted, and their sum, kept per insertion: no sort per batch (p99 of the
        # schedule's cost per batch 103-123 us against 127-135 us with sorted(); schedule_cost)
        self._ranked: list[float] = []
        self._sum = 0.0
        self._predicted_sum = 0.0  # ms, over the window
        self._batch_sum = 0
        self.value = 1.0
        self.mean = 1.0

    @property
    def count(self) -> int:
        """Batches in the window."""
        return len(self._ratios)

    @property
    def predicted_mean_ms(self) -> float:
        """Mean predicted (uncorrected) milliseconds of the batches in the window; 0 when empty."""
        return self._predicted_sum / len(self._ratios) if self._ratios else 0.0

    @property
    def batch_mean(self) -> float:
        """Mean batch size of the batches in the window; 0 when empty."""
        return self._batch_sum / len(self._ratios) if self._ratios else 0.0

    def _drop_oldest(self) -> None:
        _, old, predicted, batch = self._ratios.popleft()
        del self._ranked[bisect.bisect_left(self._ranked, old)]
        self._sum -= old
        self._predicted_sum -= predicted
        self._batch_sum -= batch

    def _update(self) -> None:
        ranked = self._ranked
        if not ranked:
            self.value = self.mean = 1.0
            self._sum = self._predicted_sum = 0.0
            self._batch_sum = 0
            return
        q = ranked[min(len(ranked) - 1, int(self.quantile * len(ranked)))]
        self.value = min(max(q, self.min_c), self.max_c)
        self.mean = min(max(self._sum / len(ranked), self.min_c), self.max_c)

    def _drop_expired(self, now_s: float) -> bool:
        """Drop the ratios older than max_age_s at ``now_s``; whether any went."""
        dropped = False
        while self.max_age_s is not None and self._ratios and now_s - self._ratios[0][0] > self.max_age_s:
            self._drop_oldest()
            dropped = True
        return dropped

    def expire(self, now_s: float) -> None:
        """Drop the ratios older than max_age_s at ``now_s`` (seconds, the clock of ``observe``)."""
        if self._drop_expired(now_s):
            self._update()

    def observe(self, predicted_ms: float, observed_ms: float, now_s: float = 0.0, batch: int = 1) -> float:
        """Record one batch of ``batch`` requests (both times in ms, predicted without the
        correction) at ``now_s`` (seconds, any monotonic clock; only differences count) and
        return the new c."""
        if predicted_ms > 0 and observed_ms >= 0:
            if len(self._ratios) == self._ratios.maxlen:
                self._drop_oldest()
            r = observed_ms / predicted_ms
            self._ratios.append((now_s, r, predicted_ms, batch))
            bisect.insort(self._ranked, r)
            self._sum += r
            self._predicted_sum += predicted_ms
            self._batch_sum += batch
            self._drop_expired(now_s)
            self._update()
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
