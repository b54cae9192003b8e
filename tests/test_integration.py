"""End to end through real TorchServe: a tiny .mar built by archive/build_mar.py, served on
free loopback ports with batching; real queries; the level drops under a burst of concurrent
requests, requests that cannot make T are shed with 503 + Retry-After, and the largest level
comes back when idle; a bad request gets its own 400; no queue polls while idle."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from archive.build_mar import build_mar
from benchmarks.server import TorchServe, local_config, scrape

pytestmark = pytest.mark.slow



def _post(url, body: bytes, content_type="application/json", headers=None):
    """(status, JSON body or error text, response headers)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.fixture(scope="module")
def server(tiny_elastic, tmp_path_factory):
    work = tmp_path_factory.mktemp("ts")
    config, inf, mgmt, met = local_config(work)
    mar = build_mar(tiny_elastic, tiny_elastic, work / "store", {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 2, "responseTimeout": 60,
        "handler": {"latency_constraint_ms": 1000, "management_address": f"http://127.0.0.1:{mgmt}",
                    "query_max_length": 32, "calibration_repeats": 10}})
    # T from the environment: overrides the yaml's 1000 ms without rebuilding the .mar
    ts = TorchServe(config, mar.parent, {"elastic": mar.name}, work,
                    f"http://127.0.0.1:{mgmt}", {"ELASTIC_LATENCY_CONSTRAINT_MS": "25"})
    ts.start()
    try:
        ts.wait_ready("elastic", 120)
        ts.metrics_url = f"http://127.0.0.1:{met}/metrics"
        yield ts, f"http://127.0.0.1:{inf}/predictions/elastic"
    finally:
        ts.stop()


def test_serves_real_queries_at_the_largest_level_when_idle(server):
    ts, url = server
    cal = ts.describe("elastic")
    assert cal["latency_constraint_ms"] == 25.0 and cal["levels"] == [50, 30, 10] and cal["max_batch"] == 4
    polls = cal["queue_polls"]
    for _ in range(5):  # one at a time: partly filled batches, g = 0 without asking the frontend
        status, body, headers = _post(url, json.dumps({"query": "what is the capital of france"}).encode())
        assert status == 200 and body["level"] == 50 and body["queue_size"] == 0
        assert headers.get("Server-Timing", "").startswith("wait;dur=")  # passed through by the frontend
        assert len(body["results"]) == 10 and all(set(h) == {"pid", "score"} for h in body["results"])
    assert ts.describe("elastic")["queue_polls"] == polls


def test_bad_requests_get_their_own_errors(server):
    _, url = server
    status, text, _ = _post(url, b'{"query": "unterminated')
    assert status == 400 and "malformed JSON" in text
    status, body, _ = _post(url, json.dumps({"query": "word " * 100}).encode())
    assert status == 200 and body["truncated"] is True  # cut to query_max_length, as offline evaluation does
    req = urllib.request.Request(url, method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 405 and e.value.headers.get("Allow") == "POST"
    status, text, _ = _post(url, b"query=hello", "application/x-www-form-urlencoded")
    assert status == 415 and "send a JSON body" in text
    status, body, _ = _post(url, b"plain text query about banks", "text/plain")
    assert status == 200 and body["level"] == 50  # the worker survived


def test_a_request_past_its_deadline_is_shed_with_retry_after(server):
    ts, url = server
    old = f"t={time.time() - 0.5:.6f}"  # sent 500 ms ago by the load balancer's clock: past T = 25 ms
    status, text, headers = _post(url, json.dumps({"query": "too late"}).encode(), headers={"X-Request-Start": old})
    assert status == 503 and "within T = 25 ms" in text and headers.get("Retry-After") == "1"
    status, body, _ = _post(url, json.dumps({"query": "in time"}).encode(),
                            headers={"X-Request-Start": f"t={time.time():.6f}"})
    assert status == 200 and body["level"] in (50, 30, 10)  # served, not shed (its level is the schedule's)
    status, body, _ = _post(url, json.dumps({"query": "absurd start"}).encode(), headers={"X-Request-Start": "soon"})
    assert status == 200  # ignored and counted
    assert ts.describe("elastic")["counters"]["request_start_ignored"] >= 1


def test_level_drops_under_burst_and_recovers(server):
    ts, url = server
    queries = [json.dumps({"query": f"what is query number {i} about"}).encode() for i in range(300)]
    # 12 full batches of 4 in flight, g up to 40: far past T = 25 ms at the largest level (with 16 in
    # flight, g <= 8, every answer fitted T at 50 % in 2 of 3 full-module runs, and a fresh-clone .ci/run
    # failed so once). How many are served depends on the frontend's per-batch cost o, not on the
    # model (t_k is about 0.5 ms at every level of the tiny model): 92-109 of 300 answers came from the
    # 10 % SubLM on 2026-11-22, 32-36 on 2026-11-24 with o = 3.5 ms, when 12 batches of about 4 ms
    # each put most requests past T before their turn, and shedding them is the schedule's job. So
    # the test asks for three full batches served, not for a share of the burst.
    with ThreadPoolExecutor(max_workers=48) as pool:
        answers = list(pool.map(lambda b: _post(url, b), queries))
    assert all(s in (200, 503) for s, _, _ in answers)
    assert all(h.get("Retry-After") == "1" for s, _, h in answers if s == 503)
    served = [(b["level"], b["queue_size"]) for s, b, _ in answers if s == 200]
    assert len(served) >= 12, f"only {len(served)} of 300 served"
    assert all("cannot be answered within T = 25 ms" in t for s, t, _ in answers if s == 503)
    assert any(lv < 50 for lv, _ in served), \
        f"no smaller SubLM used under the burst (max g {max(g for _, g in served)}): {served[:20]}"
    assert max(g for _, g in served) >= 4  # full batches saw a queue behind them
    assert ts.describe("elastic")["queue_polls"] > 0
    time.sleep(1.5)  # the queue drains and the burst leaves the arrival-rate window (1 s)
    # with its start header: the FIFO age estimate adds the per-batch overhead o, which the burst
    # raised (the EWMA learns only while requests wait) and which can alone use most of a tight T
    status, body, _ = _post(url, json.dumps({"query": "after the burst"}).encode(),
                            headers={"X-Request-Start": f"t={time.time():.6f}"})
    state = {k: v for k, v in ts.describe("elastic").items() if k in ("overhead_ms", "correction", "mean_correction")}
    assert status == 200 and body["level"] == 50 and body["queue_size"] == 0, (body, state)


def test_elastic_metrics_move_on_the_prometheus_endpoint(server):
    ts, url = server
    time.sleep(1.2)  # the handler flushes once a second
    before = scrape(ts.metrics_url)
    model = (("ModelName", "elastic"),)
    assert ("ElasticLevel", model) in before, sorted(before)
    served = sum(_post(url, json.dumps({"query": f"metrics query {i}"}).encode())[0] == 200 for i in range(12))
    _post(url, b"{bad json")
    time.sleep(2.5)
    after = scrape(ts.metrics_url)

    def moved(name):
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name)

    assert moved("ElasticRequests") == served and served >= 10
    assert moved("ElasticBadRequests") >= 1
    assert moved("ElasticBatches") >= 1 and moved("ElasticMeasuredBatchMs") > 0 and moved("ElasticPredictedBatchMs") > 0
    assert after[("ElasticQueueSize", model)] == 0  # idle: no batch saw a queue in the last second
    assert after[("ElasticLevel", model)] in (50, 30, 10)


def test_set_T_refuses_when_the_environment_overrides_the_yaml(server):
    from archive.set_latency_constraint import Management, set_latency_constraint

    ts, url = server
    with pytest.raises(RuntimeError, match="ELASTIC_LATENCY_CONSTRAINT_MS, which overrides the yaml"):
        set_latency_constraint(Management(ts.management), ts.model_store, "elastic", 80.0, 120, log=lambda _: None)
    versions = Management(ts.management).call("GET", "/models/elastic/all")
    assert len(versions) == 1 and ts.describe("elastic")["latency_constraint_ms"] == 25.0
    assert [p.name for p in ts.model_store.iterdir()] == ["elasticdenser.mar"]  # the copy is removed again
    assert _post(url, json.dumps({"query": "still served"}).encode())[0] == 200
