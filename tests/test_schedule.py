"""Elastic schedule: the largest SubLM with (g+1)·t_k <= T, batching, validation."""

import pytest

from elastic.schedule import Calibration, choose_level, expected_latency_ms

CAL = Calibration((1,), {50: (10.0,), 30: (6.0,), 10: (2.0,)})


@pytest.mark.parametrize("g,level", [(0, 50), (5, 50), (6, 30), (9, 30), (10, 10), (29, 10), (30, 10), (500, 10)])
def test_largest_level_within_T(g, level):
    # T = 60 ms: 50% fits while (g+1)*10 <= 60 (g <= 5), 30% while (g+1)*6 <= 60 (g <= 9),
    # else the smallest level, even past its own bound (g >= 30)
    assert choose_level(g, 60.0, CAL) == level


def test_paper_inequality_exactly():
    for g in range(0, 40):
        for T in (5.0, 20.0, 60.0, 250.0):
            k = choose_level(g, T, CAL)
            fits = [lv for lv, (t,) in CAL.ms.items() if (g + 1) * t <= T]
            assert k == (max(fits) if fits else 10)


def test_batching_counts_batches_ahead():
    cal = Calibration((1, 4, 8), {50: (10.0, 20.0, 30.0), 10: (2.0, 4.0, 6.0)})
    assert cal.t(50, 6) == pytest.approx(25.0)
    # g=16 waiting with batchSize 8 -> two full batches ahead: 20 (b=4) + 2*30 = 80 ms
    assert expected_latency_ms(16, cal.t(50, 4), cal.t(50, 8), 8) == pytest.approx(80.0)
    assert choose_level(16, 80.0, cal, batch=4, max_batch=8) == 50
    assert choose_level(17, 80.0, cal, batch=4, max_batch=8) == 10


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="latency_constraint_ms must be > 0"):
        choose_level(0, 0.0, CAL)
    with pytest.raises(ValueError, match="queue_size must be >= 0"):
        choose_level(-1, 10.0, CAL)
    with pytest.raises(ValueError, match="batch must be in 1..max_batch=4"):
        choose_level(0, 10.0, CAL, batch=5, max_batch=4)
    with pytest.raises(ValueError, match="processing times must be > 0 ms"):
        Calibration((1,), {50: (0.0,)})


def test_overhead_counts_once_per_batch():
    # o = 4 ms: 50% needs (g+1)*(10+4) <= 60 -> g <= 3; 30% (g+1)*(6+4) <= 60 -> g <= 5
    assert [choose_level(g, 60.0, CAL, overhead_ms=4.0) for g in (3, 4, 5, 6)] == [50, 30, 30, 10]
    with pytest.raises(ValueError, match="overhead_ms must be >= 0"):
        choose_level(0, 60.0, CAL, overhead_ms=-1.0)
