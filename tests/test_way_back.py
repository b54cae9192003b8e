"""benchmarks.way_back: batches recovered from their answers' Server-Timing, the gap counted as
o only while a request waited, and the way back per batch size against o/2 and o."""

from benchmarks.way_back import batches, summarize


def answer(sent_s: float, wait_ms: float, model_ms: float, handler_ms: float, latency_ms: float, status=200) -> dict:
    return {"sent_epoch": sent_s, "wait_ms": wait_ms, "model_ms": model_ms, "handler_ms": handler_ms,
            "latency_ms": latency_ms, "status": status}


def test_batches_gaps_and_way_back():
    recs = [
        # batch A starts at 1000.010 s (epoch ms 1_000_010), handler 8 ms: ends at 1_000_018
        answer(1000.000, 10.0, 7.0, 8.0, 20.0),   # way back 20 - 10 - 8 = 2
        answer(1000.005, 5.0, 7.0, 8.0, 17.0),    # 4
        # batch B: its oldest request (sent 1_000_015) waited while A ran; starts at 1_000_022
        answer(1000.015, 7.0, 3.0, 4.0, 17.0),    # gap 22 - 18 = 4 ms; way back 6
        # batch C: its request was sent after B ended (1_000_026): an idle gap, not o
        answer(1000.040, 2.0, 3.5, 4.5, 9.5),     # way back 3
        answer(1000.041, 0.0, 1.0, 1.0, 1.0, status=503),  # shed: no Server-Timing batch
    ]
    bs = batches(recs)
    assert [len(b["way_back"]) for b in bs] == [2, 1, 1]
    assert sorted(bs[0]["way_back"]) == [2.0, 4.0] and bs[1]["way_back"] == [6.0]
    row = summarize(bs)
    assert row["o_p50_ms"] == 4.0  # only the A -> B gap counts
    assert row["b1-2"]["answers"] == 4 and row["b3-4"] is None
    # way backs 2, 4, 6, 3 against o/2 = 2 and o = 4
    assert row["all"]["over_half_o"] == 0.75 and row["all"]["over_o"] == 0.25
