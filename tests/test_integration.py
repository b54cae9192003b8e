"""End to end through real TorchServe: a tiny .mar built by archive/build_mar.py, served on
free loopback ports; real queries; the level drops under a burst of concurrent requests and
comes back when idle; a bad request gets its own 400; then the server stops."""

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from archive.build_mar import build_mar
from benchmarks.server import TorchServe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _post(url, body: bytes, content_type="application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(tiny_elastic, tmp_path_factory):
    work = tmp_path_factory.mktemp("ts")
    inf, mgmt, met, worker = _free_ports(4)
    props = (ROOT / "config.properties").read_text()
    props = props.replace("8080", str(inf)).replace("8081", str(mgmt)).replace("8082", str(met))
    props += f"initial_worker_port={worker}\n"  # worker socket /tmp/.ts.sock.<port>: apart from a running demo
    (work / "config.properties").write_text(props)
    mar = build_mar(tiny_elastic, tiny_elastic, work / "store", {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1, "responseTimeout": 60,
        "handler": {"latency_constraint_ms": 1000, "management_address": f"http://127.0.0.1:{mgmt}",
                    "query_max_length": 32, "poll_interval_ms": 2, "calibration_repeats": 10}})
    # T from the environment: overrides the yaml's 1000 ms without rebuilding the .mar
    ts = TorchServe(work / "config.properties", mar.parent, {"elastic": mar.name}, work,
                    f"http://127.0.0.1:{mgmt}", {"ELASTIC_LATENCY_CONSTRAINT_MS": "15"})
    ts.start()
    try:
        ts.wait_ready("elastic", 120)
        yield ts, f"http://127.0.0.1:{inf}/predictions/elastic"
    finally:
        ts.stop()


def test_serves_real_queries_at_the_largest_level_when_idle(server):
    ts, url = server
    cal = ts.describe("elastic")
    assert cal["latency_constraint_ms"] == 15.0 and cal["levels"] == [50, 30, 10]
    status, body = _post(url, json.dumps({"query": "what is the capital of france"}).encode())
    assert status == 200 and body["level"] == 50 and body["queue_size"] <= 1  # may count itself (polled)
    assert len(body["results"]) == 10 and all(set(h) == {"pid", "score"} for h in body["results"])


def test_bad_requests_get_their_own_errors(server):
    _, url = server
    status, text = _post(url, b'{"query": "unterminated')
    assert status == 400 and "malformed JSON" in text
    status, text = _post(url, json.dumps({"query": "word " * 100}).encode())
    assert status == 400 and "the limit is 32" in text
    status, body = _post(url, b"plain text query about banks", "text/plain")
    assert status == 200 and body["level"] == 50  # the worker survived


def test_level_drops_under_burst_and_recovers(server):
    ts, url = server
    queries = [json.dumps({"query": f"what is query number {i} about"}).encode() for i in range(400)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda b: _post(url, b), queries))
    assert all(s == 200 for s, _ in answers)
    seen = [(b["level"], b["queue_size"]) for _, b in answers]
    dropped = [(lv, g) for lv, g in seen if lv < 50]
    assert dropped, f"no smaller SubLM used under the burst: {seen[:20]}"
    assert all(g > 0 for _, g in dropped)  # only a non-empty queue makes the level drop
    assert max(g for _, g in seen) >= 10
    import time

    time.sleep(1.0)  # the queue drains; the poller sees g = 0
    status, body = _post(url, json.dumps({"query": "after the burst"}).encode())
    # g is polled every 2 ms, so it may have caught this very request while it waited (g = 1)
    assert status == 200 and body["level"] == 50 and body["queue_size"] <= 1
