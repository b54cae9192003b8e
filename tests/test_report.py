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
         "pids": ["p1", "p2", "p3"]},  # relevant at rank 3
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
    assert rows[0] == COLUMNS == ["timestamp_s", "latency_ms", "status", "level", "queue_size", "qid", "rr_at_10"]
    assert [r[-1] for r in rows[1:]] == [str(1 / 3), "0.0", "", ""]
    assert summary["overall"]["errors"] == 1 and summary["overall"]["mrr_at_10"] == round((1 / 3) / 2, 4)
    assert summary["ramp_up"]["level_share"] == {"50": 0.5, "20": 0.5}
    assert summary["peak"]["level_share"] == {"20": 1.0}
    assert (tmp_path / "out" / "timeline.png").stat().st_size > 10_000
