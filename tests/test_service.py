"""Serving core without TorchServe: request parsing, settings, per-request errors in a batch,
level choice from the queue size, and the TorchServe handler over a MockContext."""

import json

import pytest

from elastic.service import BadRequest, ElasticRetriever, HandlerSettings, parse_query


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


@pytest.fixture(scope="module")
def retriever(tiny_elastic):
    g = {"value": 0}
    r = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16,
                                                       calibration_repeats=3), max_batch=4, queue_size=lambda: g["value"])
    r.g = g
    return r


def test_bad_request_does_not_fail_its_batch(retriever):
    out = retriever.handle_batch([{"query": "what is a bank"}, b"{oops", {"query": "word " * 40}, b"who wrote hamlet"])
    assert [r.status for r in out] == [200, 400, 400, 200]
    assert "malformed JSON" in out[1].payload["error"]
    assert "tokens, the limit is 16" in out[2].payload["error"]
    assert len(out[0].payload["results"]) == 10 and out[0].payload["level"] == 50
    scores = [h["score"] for h in out[0].payload["results"]]
    assert scores == sorted(scores, reverse=True)


def test_answers_equal_direct_search_at_that_level(retriever):
    import numpy as np

    out = retriever.handle_batch([{"query": "what is a bank"}])[0].payload
    q = retriever.encoder.encode(["what is a bank"], out["level"], 16)
    _, idx = retriever.index.search(np.asarray(q.numpy()), 10)
    assert [h["pid"] for h in out["results"]] == [retriever.pids[j] for j in idx[0]]


def test_level_follows_queue_size(retriever):
    cal = retriever.calibration
    t50 = cal.t(50, 1)
    retriever.settings = HandlerSettings(latency_constraint_ms=t50 * 1.5, query_max_length=16)
    try:
        retriever.g["value"] = 0
        assert retriever.handle_batch([{"query": "cheap"}])[0].payload["level"] == 50
        retriever.g["value"] = 1000
        out = retriever.handle_batch([{"query": "cheap"}])[0].payload
        assert out == {**out, "level": 10, "queue_size": 1000}
    finally:
        retriever.settings = HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16)
        retriever.g["value"] = 0


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
    """TorchServe's Context, reduced to what the handler touches (ts.context.Context)."""

    def __init__(self, model_dir, yaml_cfg):
        self.system_properties = {"model_dir": str(model_dir)}
        self.model_yaml_config = yaml_cfg
        self.model_name = "elastic"
        self.statuses = {}

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = (code, phrase)

    def get_request_header(self, idx, key):
        return None


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
    finally:
        h.poller.stop()
    with pytest.raises(ValueError, match="handler.latency_constraint_ms: must be a positive number"):
        ElasticDenserHandler().initialize(MockContext(tiny_elastic, {"handler": {"latency_constraint_ms": 0}}))


def test_overhead_is_learned_only_from_gaps_with_waiting_requests(retriever):
    import time

    retriever.overhead_ms, retriever._last_end = 0.0, None
    retriever.g["value"] = 0
    retriever.handle_batch([{"query": "a"}])
    time.sleep(0.02)
    retriever.handle_batch([{"query": "b"}])  # idle gap (g was 0): not overhead
    assert retriever.overhead_ms == 0.0
    retriever.g["value"] = 3
    retriever.handle_batch([{"query": "c"}])
    time.sleep(0.01)
    retriever.handle_batch([{"query": "d"}])  # requests were waiting: the gap is overhead
    assert retriever.overhead_ms > 0.0
    retriever.g["value"], retriever.overhead_ms = 0, 0.0
