"""The fault and soak test (benchmarks/soak.py): its answer check, its rate and row, and a short
run through a real TorchServe with a worker killed half-way."""

import json

import numpy as np
import pytest

from benchmarks.soak import KEYS, answer_is_right, default_rate, summarize


def test_answer_check_allows_ties_within_tolerance_only():
    scores = np.array([0.9, 0.5, 0.8, 0.80005, 0.1, 0.79])
    assert answer_is_right(scores, [0, 3, 2], 3)
    assert answer_is_right(scores, [0, 2, 3], 3)  # 0.8 and 0.80005 tie within 1e-4
    assert not answer_is_right(scores, [0, 3, 5], 3)  # 0.79 is not in the top 3
    assert not answer_is_right(scores, [3, 0, 2], 3)  # out of order by more than 1e-4
    assert not answer_is_right(scores, [0, 0, 3], 3) and not answer_is_right(scores, [0, 3], 3)
    assert not answer_is_right(scores, [0, 3, 99], 3)
    assert answer_is_right(scores[:2], [0, 1], 10)  # fewer passages than k


def test_default_rate_is_twice_the_static_50_capacity(tmp_path):
    rows = [{"server": "static", "level": 50, "T_ms": 50.0, "rate_rps": r, "within_T": w}
            for r, w in ((50, 0.995), (50, 0.993), (100, 0.97), (100, 0.999))]
    (tmp_path / "slo.json").write_text(json.dumps(rows))
    assert default_rate(tmp_path / "slo.json", 50.0) == 100.0
    assert default_rate(tmp_path / "slo.json", 25.0) == 100.0  # no row at that T: the fallback
    assert default_rate(tmp_path / "missing.json", 50.0, fallback=60.0) == 60.0


def test_summary_counts_every_outcome():
    scores = {50: np.array([[0.9, 0.1, 0.5]])}
    offline = (scores, {"q1": 0}, ["p0", "p1", "p2"])
    base = {"scheduled_s": 1.0, "qid": "q1", "level": 50, "retry_after": None, "latency_ms": 10.0}
    recs = [
        {**base, "sent_epoch": 100.0, "status": 200, "pids": ["p0", "p2"]},
        {**base, "sent_epoch": 101.0, "status": 200, "pids": ["p2", "p0"]},  # wrong order
        {**base, "sent_epoch": 102.5, "status": 200, "pids": ["p0", "p2"], "latency_ms": 80.0},  # late
        {**base, "sent_epoch": 103.0, "status": 200, "pids": ["p0", "p2"]},
        {**base, "sent_epoch": 104.0, "status": 503, "pids": [], "retry_after": "1"},
        {**base, "sent_epoch": 105.0, "status": 0, "pids": []},
        {**base, "sent_epoch": 106.0, "status": 500, "pids": []},
        {**base, "scheduled_s": -1.0, "sent_epoch": 99.0, "status": 0, "pids": []},  # warm-up: not counted
    ]
    row, details = summarize(recs, 50.0, 10.0, 7.0, 102.0, offline, 2, [(100.0, 400.0), (150.0, 410.0)],
                             (99.0, 160.0))
    assert tuple(row) == KEYS
    assert (row["requests"], row["ok"], row["shed"], row["errors"], row["lost"], row["wrong"]) == (7, 4, 1, 1, 1, 1)
    assert row["recovery_s"] == 1.0  # the kill at 102; the late answer sent at 102.5 does not count
    assert (row["rss_mib_start"], row["rss_mib_end"], row["worker_kills"]) == (400.0, 410.0, 1)
    assert row["within_T"] == round(3 / 7, 4) and details["shed_without_retry_after"] == 0
    assert details["lost_from_kill_ms"] == [3000.0]  # the one unanswered request, sent 3 s after the kill


@pytest.mark.slow
def test_short_soak_with_a_worker_killed_loses_nothing(tiny_elastic, tmp_path):
    from archive.build_mar import build_mar
    from benchmarks.server import ROOT, local_config
    from benchmarks.soak import run_soak

    config, inf, mgmt, met = local_config(tmp_path)
    store = tmp_path / "store"
    build_mar(tiny_elastic, tiny_elastic, store, {
        "minWorkers": 1, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 2, "responseTimeout": 60,
        "handler": {"latency_constraint_ms": 200, "management_address": f"http://127.0.0.1:{mgmt}",
                    "query_max_length": 32, "calibration_repeats": 5}}, archive_format="no-archive")
    row, details, metrics = run_soak(config, store, "elasticdenser",
                                     ROOT / "data" / "msmarco" / "queries.dev500.tsv", 200.0, 20.0, 12.0, 2.0, 10.0,
                                     tmp_path, (inf, mgmt, met), 32, 10, workers=2)
    # TorchServe 0.12 may leave the one request it hands to a worker in the millisecond that worker
    # dies without an answer (a fresh-clone CI run: sent 3 ms before ts_log's "Worker disconnected",
    # no answer in the 10-s drain); any other loss fails.
    assert row["worker_kills"] == 1 and row["wrong"] == 0, (row, details)
    assert row["lost"] <= 1 and all(abs(ms) <= 50 for ms in details["lost_from_kill_ms"]), (row, details)
    assert row["requests"] > 100 and row["ok"] >= row["requests"] - 10, (row, details)
    assert details["shed_without_retry_after"] == 0
    assert row["recovery_s"] is not None and row["recovery_s"] <= 2.0, (row, details)  # the other worker serves
    assert "ElasticRequests{" in metrics and row["rss_mib_start"] > 0
