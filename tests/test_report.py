"""Online report: requests.csv has exactly the promised columns, rr_at_10 comes from the
qrels through ir-measures, and phases are summarized separately."""

import csv
import json

from benchmarks.report import COLUMNS, phases, write_report


def test_requests_csv_and_summary(tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1 0 p3 1\nq2 0 p9 1\n")
    recs = [
        {"timestamp_s": 1.0, "latency_ms": 10.0, "status": 200, "qid": "q1", "level": 50, "queue_size": 0,
         "pids": ["p1", "p2", "p3"], "wait_ms": 2.0, "model_ms": 5.0, "handler_ms": 6.0},  # relevant at rank 3
        {"timestamp_s": 2.0, "latency_ms": 30.0, "status": 200, "qid": "q2", "level": 20, "queue_size": 7,
         "pids": ["p1"]},  # miss
        {"timestamp_s": 3.0, "latency_ms": 50.0, "status": 200, "qid": "q-none", "level": 20, "queue_size": 9,
         "pids": ["p1"]},  # no qrels
        {"timestamp_s": 4.5, "latency_ms": 5.0, "status": 503, "qid": "q1", "level": None, "queue_size": None, "pids": []},
    ]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = write_report(raw, qrels, tmp_path / "out", phases(2.5, 1.0, 1.0, 1.0), 40.0)
    rows = list(csv.reader(open(tmp_path / "out" / "requests.csv")))
    assert rows[0] == COLUMNS == ["timestamp_s", "latency_ms", "status", "level", "queue_size", "qid", "rr_at_10",
                                  "wait_ms", "model_ms", "handler_ms"]
    assert [r[6] for r in rows[1:]] == [str(1 / 3), "0.0", "", ""]
    assert rows[1][7:] == ["2.0", "5.0", "6.0"] and rows[2][7:] == ["", "", ""]  # Server-Timing, where answered
    # within T = 40 ms: 10 and 30 ms of 4 requests (50 ms is late, the 503 is not an answer)
    assert summary["overall"]["within_T"] == 0.5
    assert summary["overall"]["wait_p50_ms"] == 2.0 and summary["peak"]["wait_p50_ms"] is None
    assert summary["overall"]["after_p50_ms"] == 10.0 - 2.0 - 6.0  # latency - wait - handler
    assert summary["overall"]["errors"] == 1 and summary["overall"]["mrr_at_10"] == round((1 / 3) / 2, 4)
    assert summary["ramp_up"]["level_share"] == {"50": 0.5, "20": 0.5}
    assert summary["peak"]["level_share"] == {"20": 1.0}
    assert (tmp_path / "out" / "timeline.png").stat().st_size > 10_000


def test_server_timing_header_parsing():
    from benchmarks.report import server_timing

    none = {"wait_ms": None, "model_ms": None, "handler_ms": None}
    assert server_timing("wait;dur=0.5, model;dur=1.5, handler;dur=2.25") == {"wait_ms": 0.5, "model_ms": 1.5,
                                                                              "handler_ms": 2.25}
    assert server_timing('cache;desc="hit", model;dur=3') == {**none, "model_ms": 3.0}
    assert server_timing("model;dur=fast") == none
    assert server_timing(None) == none


def test_overhead_rows_subtract_the_model_time_and_divide_by_noop():
    import pytest

    from benchmarks.overhead import ROW_KEYS, add_ratios, summarize
    from benchmarks.slo import Server

    def rec(s, lat, model, status=200):
        return {"scheduled_s": s, "latency_ms": lat, "status": status, "level": 5, "model_ms": model,
                "sent_epoch": 1000.0 + 10 * s, "wait_ms": None if model is None else 3.0,
                "handler_ms": None if model is None else model + 0.5}

    noop = summarize([rec(-1.0, 99.0, None)] + [rec(i / 10, 4.0, None) for i in range(10)], 10.0, Server("noop"), 20.0)
    static = summarize([rec(i / 10, 10.0, 4.0) for i in range(10)] + [rec(0.5, 1.0, None, 503)], 10.0,
                       Server("static", 5, 50.0), 20.0)
    assert noop["requests"] == 10 and noop["outside_p50_ms"] == 4.0  # the warm-up record is left out
    assert static["requests"] == 11 and static["ok"] == 10 and static["outside_p99_ms"] == 6.0
    assert static["wait_p50_ms"] == 3.0 and static["after_p99_ms"] == 2.5 and noop["wait_p50_ms"] is None
    rows = [noop, static]
    add_ratios(rows)
    assert tuple(static) == ROW_KEYS and static["ratio_p50"] == 1.5 and noop["ratio_p50"] == 1.0
    # no batch overlaps another's wait here (the records have no send time), so net = outside
    assert static["net_p50_ms"] == 6.0 and static["net_ratio_p50"] == 1.5
    with pytest.raises(ValueError, match="static5-T50: 1 of 1 answers have no Server-Timing model;dur"):
        summarize([rec(0.0, 10.0, None)], 10.0, Server("static", 5, 50.0), 20.0)


def test_overhead_net_leaves_out_the_model_time_a_request_waited_behind():
    from benchmarks.overhead import add_ratios, queued_model_ms, summarize
    from benchmarks.slo import Server

    def rec(sent_ms, wait, model, handler, lat, status=200):
        return {"scheduled_s": sent_ms / 1000, "sent_epoch": 1000.0 + sent_ms / 1000, "latency_ms": lat,
                "status": status, "level": 5, "model_ms": model, "wait_ms": wait, "handler_ms": handler}

    recs = [
        # batch A: starts at t = 10 ms, model over [12, 18] (handler 8 ms, model 6 ms)
        rec(0.0, 10.0, 6.0, 8.0, 20.0),
        # batch B: its request was sent at 14, while A's model ran; B starts at 22, so it waited
        # behind 4 ms of A's model (14 -> 18); model over [23, 26]
        rec(14.0, 8.0, 3.0, 4.0, 14.0),
        rec(15.0, 7.0, 3.0, 4.0, 13.0),
        # batch C: sent at 30, after B's model: nothing queued
        rec(30.0, 2.0, 2.5, 3.5, 8.0),
        rec(31.0, 0.0, 1.0, 1.0, 1.0, status=503),
    ]
    assert queued_model_ms(recs) == [0.0, 4.0, 3.0, 0.0, 0.0]
    row = summarize(recs, 1.0, Server("static", 5, 50.0), 100.0, rep=2)
    # outside (latency - own model): 14, 11, 10, 5.5; net: 14, 7, 7, 5.5
    assert row["pass"] == 2 and row["outside_p50_ms"] == 10.5 and row["net_p50_ms"] == 7.0
    noop = summarize([{**r, "model_ms": None, "wait_ms": None, "handler_ms": None, "latency_ms": 2.5} for r in recs[:4]],
                     1.0, Server("noop"), 100.0)
    rows = [noop, row]
    add_ratios(rows)  # noop has no pass 2 at this rate: its first pass is the base
    assert row["net_ratio_p50"] == 2.8 and row["ratio_p50"] == 4.2


def test_rush_rows_count_late_and_shed_requests_as_zero(tmp_path):
    from benchmarks.rush import phase_row, read_requests

    path = tmp_path / "requests.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerow([0.1, 10.0, 200, 50, 0, "q1", 1.0])   # in time, rank 1
        w.writerow([0.2, 80.0, 200, 50, 3, "q2", 0.5])   # late: counts 0 in effective MRR
        w.writerow([0.3, 1.0, 503, "", "", "q3", ""])    # shed
        w.writerow([0.4, 12.0, 200, 5, 0, "unjudged", ""])  # no qrels: not in MRR
    rows = read_requests(path, {"q1", "q2", "q3"})
    r = phase_row(rows, 50.0)
    assert (r["requests"], r["ok"], r["shed"]) == (4, 3, 1)
    assert r["within_T"] == 0.5 and r["mrr_at_10"] == 0.75
    assert r["effective_mrr_at_10"] == round(1.0 / 3, 4) and r["mean_level"] == 35.0


def test_slo_interleaving_rotates_servers_and_repeats_each_capacity_point():
    from benchmarks.slo import Server, repeat_points, rotated

    servers = ["a", "b", "c"]
    assert [rotated(servers, k) for k in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                        ["a", "b", "c"]]
    assert rotated([], 2) == []
    elastic, static, noop, other_T = (Server("elastic", None, 50.0), Server("static", 5, 50.0), Server("noop"),
                                      Server("elastic", None, 25.0))
    ran = {elastic: [(100.0, 1.0), (200.0, 0.995), (300.0, 0.97), (400.0, 0.9)],
           static: [(100.0, 0.98), (200.0, 0.4)],  # never held: its lowest rate and the next
           noop: [(100.0, 1.0), (200.0, 1.0)],  # held everywhere: only the last rate
           other_T: [(100.0, 1.0), (200.0, 0.5)]}
    points = repeat_points(ran, [50.0])
    assert points == {elastic: {200.0, 300.0}, static: {100.0, 200.0}, noop: {200.0}}


def test_slo_sustainable_rate_needs_every_lower_rate_held_and_variants_are_named_apart():
    from benchmarks.slo import Server, server_order, sustainable

    def row(rate, w, server="elastic"):
        return {"server": server, "level": None, "T_ms": 50.0, "rate_rps": rate, "within_T": w}

    rows = [row(100, 0.999), row(200, 0.995), row(200, 0.991), row(300, 0.999), row(300, 0.98), row(400, 0.999)]
    assert sustainable(rows, "elastic", None, 50.0) == 200  # 300 failed once: 400 holding after it does not count
    rows = [row(100, 0.97), row(200, 0.999)]
    assert sustainable(rows, "elastic", None, 50.0) is None  # the lowest rate failed
    assert sustainable(rows, "static", 5, 50.0) is None  # no runs
    v = Server("elastic", None, 50.0, ("max_utilization", 0.85))
    assert v.name == "elastic-max_utilization0p85-T50" and v.label == "elastic max_utilization=0.85"
    assert v.handler_settings()["max_utilization"] == 0.85 and "max_utilization" not in Server("elastic", None,
                                                                                               50.0).handler_settings()
    assert sorted(["static", v.label, "noop", "elastic"], key=server_order) == ["elastic", v.label, "static", "noop"]


def test_batch_excess_recovers_batches_and_the_excess_line(tmp_path):
    import json

    import pytest

    from benchmarks.batch_excess import batches, fit
    from elastic.schedule import Calibration

    cal = Calibration((1, 2, 4), {10: (2.0, 3.0, 5.0), 50: (4.0, 6.0, 10.0)})
    raw = tmp_path / "raw-300-0.jsonl"
    recs = []
    for i, (level, b) in enumerate([(10, 1), (10, 2), (50, 4), (50, 3), (10, 4)]):
        model = cal.t(level, b) + 1.0 + 0.5 * b + i * 1e-6  # 1 ms + 0.5 ms per request over t_k(b)
        recs += [{"status": 200, "level": level, "model_ms": model, "handler_ms": model + 1} for _ in range(b)]
    recs.append({"status": 503, "level": None, "model_ms": None, "handler_ms": None})
    raw.write_text("".join(json.dumps(r) + "\n" for r in recs))
    bs = batches(raw)
    assert sorted((lv, n) for lv, n, _ in bs) == [(10, 1), (10, 2), (10, 4), (50, 3), (50, 4)]
    f = fit(cal, bs)
    assert f["batches"] == 5 and f["excess_a_ms"] == pytest.approx(1.0, abs=0.01)
    assert f["excess_ms_per_request"] == pytest.approx(0.5, abs=0.01) and f["ratio_of_sums"] > 1
