"""Serving core without TorchServe: request parsing, settings, per-request errors in a batch,
level choice from the queue size and request ages, shedding, pinned levels, and the TorchServe
handler over a MockContext."""

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch

from elastic.schedule import ArrivalRate, Calibration, LatencyCorrection
from tests.conftest import faiss_top
from elastic.service import BadRequest, ElasticRetriever, FixedQueue, HandlerSettings, http_refusal, parse_query


def test_parse_query_forms():
    assert parse_query({"query": " what is rba "}) == "what is rba"
    assert parse_query(b'{"query": "what is rba"}') == "what is rba"
    assert parse_query(bytearray(b"plain text query")) == "plain text query"


@pytest.mark.parametrize("body,msg", [
    (b'{"query": "x"', "malformed JSON"),
    ({"q": "x"}, 'must have a "query" field'),
    ({"query": 42}, "query must be a string, got int"),
    ({"query": "   "}, "query is empty"),
    (b"", "query is empty"),
    (b"\xff\xfe", "not UTF-8"),
    ({"query": "a" * 3000}, "3000 characters, the limit is 2000"),
])
def test_parse_query_errors(body, msg):
    with pytest.raises(BadRequest, match=msg):
        parse_query(body)


def test_settings_validation_names_the_field():
    s = HandlerSettings.from_yaml({"latency_constraint_ms": 80}, environ={})
    assert s.latency_constraint_ms == 80.0
    assert HandlerSettings.from_yaml({"latency_constraint_ms": 80}, {"ELASTIC_LATENCY_CONSTRAINT_MS": "25"}).latency_constraint_ms == 25.0
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: must be a positive number"):
        HandlerSettings.from_yaml({"latency_constraint_ms": -5}, environ={})
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: expected float, got 'fast'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": "fast"}, environ={})
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: missing"):
        HandlerSettings.from_yaml({}, environ={})
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: must be a positive number"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 10}, environ={"ELASTIC_LATENCY_CONSTRAINT_MS": "nan"})
    with pytest.raises(ValueError, match="handler.speed: unknown setting"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 10, "speed": 1}, environ={})


@pytest.mark.parametrize("field,value,msg", [
    ("schedule", "fastest", r"handler.schedule: expected one of \['deadline', 'paper'\], got 'fastest'"),
    ("late_requests", "drop", r"handler.late_requests: expected one of \['shed', 'serve'\], got 'drop'"),
    ("pin_level", "big", "handler.pin_level: expected Optional\\[int\\], got 'big'"),
    ("retry_after_s", 0, "handler.retry_after_s: must be >= 1, got 0"),
    ("request_start_max_age_ms", -1, "handler.request_start_max_age_ms: must be > 0"),
    ("worker_nice", -21, r"handler.worker_nice: must be in \[-20, 19\], got -21"),
    ("deadline_quantile", 1.5, r"handler.deadline_quantile: must be in \(0, 1\], got 1.5"),
    ("min_spare", 1, r"handler.min_spare: must be in \[0, 1\), got 1.0"),
    ("spare_from", "largest", r"handler.spare_from: expected one of \['next', 'smallest'\], got 'largest'"),
    ("miss_budget", 0, r"handler.miss_budget: must be in \(0, 0.5\), got 0.0"),
    ("spare_feedback", "maybe", r"handler.spare_feedback: expected bool, got 'maybe'"),
    ("max_utilization", 0, r"handler.max_utilization: must be in \(0, 1\], got 0.0"),
    ("return_share", 3, r"handler.return_share: must be in \[0, 2\], got 3.0"),
    ("standing_target", 0, r"handler.standing_target: must be in \(0, 1\], got 0.0"),
    ("standing_interval_ms", -1, r"handler.standing_interval_ms: must be >= 0 milliseconds \(0 = off\), got -1.0"),
    ("standing_interval_ms", "inf", r"handler.standing_interval_ms: must be >= 0 milliseconds"),
    ("rate_window_s", 0, r"handler.rate_window_s: must be a positive number of seconds, got 0.0"),
    ("rate_window_s", "nan", r"handler.rate_window_s: must be a positive number of seconds"),
])
def test_schedule_settings_are_validated(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, field: value}, environ={})
    ok = HandlerSettings.from_yaml({"latency_constraint_ms": 50, "pin_level": None}, environ={})
    assert ok.pin_level is None and ok.schedule == "deadline" and ok.late_requests == "shed"


@pytest.fixture(scope="module")
def retriever(tiny_elastic):
    return ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16,
                                                          calibration_repeats=3), max_batch=4, queue=FixedQueue(0))


def now_header(age_ms: float = 0.0) -> str:
    return f"t={time.time() - age_ms / 1000:.6f}"


def test_bad_request_does_not_fail_its_batch(retriever):
    out = retriever.handle_batch([{"query": "what is a bank"}, b"{oops", {"query": "word " * 40}, b"who wrote hamlet"])
    assert [r.status for r in out] == [200, 400, 200, 200]
    assert "malformed JSON" in out[1].payload["error"]
    assert out[2].payload["truncated"] is True and out[0].payload["truncated"] is False
    assert len(out[0].payload["results"]) == 10 and out[0].payload["level"] == 50
    scores = [h["score"] for h in out[0].payload["results"]]
    assert scores == sorted(scores, reverse=True)
    # Server-Timing: the batch's model time within the handler's time, on good answers only
    import re
    m = re.fullmatch(r"wait;dur=([0-9.]+), model;dur=([0-9.]+), handler;dur=([0-9.]+)", out[0].headers["Server-Timing"])
    assert m and float(m[1]) >= 0 and 0 < float(m[2]) <= float(m[3])
    assert out[3].headers["Server-Timing"].endswith(out[0].headers["Server-Timing"].split(", ", 1)[1])  # one batch
    assert "Server-Timing" not in out[1].headers


def test_long_queries_are_truncated_as_offline_evaluation_encodes_them_or_refused(retriever, tiny_elastic, monkeypatch):
    import dataclasses

    long_query = "what is the population of " + "the largest city in the northern region of " * 4
    out = retriever.handle_batch([{"query": long_query}])[0].payload
    q = retriever.encoder.encode([long_query], out["level"], 16)  # the tokenizer's truncation to 16 tokens
    top = faiss_top(tiny_elastic, q)[0]
    assert out["truncated"] is True and [h["pid"] for h in out["results"]] == [retriever.pids[j] for j in top]
    monkeypatch.setattr(retriever, "settings", dataclasses.replace(retriever.settings, long_queries="refuse"))
    out = retriever.handle_batch([{"query": long_query}, {"query": "short one"}])
    assert [r.status for r in out] == [400, 200]
    assert re.search(r"query has \d+ tokens, the limit is 16 \(handler.long_queries: refuse\)", out[0].payload["error"])
    with pytest.raises(ValueError, match=r"handler.long_queries: expected one of \['truncate', 'refuse'\], got 'cut'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "long_queries": "cut"}, environ={})


@pytest.mark.parametrize("body,ctype,status", [
    (bytearray(b""), None, 405),  # what a GET delivers
    (None, "application/x-www-form-urlencoded", 415),  # a form: split into fields, no body
    (None, "multipart/form-data; boundary=x", 415),
    (b"<q>x</q>", "application/xml", 415),
    (b'{"query": "x"}', "Application/JSON; charset=utf-8", None),
    ("hello", "text/plain", None),
    (b'{"query": "x"}', None, None),  # no Content-Type with a body: read as JSON or text
    (bytearray(b""), "application/json", None),  # an empty POST: the parser's 400 says what is wrong
])
def test_http_refusal(body, ctype, status):
    r = http_refusal(body, ctype, 'a JSON body {"query": "..."}')
    assert (r and r.status) == status
    if status == 405:
        assert r.headers == {"Allow": "POST"} and r.payload["error"].startswith('method not allowed: POST a JSON body')
    if status == 415:
        assert "unsupported Content-Type" in r.payload["error"]
        assert 'send a JSON body {"query": "..."}' in r.payload["error"]


def test_answers_equal_direct_search_at_that_level(retriever, tiny_elastic):
    out = retriever.handle_batch([{"query": "what is a bank"}])[0].payload
    q = retriever.encoder.encode(["what is a bank"], out["level"], 16)
    idx = faiss_top(tiny_elastic, q)
    assert [h["pid"] for h in out["results"]] == [retriever.pids[j] for j in idx[0]]
    assert retriever.index is None and retriever._matrix.shape == (q.shape[1], len(retriever.pids))  # one copy


def test_packed_levels_answer_as_the_sliced_model_does(retriever, tiny_elastic):
    packed = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16,
                                                            calibration_repeats=1, packed_levels=True),
                              max_batch=4, queue=FixedQueue(0))
    queries = ["what is a bank", "who wrote hamlet", "boiling point of water at altitude"]
    items = packed._prepare([{"query": q} for q in queries])
    for level in packed.levels:
        got, want = packed._run(items, level), retriever._run(items, level)
        assert np.allclose(got[0], want[0], atol=1e-5) and (got[1] == want[1]).all()
    assert packed.describe()["packed_bytes"] > 0 and retriever.describe()["packed_bytes"] == 0
    with pytest.raises(ValueError, match=r"level 7 is not in submap.json"):
        packed._run(items, 7)


def test_the_worker_runs_its_matrix_products_in_mkl_unless_onednn_is_set(tiny_elastic):
    """handler.onednn: False (the default) turns torch's oneDNN path off in the worker process,
    True leaves it on; describe() says which, and both answer alike."""
    was = torch.backends.mkldnn.enabled
    queries = ["what is a bank", "who wrote hamlet"]
    try:
        on = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, calibration_repeats=1,
                                                            calibration_cache=False, onednn=True), max_batch=2)
        assert torch.backends.mkldnn.enabled is True and on.describe()["onednn"] is True
        want = on._run(on._prepare([{"query": q} for q in queries]), min(on.levels))
        off = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, calibration_repeats=1,
                                                             calibration_cache=False), max_batch=2)
        assert off.settings.onednn is False
        assert torch.backends.mkldnn.enabled is False and off.describe()["onednn"] is False
        got = off._run(off._prepare([{"query": q} for q in queries]), min(off.levels))
        assert np.allclose(got[0], want[0], atol=1e-5) and (got[1] == want[1]).all()
    finally:
        torch.backends.mkldnn.enabled = was
    assert HandlerSettings.from_yaml({"latency_constraint_ms": 50, "onednn": "true"}, environ={}).onednn is True
    with pytest.raises(ValueError, match="handler.onednn: expected bool, got 'fast'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "onednn": "fast"}, environ={})


def fix_schedule_inputs(monkeypatch, retriever, cal):
    """For one test: t_k from ``cal``, c = c̄ = 1 throughout, o = 0, no arrival rate (no
    utilization bound) and no standing queue (no drain), so the level depends only on what the
    test varies, not on the clock or the module fixture's learned state."""
    monkeypatch.setattr(retriever, "calibration", cal)
    monkeypatch.setattr(retriever, "correction", LatencyCorrection(min_c=1.0, max_c=1.0))
    monkeypatch.setattr(retriever, "level_correction", {k: LatencyCorrection(min_c=1.0, max_c=1.0) for k in cal.ms})
    monkeypatch.setattr(retriever, "large_correction", {k: LatencyCorrection(min_c=1.0, max_c=1.0) for k in cal.ms})
    monkeypatch.setattr(retriever, "overhead_ms", 0.0)
    monkeypatch.setattr(retriever.arrivals, "rate", lambda now, n: 0.0)
    monkeypatch.setattr(retriever.standing, "observe", lambda now_s, youngest_ms, target_ms: 0.0)


def test_level_follows_queue_size(retriever, monkeypatch):
    # t_k, c and λ set here, so that g alone decides (a busy machine's clock and the module's
    # learned correction do not): T = 1000 ms, t_50(1) = 100 ms, t_10(4) = 60 ms
    cal = Calibration((1, 4), {50: (100.0, 300.0), 30: (60.0, 200.0), 10: (20.0, 60.0)})
    fix_schedule_inputs(monkeypatch, retriever, cal)
    try:
        retriever.queue.queue_size = 1000  # seen only after a full batch (4): g = 1000 - 4
        out = retriever.handle_batch([{"query": "cheap"}] * 4, [now_header()] * 4)
        # 249 full batches behind this one: no level drains them within T, so the smallest serves
        assert [r.payload["level"] for r in out] == [10] * 4 and out[0].payload["queue_size"] == 996
        assert retriever.queue.polls >= 1  # a full batch asks for a fresh g
        polls = retriever.queue.polls
        # a partly filled batch: the frontend's queue ran dry, so g = 0 and the largest level fits
        out = retriever.handle_batch([{"query": "cheap"}], [now_header()])
        assert out[0].payload["level"] == 50 and out[0].payload["queue_size"] == 0
        assert retriever.queue.queue_size == 0 and retriever.queue.polls == polls
    finally:
        retriever.queue.queue_size = 0


def distinct_calibration(server) -> Calibration:
    """A calibration whose levels are strictly apart (t_k(b) ∝ k·(1 + b)), for tests that reason on
    ratios between levels: the tiny model's measured times tie after the monotone clamp about one
    fixture in six, which made those tests flaky."""
    sizes = server.calibration.batch_sizes
    return Calibration(sizes, {k: tuple(0.01 * k * (1 + b) for b in sizes) for k in server.levels})


def test_a_level_uses_its_own_correction_once_it_has_served_enough_batches(retriever, monkeypatch):
    levels = retriever.levels
    monkeypatch.setattr(retriever, "calibration", distinct_calibration(retriever))
    monkeypatch.setattr(retriever, "correction", LatencyCorrection())
    monkeypatch.setattr(retriever, "level_correction", {k: LatencyCorrection() for k in levels})
    small, large = levels[-1], levels[0]
    t = retriever.calibration.t
    for _ in range(retriever.LEVEL_MIN_BATCHES - 1):
        retriever.correction.observe(t(small, 1), 1.5 * t(small, 1))  # all levels: 1.5
        retriever.level_correction[small].observe(t(small, 1), 2.0 * t(small, 1))  # the small level alone: 2.0
    c, cm = retriever._corrections(1.0, 1)
    assert c[small] == pytest.approx(1.5) and cm[small] == pytest.approx(1.5)  # too few of its own: all levels'
    retriever.level_correction[small].observe(t(small, 1), 2.0 * t(small, 1))
    c, cm = retriever._corrections(1.0, 1)
    assert c[small] == 2.0 and cm[small] == pytest.approx(2.0)
    # the large level borrows the all-level excess (0.5·t_small ms), not the ratio
    assert c[large] == pytest.approx(1 + 0.5 * t(small, 1) / t(large, 1)) and c[large] < 1.5


def test_a_large_batch_budgets_for_the_tail_of_the_levels_large_batches(retriever, monkeypatch):
    levels = retriever.levels
    monkeypatch.setattr(retriever, "correction", LatencyCorrection())
    monkeypatch.setattr(retriever, "level_correction", {k: LatencyCorrection() for k in levels})
    monkeypatch.setattr(retriever, "large_correction", {k: LatencyCorrection() for k in levels})
    level = levels[0]
    t = retriever.calibration.t
    assert retriever.max_batch == 4 and not retriever._large(2) and retriever._large(3)
    for i in range(200):  # the pooled window: one large batch in 40, at 2.5 (the large ones' tail is wider)
        b, ratio = (4, 2.5) if i % 40 == 0 else (1, 1.1)
        retriever.correction.observe(t(level, b), ratio * t(level, b), 0.0, b)
        retriever.level_correction[level].observe(t(level, b), ratio * t(level, b), 0.0, b)
    for _ in range(retriever.LEVEL_MIN_BATCHES):  # the large batches' own window (kept for longer)
        retriever.large_correction[level].observe(t(level, 4), 2.5 * t(level, 4), 0.0, 4)
    pooled = retriever.level_correction[level].value
    small_c, small_cm = retriever._corrections(0.0, 2)
    large_c, large_cm = retriever._corrections(0.0, 3)
    assert small_c[level] == pooled < 2.5 and large_c[level] == 2.5  # only a large batch at hand pays the wider tail
    assert large_cm == small_cm  # the mean (queue, rate and spare bounds) pools every size
    assert retriever._corrections(0.0, 3)[0][levels[-1]] == small_c[levels[-1]]  # a level without large batches: pooled
    monkeypatch.setattr(retriever, "settings", HandlerSettings(latency_constraint_ms=1000.0, large_batch_tail=False))
    assert retriever._corrections(0.0, 3)[0][level] == pooled


def test_only_large_batches_feed_the_large_batch_tail(retriever, monkeypatch):
    monkeypatch.setattr(retriever, "large_correction", {k: LatencyCorrection() for k in retriever.levels})
    retriever.handle_batch([{"query": "one"}, {"query": "two"}], [now_header()] * 2)
    assert sum(lc.count for lc in retriever.large_correction.values()) == 0
    out = retriever.handle_batch([{"query": "q"}] * 4, [now_header()] * 4)
    assert retriever.large_correction[out[0].payload["level"]].count == 1
    assert retriever.describe()["large_batch_corrections"][str(out[0].payload["level"])]["batches"] == 1


def test_a_borrowed_correction_is_an_additive_excess_at_the_mean_batch(retriever, monkeypatch):
    levels = retriever.levels
    monkeypatch.setattr(retriever, "correction", LatencyCorrection())
    monkeypatch.setattr(retriever, "level_correction", {k: LatencyCorrection() for k in levels})
    cal = retriever.calibration
    small, large = levels[-1], levels[0]
    for b in (2, 4):  # the small level lost 30 % of its time; mean batch 3
        t = cal.t(small, b)
        retriever.correction.observe(t, 1.3 * t, 0.0, b)
    c, cm = retriever._corrections(0.0, 1)
    from_ms = (cal.t(small, 2) + cal.t(small, 4)) / 2
    assert cm[large] == pytest.approx(1 + 0.3 * from_ms / cal.t(large, 3))
    assert 1.0 < cm[large] < cm[small] == pytest.approx(1 + 0.3 * from_ms / cal.t(small, 3))


def test_a_level_held_off_by_old_ratios_comes_back_when_they_expire(retriever, monkeypatch):
    levels = retriever.levels
    monkeypatch.setattr(retriever, "calibration", distinct_calibration(retriever))
    age = retriever.CORRECTION_MAX_AGE_S
    monkeypatch.setattr(retriever, "correction", LatencyCorrection(max_age_s=age))
    monkeypatch.setattr(retriever, "level_correction", {k: LatencyCorrection(max_age_s=age) for k in levels})
    small = levels[-1]
    ts = retriever.calibration.t(small, 1)
    for _ in range(retriever.LEVEL_MIN_BATCHES + 5):  # a stall at t = 0: the small level at the 4.0 clip
        retriever.level_correction[small].observe(ts, 6 * ts, 0.0)
        retriever.correction.observe(ts, 6 * ts, 0.0)
    for _ in range(5):  # batches since, at 1.5
        retriever.correction.observe(ts, 1.5 * ts, age - 1)
    assert retriever._corrections(age - 0.5, 1)[0][small] == 4.0  # its own ratios still count: held off
    c, cm = retriever._corrections(age + 0.5, 1)  # the stall's ratios are older than CORRECTION_MAX_AGE_S
    assert c[small] == 1.5 and cm[small] == pytest.approx(1.5) and retriever.level_correction[small].count == 0
    c, _ = retriever._corrections(2 * age + 1, 1)  # nothing in the last CORRECTION_MAX_AGE_S: the calibration itself
    assert c[small] == 1.0 and retriever.correction.count == 0


def test_old_requests_are_shed_with_retry_after_and_others_served(retriever):
    T = retriever.settings.latency_constraint_ms
    before = dict(retriever.counters)
    out = retriever.handle_batch([{"query": "late"}, {"query": "fresh"}, b"{bad"],
                                 [now_header(T + 5), now_header(0), now_header(0)])
    assert [r.status for r in out] == [503, 200, 400]
    assert out[0].headers == {"Retry-After": "1"} and "within T = 1000 ms" in out[0].payload["error"]
    assert retriever.counters["shed"] == before["shed"] + 1
    # age just under T: even the smallest level cannot finish it in time -> shed, not computed
    t10 = retriever.calibration.t(10, 1)
    out = retriever.handle_batch([{"query": "nearly late"}], [now_header(T - t10 / 4)])
    assert out[0].status == 503
    # the same request under late_requests=serve is answered (late)
    retriever.settings = HandlerSettings(latency_constraint_ms=T, query_max_length=16, late_requests="serve")
    try:
        out = retriever.handle_batch([{"query": "late"}], [now_header(T + 5)])
        assert out[0].status == 200 and out[0].payload["level"] == 10
    finally:
        retriever.settings = HandlerSettings(latency_constraint_ms=T, query_max_length=16)


def test_a_standing_queue_is_drained_whole_batches_then_served_again(retriever, monkeypatch):
    import dataclasses

    T = retriever.settings.latency_constraint_ms  # 1000 ms: tau = 0.4 T = 400 ms
    monkeypatch.setattr(retriever, "settings", dataclasses.replace(retriever.settings, standing_interval_ms=20.0))
    before = dict(retriever.counters)
    queries = [{"query": "q one"}, {"query": "q two"}]
    # every request 0.5 T old: each can still be answered within T, but the queue stands
    first = retriever.handle_batch(queries, [now_header(0.6 * T), now_header(0.5 * T)])
    assert [r.status for r in first] == [200, 200]  # the spell starts: nothing to drain yet
    time.sleep(0.03)  # the spell outlasts standing_interval_ms
    retriever.telemetry.flush()
    drained = retriever.handle_batch(queries, [now_header(0.6 * T), now_header(0.5 * T)])
    assert ("ElasticLimitedBatches", "standing", 1.0) in retriever.telemetry.flush()  # exported for ops
    assert [r.status for r in drained] == [503, 503]
    assert drained[0].headers == {"Retry-After": "1"} and "within T = 1000 ms" in drained[0].payload["error"]
    assert retriever.counters["shed_standing"] == before["shed_standing"] + 2
    assert retriever.limited_by["standing"] >= 1
    # one young request ends the spell: the batch is served, and so is the next old one
    young = retriever.handle_batch(queries, [now_header(0.6 * T), now_header(0.0)])
    assert [r.status for r in young] == [200, 200]
    assert [r.status for r in retriever.handle_batch(queries[:1], [now_header(0.5 * T)])] == [200]
    # off: a queue that stands is served at its limit, as before
    monkeypatch.setattr(retriever, "settings", dataclasses.replace(retriever.settings, standing_interval_ms=0.0))
    time.sleep(0.03)
    assert [r.status for r in retriever.handle_batch(queries, [now_header(0.5 * T)] * 2)] == [200, 200]


def far_apart_calibration(T: float) -> Calibration:
    """Processing times far apart (a tiny model's t_50 and t_10 differ by a fraction of a ms, which
    a busy machine spends between the header and the decision), so that a check does not hang on
    the clock: t_10 = 10 % of T, t_30 = 30 %, t_50 = 50 % at batch 1."""
    return Calibration((1, 4), {50: (0.5 * T, 2 * T), 30: (0.3 * T, 1.2 * T), 10: (0.1 * T, 0.4 * T)})


def test_age_lowers_the_level(retriever, monkeypatch):
    T = retriever.settings.latency_constraint_ms
    fix_schedule_inputs(monkeypatch, retriever, far_apart_calibration(T))
    # room for the smallest level only: T - age = 20% of T lies between t_10 and t_30
    out = retriever.handle_batch([{"query": "old but in time"}], [now_header(0.8 * T)])
    assert out[0].status == 200 and out[0].payload["level"] == 10
    # room for 30 but not 50
    out = retriever.handle_batch([{"query": "old but in time"}], [now_header(0.6 * T)])
    assert out[0].status == 200 and out[0].payload["level"] == 30


def test_the_handler_s_own_time_before_the_model_counts_in_the_age(retriever, monkeypatch):
    # tokenizing that takes 20 % of T is time the request has spent: with an age of 0.4 T at the
    # batch's start, 50 % (t_50 = 0.5 T) still fits before it and no longer after it
    T = retriever.settings.latency_constraint_ms
    fix_schedule_inputs(monkeypatch, retriever, far_apart_calibration(T))
    out = retriever.handle_batch([{"query": "quick to parse"}], [now_header(0.4 * T)])
    assert out[0].status == 200 and out[0].payload["level"] == 50
    prepare = retriever._prepare

    def slow_prepare(bodies):
        time.sleep(0.2 * T / 1000)
        return prepare(bodies)

    monkeypatch.setattr(retriever, "_prepare", slow_prepare)
    out = retriever.handle_batch([{"query": "slow to parse"}], [now_header(0.4 * T)])
    assert out[0].status == 200 and out[0].payload["level"] == 30
    # Server-Timing's wait is still the age when the batch began
    wait = float(re.search(r"wait;dur=([0-9.]+)", out[0].headers["Server-Timing"]).group(1))
    assert 0.4 * T <= wait < 0.55 * T


@pytest.mark.parametrize("value", ["soon", "t=abc", f"t={time.time() + 3600:.3f}", f"t={time.time() - 3 * 3600:.3f}",
                                   "nan", "-5"])
def test_absurd_request_start_is_ignored_and_counted(retriever, value):
    before = retriever.counters["request_start_ignored"]
    out = retriever.handle_batch([{"query": "what is a bank"}], [value])
    assert out[0].status == 200
    assert retriever.counters["request_start_ignored"] == before + 1


def test_pinned_level_serves_every_batch_at_that_level(tiny_elastic):
    r = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, pin_level=30, calibration_repeats=2),
                         max_batch=4, queue=FixedQueue(500))
    out = r.handle_batch([{"query": "a"}] * 4, [now_header()] * 4)
    assert {x.payload["level"] for x in out} == {30}
    with pytest.raises(ValueError, match=r"handler.pin_level: 40 is not a level of submap.json \[50, 30, 10\]"):
        ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=10.0, pin_level=40))


def test_submap_not_matching_weights_fails_at_load(tiny_elastic, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_elastic, bad)
    sm = json.loads((bad / "submap.json").read_text())
    sm["levels"]["50"]["heads"][0] += 1
    (bad / "submap.json").write_text(json.dumps(sm))
    with pytest.raises(ValueError, match=r"submap.json levels\['50'\] \(the stored layout\) does not match the weights"):
        ElasticRetriever(bad, HandlerSettings(latency_constraint_ms=10.0))


class MockContext:
    """TorchServe's Context, reduced to what the handler touches (ts.context.Context), with
    TorchServe's own metrics cache as ``metrics`` (what the worker builds from ts/configs/metrics.yaml)."""

    def __init__(self, model_dir, yaml_cfg):
        from pathlib import Path

        import ts
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        self.metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        self.metrics.initialize_cache()
        self.system_properties = {"model_dir": str(model_dir)}
        self.model_yaml_config = yaml_cfg
        self.model_name = "elastic"
        self.statuses = {}
        self.headers_out = {}
        self.headers_in = {}

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = (code, phrase)

    def get_request_header(self, idx, key):
        return self.headers_in.get(idx, {}).get(key)

    def get_all_request_header(self, idx):
        return self.headers_in.get(idx, {})

    def set_response_header(self, idx, key, value):
        self.headers_out.setdefault(idx, {})[key] = value


def test_handler_over_mock_context(tiny_elastic):
    from handler.elastic_handler import ElasticDenserHandler

    ctx = MockContext(tiny_elastic, {"batchSize": 2, "handler": {"latency_constraint_ms": 500, "calibration_repeats": 2,
                                                                 "management_address": "http://127.0.0.1:9"}})
    h = ElasticDenserHandler()
    h.initialize(ctx)
    try:
        out = h.handle([{"body": {"query": "what is a bank"}}, {"body": {"query": ""}}], ctx)
        assert out[0]["level"] == 50 and len(out[0]["results"]) == 10
        assert ctx.statuses == {1: (400, "query is empty")} and out[1] == {"error": "query is empty"}
        assert h.describe_handle()["batch_sizes"] == [1, 2]
        # the start header, whatever its case: an old request is shed with Retry-After
        assert set(ctx.headers_out) == {0} and ctx.headers_out[0]["Server-Timing"].startswith("wait;dur=")
        ctx.statuses, ctx.headers_out = {}, {}
        ctx.headers_in = {0: {"x-request-start": now_header(2000)}, 1: {"X-Request-Start": now_header()}}
        out = h.handle([{"body": {"query": "old"}}, {"body": {"query": "new"}}], ctx)
        assert ctx.statuses[0][0] == 503 and ctx.headers_out[0] == {"Retry-After": "1"} and out[1]["level"] == 50
        assert set(ctx.headers_out[1]) == {"Server-Timing"}
        # what TorchServe delivers for a GET, and for a form post (fields, no body): 405 and 415,
        # and the JSON request beside them is served
        ctx.statuses, ctx.headers_out = {}, {}
        ctx.headers_in = {0: {"body": "{'content-type': ''}", "content-length": "0"},
                          1: {"query": "{'content-type': ''}", "Content-Type": "application/x-www-form-urlencoded"},
                          2: {"Content-Type": "application/json"}}
        out = h.handle([{"body": bytearray(b"")}, {"query": bytearray(b"hello")}, {"body": {"query": "bank"}}], ctx)
        assert ctx.statuses[0][0] == 405 and ctx.headers_out[0] == {"Allow": "POST"}
        assert ctx.statuses[1][0] == 415 and "application/x-www-form-urlencoded" in out[1]["error"]
        assert 2 not in ctx.statuses and out[2]["level"] == 50
    finally:
        h.poller.stop()
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: must be a positive number"):
        ElasticDenserHandler().initialize(MockContext(tiny_elastic, {"handler": {"latency_constraint_ms": 0}}))


def test_overhead_is_learned_only_from_gaps_with_waiting_requests(retriever):
    retriever.overhead_ms, retriever._overhead_weight, retriever._last_end = 0.0, 0.0, None
    retriever.handle_batch([{"query": "a"}])
    time.sleep(0.02)
    retriever.handle_batch([{"query": "b"}])  # the batch before was partly filled: idle gap, not overhead
    assert retriever.overhead_ms == 0.0
    retriever.handle_batch([{"query": "c"}] * 4)  # full: requests were waiting
    time.sleep(0.01)
    retriever.handle_batch([{"query": "d"}])  # the gap is overhead
    assert retriever.overhead_ms > 0.0
    retriever.overhead_ms, retriever._overhead_weight = 0.0, 0.0


def test_overhead_is_the_bias_corrected_mean_of_the_gaps_from_the_first_one(retriever):
    r = retriever
    saved = (r.overhead_ms, r._overhead_weight, r._last_end, r._last_waiting)
    try:
        r.overhead_ms, r._overhead_weight, r._last_waiting = 0.0, 0.0, True

        def gap(ms: float) -> None:
            r._last_end = 10.0
            r._observe_gap(10.0 + ms / 1000)

        gap(4.0)
        assert r.overhead_ms == pytest.approx(4.0)  # the first gap sets o; it does not start from 0
        gap(6.0)
        a = r.OVERHEAD_EWMA  # the exponentially weighted mean of 4 and 6, weights (1 - a) and 1
        assert r.overhead_ms == pytest.approx((4.0 * (1 - a) + 6.0) / (2 - a))
        for _ in range(400):
            gap(6.0)
        assert r.overhead_ms == pytest.approx(6.0, abs=1e-6)  # then a plain EWMA of weight a
        before = r.overhead_ms
        gap(10.0)
        assert r.overhead_ms == pytest.approx(before + a * (10.0 - before), rel=1e-6)
        gap(r.OVERHEAD_CAP_MS + 1)  # a stall is not overhead
        r._last_waiting = False
        gap(3.0)  # nor is an idle gap
        assert r.overhead_ms == pytest.approx(before + a * (10.0 - before), rel=1e-6)
    finally:
        r.overhead_ms, r._overhead_weight, r._last_end, r._last_waiting = saved


def test_arrival_rate_counts_every_batch_of_its_window(retriever, monkeypatch):
    """The handler's λ counts every batch of the last rate_window_s (2 s), not only the HISTORY
    (32) batches that the age estimate keeps."""
    monkeypatch.setattr(retriever, "arrivals", ArrivalRate(retriever.settings.rate_window_s))
    assert retriever.settings.rate_window_s == 2.0
    t0 = time.perf_counter()
    for _ in range(retriever.HISTORY + 8):
        retriever.handle_batch([{"query": "what is a bank"}])
    elapsed = time.perf_counter() - t0
    if elapsed >= 2.0:
        pytest.skip(f"{retriever.HISTORY + 8} batches took {elapsed:.1f} s, longer than the window")
    assert retriever.arrivals.rate(time.perf_counter(), 0) > 0
    assert retriever.arrivals.batches == retriever.HISTORY + 8 > len(retriever.history)
    d = retriever.describe()
    assert d["rate_window_s"] == 2.0 and d["arrival_rate_rps"] > 0


def test_sgemm_search_equals_faiss_flat_ip_and_other_indexes_keep_faiss():
    import faiss
    import numpy as np
    import torch

    from elastic.service import flat_ip_matrix

    rng = np.random.default_rng(3)
    x = rng.standard_normal((301, 37)).astype(np.float32)
    q = rng.standard_normal((8, 37)).astype(np.float32)
    ip = faiss.IndexFlatIP(37)
    ip.add(x)
    m = flat_ip_matrix(ip)
    assert m.shape == (37, 301) and m.is_contiguous()  # a passage per column
    d_ref, i_ref = ip.search(q, 10)
    for b in range(1, 9):  # every batch size the worker runs (the small-M kernels differ)
        top = torch.topk(torch.from_numpy(q[:b]) @ m, 10, dim=1)
        assert np.array_equal(top.indices.numpy(), i_ref[:b])
        assert np.allclose(top.values.numpy(), d_ref[:b], atol=1e-5)
    l2 = faiss.IndexFlatL2(37)
    l2.add(x)
    assert flat_ip_matrix(l2) is None  # L2 distances are not inner products: FAISS searches


def test_worker_nice_without_the_capability_fails_the_load_naming_the_field(tiny_elastic, monkeypatch):
    import os

    def refuse(inc):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refuse)
    with pytest.raises(ValueError, match=r"handler.worker_nice: -5 needs CAP_SYS_NICE"):
        ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=50.0, worker_nice=-5, calibration_repeats=1))


def test_a_restarted_worker_reuses_the_stored_calibration_and_re_measures_it_when_idle(tiny_elastic, tmp_path,
                                                                                        monkeypatch):
    from elastic import calibration_store

    model = tmp_path / "model"
    shutil.copytree(tiny_elastic, model)
    (model / calibration_store.FILE).unlink(missing_ok=True)
    settings = HandlerSettings(latency_constraint_ms=50.0, calibration_repeats=2)
    first = ElasticRetriever(model, settings, max_batch=2)
    assert first.calibration_source == "measured" and (model / calibration_store.FILE).exists()
    monkeypatch.setattr(ElasticRetriever, "IDLE_S", 0.05)
    again = ElasticRetriever(model, settings, max_batch=2)
    assert again.calibration_source == "stored" and again.calibration == first.calibration
    deadline = time.time() + 30
    while again.remeasured == 0 and time.time() < deadline:  # re-timed in the background while idle
        time.sleep(0.05)
    assert again.remeasured == 1 and again.calibration.batch_sizes == (1, 2)
    assert again.describe()["calibration"] == "stored"
    # matrix products through oneDNN instead of MKL (handler.onednn) run at other t_k: not reused
    was = torch.backends.mkldnn.enabled
    try:
        onednn = ElasticRetriever(model, HandlerSettings(latency_constraint_ms=50.0, calibration_repeats=2,
                                                         onednn=True), max_batch=2)
        assert onednn.calibration_source == "measured"
    finally:
        torch.backends.mkldnn.enabled = was
    # another thread count (or model, machine, batch sizes) does not reuse it
    other = ElasticRetriever(model, HandlerSettings(latency_constraint_ms=50.0, calibration_repeats=2, torch_threads=2),
                             max_batch=2)
    assert other.calibration_source == "measured"
    packed = ElasticRetriever(model, HandlerSettings(latency_constraint_ms=50.0, calibration_repeats=2,
                                                     packed_levels=True), max_batch=2)
    assert packed.calibration_source == "measured"  # packed levels run at other t_k
    (model / calibration_store.FILE).write_text("{not json")
    assert ElasticRetriever(model, settings, max_batch=2).calibration_source == "measured"
    off = HandlerSettings.from_yaml({"latency_constraint_ms": 50, "calibration_cache": "false"}, environ={})
    assert off.calibration_cache is False
    assert ElasticRetriever(model, off, max_batch=2).calibration_source == "measured"
    with pytest.raises(ValueError, match="handler.calibration_cache: expected bool, got 'maybe'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "calibration_cache": "maybe"}, environ={})


def test_shed_and_late_requests_tighten_the_spare_bound(tiny_elastic, monkeypatch):
    """handler.spare_feedback: the service feeds each batch's missed requests (shed, or past T) to
    schedule.SpareFeedback, with whether the batch's level got in only through a σ below
    min_spare (Plan.spare_slack), and plans with its σ; with min_spare 0 or the feedback off σ stays put."""
    import dataclasses
    import inspect

    import elastic.service as service

    s = HandlerSettings(latency_constraint_ms=50.0, query_max_length=16, calibration_repeats=3)
    r = ElasticRetriever(tiny_elastic, s, max_batch=4, queue=FixedQueue(0))
    assert r.describe()["spare_feedback"] == {"sigma": 0.25, "tightened": 0, "loosened": 0}
    r.spare.interval_s, r.spare.min_requests = 0.0, 1  # judge every batch
    r.spare.sigma = 0.1  # loosened earlier
    # misses at a level that σ = min_spare lets in as well (here: no rate known yet, no spare test): σ holds
    out = r.handle_batch([{"query": "late"}] * 4, [now_header(age_ms=60_000 - 1)] * 4)  # past T on arrival: shed
    assert [o.status for o in out] == [503] * 4 and r.spare.sigma == pytest.approx(0.1)
    # the same misses where the batch's level needed a σ below min_spare (slack 0.2 < 0.25): tightened, + 0.1
    real = service.plan_batch
    seen = []

    def loosened_plan(*args, **kw):
        plan = real(*args, **kw)
        seen.append(inspect.signature(real).bind(*args, **kw).arguments["min_spare"])  # the σ planned with
        return dataclasses.replace(plan, spare_slack=0.2)

    monkeypatch.setattr(service, "plan_batch", loosened_plan)
    out = r.handle_batch([{"query": "late"}] * 4, [now_header(age_ms=60_000 - 1)] * 4)
    assert [o.status for o in out] == [503] * 4 and seen == [pytest.approx(0.1)]
    assert r.spare.sigma == pytest.approx(0.2) and r.describe()["spare_feedback"]["tightened"] == 1
    out = r.handle_batch([{"query": "fresh"}] * 4, [now_header()] * 4)
    assert [o.status for o in out] == [200] * 4 and r.spare.sigma == pytest.approx(0.16)  # clean: a fifth less
    assert ("ElasticSpareSigma", None, 16.0) in r.telemetry.flush()  # exported as a gauge, in percent
    for settings in ({"spare_feedback": False}, {"min_spare": 0.0}):
        off = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=50.0, query_max_length=16,
                                                             calibration_repeats=3, **settings),
                               max_batch=4, queue=FixedQueue(0))
        assert off.spare is None and off.describe()["spare_feedback"] is None
