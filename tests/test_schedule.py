"""Elastic schedule: the paper's rule (g+1)·t_k <= T, the deadline rule with request ages and the
correction, shedding, age estimates, X-Request-Start parsing, validation."""

import pytest

from elastic.schedule import (ArrivalRate, Calibration, LatencyCorrection, StandingQueue, estimate_age_ms,
                              expected_latency_ms, level_corrections, parse_request_start, plan_batch,
                              transfer_correction, youngest_age_ms)

CAL = Calibration((1,), {50: (10.0,), 30: (6.0,), 10: (2.0,)})


def paper(g, T, cal=CAL, batch=1, max_batch=1, overhead_ms=0.0):
    """The paper's rule alone: no ages, no shedding."""
    return plan_batch([0.0] * batch, g, T, cal, max_batch, overhead_ms, rule="paper", late="serve").level


@pytest.mark.parametrize("g,level", [(0, 50), (5, 50), (6, 30), (9, 30), (10, 10), (29, 10), (30, 10), (500, 10)])
def test_paper_rule_largest_level_within_T(g, level):
    # T = 60 ms: 50% fits while (g+1)*10 <= 60 (g <= 5), 30% while (g+1)*6 <= 60 (g <= 9),
    # else the smallest level, even past its own bound (g >= 30)
    assert paper(g, 60.0) == level


def test_paper_inequality_exactly():
    for g in range(0, 40):
        for T in (5.0, 20.0, 60.0, 250.0):
            fits = [lv for lv, (t,) in CAL.ms.items() if (g + 1) * t <= T]
            assert paper(g, T) == (max(fits) if fits else 10)


def test_paper_rule_ignores_age_and_correction():
    # a request 55 ms old under T = 60: the paper's rule still picks 50% (it sees only g)
    plan = plan_batch([55.0], 0, 60.0, CAL, 1, correction=2.0, rule="paper", late="serve")
    assert plan.level == 50 and plan.serve == (True,)


def test_batching_counts_batches_ahead():
    cal = Calibration((1, 4, 8), {50: (10.0, 20.0, 30.0), 10: (2.0, 4.0, 6.0)})
    assert cal.t(50, 6) == pytest.approx(25.0)
    # g=16 waiting with batchSize 8 -> two full batches ahead: 20 (b=4) + 2*30 = 80 ms
    assert expected_latency_ms(16, cal.t(50, 4), cal.t(50, 8), 8) == pytest.approx(80.0)
    assert paper(16, 80.0, cal, batch=4, max_batch=8) == 50
    assert paper(17, 80.0, cal, batch=4, max_batch=8) == 10


def test_overhead_counts_once_per_batch():
    # o = 4 ms: 50% needs (g+1)*(10+4) <= 60 -> g <= 3; 30% (g+1)*(6+4) <= 60 -> g <= 5
    assert [paper(g, 60.0, overhead_ms=4.0) for g in (3, 4, 5, 6)] == [50, 30, 30, 10]


@pytest.mark.parametrize("age,level", [(0.0, 50), (50.0, 50), (50.1, 30), (54.0, 30), (54.1, 10), (58.0, 10)])
def test_deadline_rule_keeps_the_oldest_request_within_T(age, level):
    # T = 60, o = 0, c = 1, g = 0: 50% while age + 10 <= 60, 30% while age + 6 <= 60, then 10%
    plan = plan_batch([age, 0.0], 0, 60.0, Calibration((1, 2), {50: (10.0, 10.0), 30: (6.0, 6.0), 10: (2.0, 2.0)}), 2)
    assert plan.level == level and plan.serve == (True, True)


def test_deadline_rule_takes_the_stricter_of_age_and_queue():
    # g = 5 alone allows 50% ((5+1)*10 = 60); an age of 20 ms does not (20 + 10 + 5*10 > 60 is not
    # what counts: the own deadline 20 + 10 = 30 holds, the queue bound 60 <= 60 holds) -> 50%
    assert plan_batch([20.0], 5, 60.0, CAL, 1).level == 50
    # g = 6 breaks the queue bound at 50% -> 30%, whatever the age
    assert plan_batch([0.0], 6, 60.0, CAL, 1).level == 30


def test_correction_scales_processing_times():
    # c = 2: 50% costs 20 ms; the queue bound (g+1)*20 <= 60 holds for g <= 2
    assert [plan_batch([0.0], g, 60.0, CAL, 1, correction=2.0).level for g in (2, 3)] == [50, 30]
    # and the own deadline: age 41 + 20 > 60 -> 30% (41 + 12 <= 60)
    assert plan_batch([41.0], 0, 60.0, CAL, 1, correction=2.0).level == 30


def test_shedding_drops_only_what_cannot_make_it_and_never_computes_the_expired():
    cal = Calibration((1, 2, 4), {50: (10.0, 12.0, 16.0), 10: (2.0, 3.0, 5.0)})
    # T = 60: ages 70 (expired) and 58 (58 + t_10(b) > 60 for any b >= 1) are shed; 20 and 0 are served
    plan = plan_batch([70.0, 20.0, 58.0, 0.0], 0, 60.0, cal, 4)
    assert plan.serve == (False, True, False, True)
    assert plan.level == 50 and plan.predicted_ms == pytest.approx(12.0)  # t_50(2): oldest served 20 + 12 <= 60
    # shedding the oldest makes the batch smaller, so a request that fits at b = 3 is kept:
    # 55.5 + t_10(4)=5 > 60 but 55.5 + t_10(3)=4 <= 60
    plan = plan_batch([80.0, 55.5, 0.0, 0.0], 0, 60.0, cal, 4)
    assert plan.serve == (False, True, True, True) and plan.level == 10
    # everything expired: nothing computed
    plan = plan_batch([61.0, 90.0], 0, 60.0, cal, 4)
    assert plan.level is None and plan.serve == (False, False) and plan.predicted_ms == 0.0


def test_serve_late_computes_everything_at_the_smallest_level():
    plan = plan_batch([70.0, 0.0], 0, 60.0, Calibration((1, 2), {50: (10.0, 12.0), 10: (2.0, 3.0)}), 2, late="serve")
    assert plan.serve == (True, True) and plan.level == 10


def test_pinned_level_is_kept_and_still_sheds():
    plan = plan_batch([0.0], 1000, 60.0, CAL, 1, pin_level=50)
    assert plan.level == 50  # the static baseline never steps down
    plan = plan_batch([55.0], 0, 60.0, CAL, 1, pin_level=50)
    assert plan.serve == (False,)  # 55 + 10 > 60: shed even though 10% could have made it


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="latency_constraint_ms must be > 0"):
        plan_batch([0.0], 0, 0.0, CAL, 1)
    with pytest.raises(ValueError, match="queue_size must be >= 0"):
        plan_batch([0.0], -1, 10.0, CAL, 1)
    with pytest.raises(ValueError, match="batch must be in 1..max_batch=4"):
        plan_batch([0.0] * 5, 0, 10.0, CAL, 4)
    with pytest.raises(ValueError, match="overhead_ms must be >= 0"):
        plan_batch([0.0], 0, 10.0, CAL, 1, overhead_ms=-1.0)
    with pytest.raises(ValueError, match="ages_ms: the batch is empty"):
        plan_batch([], 0, 10.0, CAL, 1)
    with pytest.raises(ValueError, match="rule must be one of"):
        plan_batch([0.0], 0, 10.0, CAL, 1, rule="greedy")
    with pytest.raises(ValueError, match="late must be one of"):
        plan_batch([0.0], 0, 10.0, CAL, 1, late="drop")
    with pytest.raises(ValueError, match=r"pin_level 40 is not a calibrated level \[10, 30, 50\]"):
        plan_batch([0.0], 0, 10.0, CAL, 1, pin_level=40)
    with pytest.raises(ValueError, match="ages_ms must be >= 0"):
        plan_batch([-1.0], 0, 10.0, CAL, 1)
    with pytest.raises(ValueError, match="processing times must be > 0 ms"):
        Calibration((1,), {50: (0.0,)})


def test_age_estimate_from_queue_history():
    # no history: what a request finding the worker idle waits
    assert estimate_age_ms(10.0, [], 3.0) == 3.0
    # previous batch (start 9.990 s, b = 4) saw g = 0: this batch's head came in the 10 ms since;
    # the oldest of n requests uniform in that window is 10·n/(n + 1) ms old on average
    assert estimate_age_ms(10.0, [(9.990, 0, 4)], 3.0) == pytest.approx(5.0)
    assert estimate_age_ms(10.0, [(9.990, 0, 4)], 3.0, batch_size=4) == pytest.approx(8.0)
    assert estimate_age_ms(10.0, [(9.999, 0, 4)], 3.0) == pytest.approx(0.5)
    # previous batch saw g = 2 waiting, the one before (9.970) g = 0: it came between them:
    # 30·n/(n + 1) ms, but never below the 10 ms it was already known to wait
    assert estimate_age_ms(10.0, [(9.970, 0, 4), (9.990, 2, 4)], 3.0, batch_size=3) == pytest.approx(22.5)
    assert estimate_age_ms(10.0, [(9.985, 0, 4), (9.990, 2, 4)], 3.0) == pytest.approx(10.0)
    # two batches back saw g = 9 >= 4 + 1, three back g = 1 < 8 + 1: it came after 9.950
    assert estimate_age_ms(10.0, [(9.950, 1, 4), (9.970, 9, 4), (9.990, 5, 4)], 3.0, batch_size=4) == pytest.approx(40.0)
    # ... but g = 4 two back means the head (5th) was not yet queued at 9.970
    assert estimate_age_ms(10.0, [(9.950, 1, 4), (9.970, 4, 4), (9.990, 5, 4)], 3.0, batch_size=4) == pytest.approx(24.0)
    # every remembered batch saw it waiting: at least as old as the earliest of them
    assert estimate_age_ms(10.0, [(9.970, 9, 4), (9.990, 5, 4)], 3.0) == pytest.approx(30.0)
    # the worker sat idle for 500 ms since the last batch ended: nothing waited that long
    assert estimate_age_ms(10.0, [(9.470, 9, 4), (9.490, 5, 4)], 3.0, last_end_s=9.5) == pytest.approx(3.0)
    assert estimate_age_ms(10.0, [(9.470, 0, 4), (9.990, 0, 4)], 3.0, last_end_s=9.999,
                           batch_size=1) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        estimate_age_ms(10.0, [(9.990, 0, 4)], 3.0, batch_size=0)


def test_latency_correction_is_a_high_quantile_within_bounds():
    c = LatencyCorrection(window=10, quantile=0.9)
    assert c.value == 1.0
    for r in [1.0] * 8 + [3.0, 3.0]:
        c.observe(10.0, 10.0 * r)
    assert c.value == 3.0  # the 90th percentile of the last 10 ratios
    for _ in range(10):
        c.observe(10.0, 100.0)
    assert c.value == 4.0  # clipped at max_c
    for _ in range(10):
        c.observe(10.0, 1.0)
    assert c.value == 0.5  # clipped at min_c
    with pytest.raises(ValueError, match="LatencyCorrection: bad window=0"):
        LatencyCorrection(window=0)
    with pytest.raises(ValueError, match="max_age_s=0"):
        LatencyCorrection(max_age_s=0)


def test_latency_correction_forgets_ratios_older_than_max_age():
    c = LatencyCorrection(window=10, quantile=0.5, max_age_s=5.0)
    for t in range(4):
        c.observe(10.0, 30.0, float(t))  # 3.0 at t = 0..3
    c.observe(10.0, 10.0, 6.5)  # 1.0 at t = 6.5: the ratios of t = 0 and 1 are past 5 s
    assert c.count == 3 and c.value == 3.0 and c.mean == pytest.approx(7 / 3)
    c.expire(8.5)  # t = 2 and 3 go
    assert c.count == 1 and c.value == 1.0 and c.mean == 1.0
    c.observe(10.0, 20.0, 8.6)
    c.expire(20.0)  # all gone: back to the calibration
    assert c.count == 0 and c.value == 1.0 and c.mean == 1.0
    old = LatencyCorrection(window=3, quantile=1.0)  # no max_age_s: only the window bounds it
    for t in range(3):
        old.observe(10.0, 20.0, float(t))
    old.expire(1e9)
    assert old.count == 3 and old.value == 2.0


def test_latency_correction_keeps_the_mean_predicted_time_and_batch_of_its_window():
    c = LatencyCorrection(window=2, max_age_s=5.0)
    assert c.predicted_mean_ms == 0.0 and c.batch_mean == 0.0
    c.observe(4.0, 8.0, 0.0, 2)
    c.observe(8.0, 8.0, 1.0, 6)
    assert c.predicted_mean_ms == 6.0 and c.batch_mean == 4.0
    c.observe(10.0, 10.0, 2.0, 1)  # the window holds 2: the first batch leaves
    assert c.predicted_mean_ms == 9.0 and c.batch_mean == 3.5
    c.expire(6.5)  # only the last is younger than 5 s
    assert c.predicted_mean_ms == 10.0 and c.batch_mean == 1.0
    c.expire(100.0)
    assert c.predicted_mean_ms == 0.0 and c.batch_mean == 0.0


def test_transfer_correction_carries_the_excess_in_milliseconds():
    assert transfer_correction(2.0, 4.0, 8.0) == 1.5  # 4 ms lost: 12 / 8
    assert transfer_correction(2.0, 8.0, 4.0) == 3.0  # 8 ms lost: 12 / 4
    assert transfer_correction(0.8, 5.0, 10.0) == pytest.approx(0.9)  # faster than calibrated: the saving too
    assert transfer_correction(3.0, 10.0, 4.0, max_c=4.0) == 4.0  # clipped
    assert transfer_correction(1.7, 0.0, 4.0) == 1.7 and transfer_correction(1.7, 4.0, 0.0) == 1.7
    assert transfer_correction(1.0, 3.0, 30.0) == 1.0


def test_level_corrections_take_the_wider_tail_of_large_batches_where_there_are_enough():
    cal = Calibration((1, 8), {50: (7.0, 21.0), 5: (3.0, 7.0)})
    every, own = LatencyCorrection(quantile=0.9), {k: LatencyCorrection(quantile=0.9) for k in cal.ms}
    large = {k: LatencyCorrection(quantile=0.9) for k in cal.ms}
    for _ in range(10):
        for k in cal.ms:
            for c in (every, own[k]):
                c.observe(cal.t(k, 1), 1.2 * cal.t(k, 1), 0.0, 1)
    for _ in range(9):
        large[50].observe(21.0, 42.0, 0.0, 8)  # 2.0: one short of min_batches
    assert level_corrections(every, own, cal, 10, large) == level_corrections(every, own, cal, 10)
    large[50].observe(21.0, 42.0, 0.0, 8)
    c, cm = level_corrections(every, own, cal, 10, large)
    assert c[50] == 2.0 and c[5] == pytest.approx(1.2) and cm[50] == pytest.approx(1.2)
    for _ in range(10):
        large[5].observe(7.0, 7.0, 0.0, 8)  # a large tail below the pooled one does not lower c
    assert level_corrections(every, own, cal, 10, large)[0][5] == pytest.approx(1.2)


NOW = 1_700_000_000.0  # seconds since the epoch


@pytest.mark.parametrize("value,age", [
    ("t=1699999999.950", 50.0), ("1699999999.9", 100.0),  # seconds (nginx t=${msec})
    ("t=1699999999950", 50.0), ("1699999999950000", 50.0), ("1699999999950000000", 50.0),  # ms, us, ns
    ("t=1700000000.5", 0.0),  # 0.5 s in the future: clock skew, age 0
])
def test_request_start_forms(value, age):
    assert parse_request_start(value, now_epoch_s=NOW, max_age_ms=60_000) == pytest.approx(age, abs=1e-3)


@pytest.mark.parametrize("value", [None, "", "soon", "t=", "nan", "inf", "-3", "t=1700000005", "t=1699990000",
                                   "0.5"])
def test_absurd_request_start_is_none(value):
    # 5 s in the future; hours old; the epoch's first second
    assert parse_request_start(value, now_epoch_s=NOW, max_age_ms=60_000) is None


def test_rate_bound_keeps_up_with_the_arrival_rate():
    cal = Calibration((1, 8), {50: (5.0, 18.0), 20: (3.0, 10.0), 5: (2.0, 6.0)})
    # o = 2: per request at a full batch 50% costs 20/8 = 2.5 ms, 20% 1.5 ms, 5% 1 ms.
    # rho_max = 0.7 -> 50% keeps up to 280 req/s, 20% up to 466, then 5%; T = 100 leaves every
    # cycle within T/2
    levels = [plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=r, max_utilization=0.7).level
              for r in (100, 280, 281, 466, 467, 2000)]
    assert levels == [50, 50, 20, 20, 5, 5]
    plan = plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=2000, max_utilization=0.7)
    assert plan.limited_by == ("rate",)  # not even 5 % keeps up with 2000 req/s
    # the paper's rule knows nothing of the rate
    assert plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=2000, max_utilization=0.7,
                      rule="paper").level == 50
    with pytest.raises(ValueError, match="max_utilization in \\(0, 1\\]"):
        plan_batch([0.0], 0, 100.0, cal, 8, max_utilization=0.0)


def test_spare_bound_serves_the_smallest_level_near_its_capacity():
    cal = Calibration((1, 8), {50: (5.0, 18.0), 20: (3.0, 10.0), 5: (2.0, 6.0)})
    # o = 2: at full batches 5 % costs (6 + 2) / 8 = 1 ms per request, so u_min = rate / 1000.
    # rho_max = 1: 50 % keeps up to 400 req/s, 20 % to 666. sigma = 0.4 lets a larger level serve while
    # u_min <= 0.6 (600 req/s), and only the smallest above it
    def level(rate, sigma, **kw):
        return plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=rate, min_spare=sigma,
                          spare_from="smallest", **kw)

    assert [level(r, 0.0).level for r in (500, 600, 601, 666, 667)] == [20, 20, 20, 20, 5]
    assert [level(r, 0.4).level for r in (500, 600, 601, 666, 667)] == [20, 20, 5, 5, 5]
    assert level(601, 0.4).limited_by == ("spare",)  # 20 % met every other bound
    # c_mean of the smallest level counts: 1.5 makes u_min = rate * 11 / 8000, over 0.6 at 437 req/s
    slow5 = {50: 1.0, 20: 1.0, 5: 1.5}
    assert level(437, 0.4, correction=slow5, mean_correction=slow5).level == 5
    assert level(436, 0.4, correction=slow5, mean_correction=slow5).level == 20
    # unknown rate, the paper's rule and a pinned level know nothing of it
    assert level(0, 0.9).level == 50
    assert level(2000, 0.4, rule="paper").level == 50
    assert level(2000, 0.4, pin_level=20).level == 20
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_spare must be in \\[0, 1\\)"):
            level(100, bad)


def test_spare_bound_from_the_next_level_steps_down_one_rung_at_a_time():
    # full-batch cost per request, with o = 2: 5 % (6 + 2) / 8 = 1 ms, 10 % 1.25, 20 % 1.5, 50 % 2.5;
    # so u_j = rate * cost_j / 1000, and with sigma = 0.4 a level needs the one below it at u <= 0.6
    cal = Calibration((1, 8), {50: (5.0, 18.0), 20: (3.0, 10.0), 10: (2.5, 8.0), 5: (2.0, 6.0)})

    def plan(rate, spare_from="next", **kw):
        return plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=rate, min_spare=0.4,
                          spare_from=spare_from, **kw)

    # 50 % keeps up to 400 req/s (rate bound); 20 % needs 10 % at u <= 0.6 (480 req/s); 10 % needs 5 %
    # at u <= 0.6 (600 req/s); above that only the smallest
    assert [plan(r).level for r in (400, 401, 480, 481, 600, 601)] == [50, 20, 20, 10, 10, 5]
    assert plan(481).limited_by == ("spare",)  # 20 % met every other bound
    # the first form gates every level on the smallest: 20 % up to 600 req/s, then 5 % at once
    assert [plan(r, "smallest").level for r in (481, 600, 601)] == [20, 20, 5]
    # the rung's own mean correction counts: 10 % at c̄ 1.2 costs (9.6 + 2) / 8 = 1.45 ms, over 0.6 at 414 req/s
    slow10 = {50: 1.0, 20: 1.0, 10: 1.2, 5: 1.0}
    assert plan(414, correction=slow10, mean_correction=slow10).level == 10
    assert plan(413, correction=slow10, mean_correction=slow10).level == 20
    with pytest.raises(ValueError, match="spare_from must be one of \\('next', 'smallest'\\), got 'largest'"):
        plan(100, "largest")


def test_rate_bound_needs_the_settled_cycle_within_half_of_T():
    from elastic.schedule import steady_cycle_ms

    cal = Calibration((1, 8), {50: (5.0, 18.0), 20: (3.0, 10.0), 5: (2.0, 6.0)})
    # 50% at 280 req/s settles at full batches: a cycle of 18 + 2 = 20 ms; 20% at b = 3
    # (t = 3 + 7 * 2 / 7 = 5 ms, 280 * 7 ms = 1.96 requests per cycle <= 0.7 * 3)
    assert steady_cycle_ms(280, cal, 50, 8, 2.0, 1.0, 0.7) == pytest.approx(20.0)
    assert steady_cycle_ms(280, cal, 20, 8, 2.0, 1.0, 0.7) == pytest.approx(7.0)
    assert steady_cycle_ms(100, cal, 50, 8, 2.0, 1.0, 0.7) == pytest.approx(7.0)  # b = 1: 100 * 7 ms = 0.7
    assert steady_cycle_ms(281, cal, 50, 8, 2.0, 1.0, 0.7) is None
    assert steady_cycle_ms(281, cal, 50, 8, 2.0, 1.0, 0.8) is not None  # more headroom allowed
    # T = 35: 50%'s 20-ms cycle at 280 req/s would leave a request up to 2 * 20 = 40 ms: 20% serves
    plan = plan_batch([0.0], 0, 35.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=280, max_utilization=0.7)
    assert plan.level == 20 and plan.limited_by == ("rate",)
    assert plan_batch([0.0], 0, 35.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=100, max_utilization=0.7).level == 50
    # the correction lengthens the cycle: c_mean = 2 at 100 req/s settles 50% at b = 3, 2 * 8.71 + 2 > 35 / 2
    plan = plan_batch([0.0], 0, 35.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=100, max_utilization=0.7,
                      correction=2.0, mean_correction=2.0)
    assert plan.level == 20 and "rate" in plan.limited_by
    # a level that meets every bound has nothing to report
    assert plan_batch([0.0], 0, 100.0, cal, 8, arrival_rate_rps=10).limited_by == ()


def test_tail_correction_for_own_deadline_mean_for_the_rest():
    # c = 3 (tail), c_mean = 1: age 25 + 3*10 > 50 -> not 50%; 25 + 3*6 <= 50 -> 30%
    assert plan_batch([25.0], 0, 50.0, CAL, 1, correction=3.0, mean_correction=1.0).level == 30
    # shedding uses the mean: 47 + 1*2 <= 50 is kept (the tail 3*2 would have shed it)
    plan = plan_batch([47.0], 0, 50.0, CAL, 1, correction=3.0, mean_correction=1.0)
    assert plan.serve == (True,) and plan.level == 10
    # the queue bound uses the mean: g = 4 at 50%: 5 * 10 <= 50 holds with c_mean = 1
    assert plan_batch([0.0], 4, 50.0, CAL, 1, correction=1.5, mean_correction=1.0).level == 50
    assert plan_batch([0.0], 4, 50.0, CAL, 1, correction=1.0, mean_correction=1.5).level == 30


def test_monotone_calibration_smooths_a_noisy_cell_and_keeps_an_ordered_table():
    from elastic.schedule import monotone_calibration

    ordered = {5: (2.0, 3.0), 10: (3.0, 4.0), 20: (4.0, 6.0)}
    assert monotone_calibration((1, 8), ordered).ms == ordered  # already monotone: unchanged
    # level 20 at b=8 read 14.7 ms beside level 30's 15.1 and level 15's 8.3 (seen on this machine)
    noisy = {15: (3.3, 8.3), 20: (4.5, 14.7), 30: (4.6, 12.0), 50: (5.1, 17.5)}
    cal = monotone_calibration((1, 8), noisy)
    assert cal.ms[20][1] == pytest.approx((14.7 + 12.0) / 2) == cal.ms[30][1]  # pooled, not left above level 30
    assert cal.ms[15] == (3.3, 8.3) and cal.ms[50] == (5.1, 17.5)
    # a time that falls with the batch size is raised to the smaller batch's
    assert monotone_calibration((1, 2, 4), {5: (3.0, 2.5, 4.0)}).ms == {5: (3.0, 3.0, 4.0)}
    for b in (0, 1):
        times = [cal.ms[k][b] for k in sorted(cal.ms)]
        assert times == sorted(times)


def test_correction_per_level():
    # age 25, T = 50: 50% needs c_50 * 10 <= 25 - o/2 (o = 0)
    assert plan_batch([25.0], 0, 50.0, CAL, 1, correction={50: 2.0, 30: 1.0, 10: 1.0}).level == 50
    plan = plan_batch([25.0], 0, 50.0, CAL, 1, correction={50: 3.0, 30: 1.0, 10: 1.0})
    assert plan.level == 30 and plan.predicted_ms == 6.0 and plan.limited_by == ("deadline",)
    # the mean per level drives shedding at the smallest level: 47 + c̄_10 * 2 > 50 sheds
    assert plan_batch([47.0], 0, 50.0, CAL, 1, correction=1.0, mean_correction={50: 1.0, 30: 1.0, 10: 2.0}).serve \
        == (False,)
    with pytest.raises(ValueError, match=r"correction: levels \[50\] do not match the calibrated levels \[10, 30, 50\]"):
        plan_batch([0.0], 0, 50.0, CAL, 1, correction={50: 1.0})
    with pytest.raises(ValueError, match="mean_correction must be > 0"):
        plan_batch([0.0], 0, 50.0, CAL, 1, mean_correction={50: 1.0, 30: 0.0, 10: 1.0})


def test_calibration_table_lookup_equals_interpolation():
    cal = Calibration((1, 2, 4, 8), {10: (1.0, 1.5, 2.5, 4.5), 50: (3.0, 4.0, 7.0, 12.0)})
    for level in (10, 50):
        for b in range(1, 9):
            assert cal.t(level, b) == cal._interpolate(level, b)
    assert cal.t(50, 3) == pytest.approx(5.5) and cal.t(50, 6) == pytest.approx(9.5)
    assert cal.t(50, 3.0) == pytest.approx(5.5) and cal.t(50, 2.5) == pytest.approx(4.75)  # a mean batch size
    assert cal.t(50, 16) == pytest.approx(22.0)  # extrapolated past the last measured size


def test_the_way_back_is_budgeted_as_return_share_of_the_overhead():
    # o = 8 ms, age 35, T = 50: level 50 needs 35 + 10 + r·8 <= 50, so r = 0.5 (the default,
    # o/2: 49) keeps 50 % and r = 1 (the whole gap: 53) leaves 30 % (35 + 6 + 8 = 49)
    assert plan_batch([35.0], 0, 50.0, CAL, 1, overhead_ms=8.0).level == 50
    plan = plan_batch([35.0], 0, 50.0, CAL, 1, overhead_ms=8.0, return_share=1.0)
    assert plan.level == 30 and plan.limited_by == ("deadline",)
    # shedding budgets the same way back: 41 + t_10 (2) + r·8 <= 50 at r = 0.5, > 50 at r = 1
    assert plan_batch([41.0], 0, 50.0, CAL, 1, overhead_ms=8.0).serve == (True,)
    assert plan_batch([41.0], 0, 50.0, CAL, 1, overhead_ms=8.0, return_share=1.0).serve == (False,)
    # r = 0: no way back at all (43 + 6 <= 50), against 43 + 2 + 4 at r = 0.5
    assert plan_batch([43.0], 0, 50.0, CAL, 1, overhead_ms=8.0, return_share=0.0).level == 30
    assert plan_batch([43.0], 0, 50.0, CAL, 1, overhead_ms=8.0).level == 10
    for bad in (-0.1, 2.5):
        with pytest.raises(ValueError, match=rf"return_share must be in \[0, 2\], got {bad}"):
            plan_batch([0.0], 0, 50.0, CAL, 1, return_share=bad)


def test_a_standing_queue_sheds_the_whole_batch_only_once_it_has_stood_long_enough():
    # ages 20-30 ms at T = 60: each request fits at level 50 (30 + 10 <= 60), so only the drain sheds
    ages = [30.0, 20.0]
    assert plan_batch(ages, 8, 60.0, CAL, 8, standing_ms=99.0, standing_interval_ms=100.0).serve == (True, True)
    plan = plan_batch(ages, 8, 60.0, CAL, 8, standing_ms=100.0, standing_interval_ms=100.0)
    assert plan.level is None and plan.serve == (False, False) and plan.limited_by == ("standing",)
    assert plan.predicted_ms == 0.0
    # off (interval 0), or serving late requests: no drain
    assert plan_batch(ages, 0, 60.0, CAL, 8, standing_ms=1e6, standing_interval_ms=0.0).level == 50
    assert plan_batch(ages, 0, 60.0, CAL, 8, late="serve", standing_ms=1e6, standing_interval_ms=100.0).level == 50
    with pytest.raises(ValueError, match="standing_ms and standing_interval_ms must be >= 0, got -1.0, 100.0"):
        plan_batch(ages, 8, 60.0, CAL, 8, standing_ms=-1.0, standing_interval_ms=100.0)


def test_standing_queue_counts_from_the_first_old_batch_and_a_young_one_ends_it():
    q = StandingQueue()
    assert q.observe(10.0, 25.0, 20.0) == 0.0  # the spell starts with this batch
    assert q.observe(10.04, 21.0, 20.0) == pytest.approx(40.0)
    assert q.observe(10.12, 30.0, 20.0) == pytest.approx(120.0)
    assert q.observe(10.13, 20.0, 20.0) == 0.0  # within the target: over
    assert q.observe(10.5, 40.0, 20.0) == 0.0  # a new spell
    assert q.observe(10.6, 40.0, 20.0) == pytest.approx(100.0)


def test_youngest_age_reads_headers_else_the_estimate_spread_over_the_batch():
    assert youngest_age_ms([30.0, 12.0, 50.0], [True, True, False]) == 12.0  # the estimate (50) is not read
    # no header: the estimate is the oldest's, D·n/(n+1); the youngest's is D/(n+1), 1/n of it
    assert youngest_age_ms([40.0] * 4, [False] * 4) == 10.0
    with pytest.raises(ValueError, match="youngest_age_ms: 2 ages and 1 header flags"):
        youngest_age_ms([1.0, 2.0], [True])


def test_arrival_rate_forgets_a_rush_that_left_its_window():
    r = ArrivalRate(window_s=1.0, min_span_s=0.25)
    assert r.rate(100.0, 1) == 0.0  # no batch yet
    for i in range(20):  # a rush: 20 batches of 8 over the half second before t = 100
        r.observe(99.5 + i * 0.025, 8)
    assert r.rate(100.0, 8) == pytest.approx((160 + 8) / 0.5)
    # 1.5 s later the rush is out of the window: a lone request is not a rush
    assert r.rate(101.5, 1) == pytest.approx(1.0)
    # a few requests close together after a quiet spell count over min_span_s, not their gap
    r.observe(102.0, 2)
    assert r.rate(102.01, 2) == pytest.approx(4 / 0.25)


@pytest.mark.parametrize("window_s,min_span_s", [(0, 0.25), (float("inf"), 0.25), (1.0, 0), (1.0, 2.0)])
def test_arrival_rate_rejects_bad_windows(window_s, min_span_s):
    with pytest.raises(ValueError, match=r"ArrivalRate: window_s must be > 0 and min_span_s in \(0, window_s\]"):
        ArrivalRate(window_s, min_span_s)


def test_spare_feedback_tightens_after_a_missed_interval_and_loosens_after_clean_ones():
    from elastic.schedule import SpareFeedback

    f = SpareFeedback(0.25, low=0.02, high=0.5, miss_budget=0.005, interval_s=1.0, min_requests=50)
    # an interval closes after 1 s holding >= 50 requests: 10 batches of 8 over 1 s, none missed
    for i in range(11):
        f.observe(i / 10, 8, 0)
    t = 2.0
    assert f.sigma == pytest.approx(0.2) and f.loosened == 1
    # clean seconds shrink σ by a fifth each, down to the floor and never below (0 would switch the bound off)
    for _ in range(40):
        f.observe(t, 100, 0)
        t += 1.0
    assert f.sigma == pytest.approx(0.02)
    # one second over the budget (1 of 100 > 0.5 %) tightens at once by 0.1, and remembers σ + 0.05 as a floor
    f.observe(t, 100, 1)
    t += 1.0
    assert f.sigma == pytest.approx(0.12) and f.floor == pytest.approx(0.07) and f.tightened == 1
    # loosening stops at the floor, which fades by 3 % a clean second, so σ comes back down slowly
    f.observe(t, 100, 0)
    t += 1.0
    assert f.sigma == pytest.approx(0.096)
    f.observe(t, 100, 0)
    t += 1.0
    assert f.sigma == pytest.approx(0.0768)
    f.observe(t, 100, 0)
    t += 1.0
    assert f.sigma == pytest.approx(0.07 * 0.97 ** 2)
    for _ in range(100):
        f.observe(t, 100, 0)
        t += 1.0
    assert f.sigma == pytest.approx(0.02)
    # misses second after second: up to the ceiling and no further
    for _ in range(20):
        f.observe(t, 100, 10)
        t += 1.0
    assert f.sigma == pytest.approx(0.5) and f.floor == pytest.approx(0.5)
    # within the budget but over a quarter of it: σ holds
    f.observe(t, 1000, 3)
    t += 1.0
    assert f.sigma == pytest.approx(0.5)
    # a quiet spell's handful is no evidence: the interval stays open until it holds min_requests
    g = SpareFeedback(0.25, interval_s=1.0, min_requests=50)
    for i in range(10):
        g.observe(i * 1.0, 2, 2)
    assert g.sigma == 0.25 and g.tightened == 0
    g.observe(30.0, 40, 0)  # 60 requests, 20 missed
    assert g.sigma == pytest.approx(0.35)


def test_spare_feedback_rejects_bad_arguments():
    from elastic.schedule import SpareFeedback

    with pytest.raises(ValueError, match=r"need 0 < low <= start <= high < 1, got low=0.02, start=0.6, high=0.5"):
        SpareFeedback(0.6)
    with pytest.raises(ValueError, match=r"need 0 < low <= start <= high < 1, got low=0, start=0.25"):
        SpareFeedback(0.25, low=0)
    with pytest.raises(ValueError, match=r"need miss_budget in \(0, 1\)"):
        SpareFeedback(0.25, miss_budget=0)
    with pytest.raises(ValueError, match=r"need 0 <= missed <= requests, got 5, 4"):
        SpareFeedback(0.25).observe(0.0, 4, 5)


def test_only_misses_after_a_loosened_level_tighten_sigma():
    from elastic.schedule import SpareFeedback

    f = SpareFeedback(0.25, interval_s=1.0, min_requests=10)
    f.sigma = 0.05
    f.observe(0.0, 100, 0, loosened=False)
    f.observe(1.0, 100, 50, loosened=False)  # a burst at levels that σ = 0.25 lets in too: not σ's doing
    assert f.sigma == 0.05 and f.tightened == 0 and f.floor == 0.0
    f.observe(1.5, 100, 50, loosened=False)
    f.observe(2.0, 100, 0, loosened=True)  # one batch of the interval needed the loosened σ: its misses count
    assert f.sigma == pytest.approx(0.15) and f.floor == pytest.approx(0.1) and f.tightened == 1


def test_plan_reports_the_spare_slack_of_the_chosen_level():
    # as in test_spare_bound_from_the_next_level...: u_j = rate * cost_j / 1000 at full batches, o = 2
    cal = Calibration((1, 8), {50: (5.0, 18.0), 20: (3.0, 10.0), 10: (2.5, 8.0), 5: (2.0, 6.0)})

    def plan(rate, sigma=0.4, **kw):
        return plan_batch([0.0], 0, 100.0, cal, 8, overhead_ms=2.0, arrival_rate_rps=rate, min_spare=sigma, **kw)

    p = plan(400)  # 50 % serves; its rung, 20 %, fills 400 * 1.5 / 1000 = 0.6
    assert p.level == 50 and p.spare_slack == pytest.approx(0.4)
    p = plan(481)  # 20 % is out (10 % would fill 0.601 > 0.6); 10 % serves, its rung 5 % fills 0.481
    assert p.level == 10 and p.spare_slack == pytest.approx(1 - 0.481)
    assert plan(481, sigma=0.3).level == 20  # a smaller σ lets 20 % in: slack 1 - 0.601
    assert plan(481, sigma=0.3).spare_slack == pytest.approx(1 - 481 * 1.25 / 1000)
    assert plan(700).level == 5 and plan(700).spare_slack is None  # the smallest has no rung below
    assert plan(400, sigma=0.0).spare_slack is None  # the bound is off
    assert plan(400, pin_level=20).spare_slack is None  # a pinned level is never above the smallest of its list
