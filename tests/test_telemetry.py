"""Elastic metrics without TorchServe's frontend: the packed metrics.yaml and its validation,
the per-interval sums, and the handler's updates through TorchServe's own metrics cache."""

import logging
import shutil

import pytest
import yaml

from elastic.telemetry import SPECS, Flusher, Telemetry, load_metrics_yaml, metrics_yaml
from tests.test_service import MockContext


def write(tmp_path, doc) -> str:
    p = tmp_path / "metrics.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(p)


def test_packed_yaml_declares_every_elastic_metric(tmp_path):
    assert load_metrics_yaml(write(tmp_path, metrics_yaml())) == SPECS
    only = {"model_metrics": {"gauge": [{"name": "ElasticLevel", "unit": "Percent", "dimensions": ["ModelName"]}]}}
    assert list(load_metrics_yaml(write(tmp_path, only))) == ["ElasticLevel"]  # ops may leave metrics out


@pytest.mark.parametrize("doc,msg", [
    ("model_metrics: [unclosed", r"metrics.yaml: does not parse"),
    ({"ts_metrics": {}}, r"metrics.yaml: model_metrics: expected a mapping"),
    ({"model_metrics": {"histogram": []}}, r"model_metrics.histogram: unknown metric type"),
    ({"model_metrics": {"counter": [{"name": "ElasticShed", "unit": "Count"}]}},
     r"model_metrics.counter\[0\].dimensions: missing"),
    ({"model_metrics": {"counter": [{"name": "Shedded", "unit": "Count", "dimensions": ["ModelName"]}]}},
     r"model_metrics.counter\[0\].name: 'Shedded' is not an elastic metric"),
    ({"model_metrics": {"counter": [{"name": "ElasticLevel", "unit": "Percent", "dimensions": ["ModelName"]}]}},
     r"model_metrics.counter\[0\]: ElasticLevel is a gauge, listed under counter"),
    ({"model_metrics": {"counter": [{"name": "ElasticRequests", "unit": "Count", "dimensions": ["ModelName"]}]}},
     r"model_metrics.counter\[0\].dimensions: ElasticRequests has dimensions \['ModelName', 'PreservingLevel'\]"),
    ({"model_metrics": {"gauge": [{"name": "ElasticLevel", "unit": "", "dimensions": ["ModelName"]}]}},
     r"model_metrics.gauge\[0\].unit: expected a unit name"),
])
def test_bad_metrics_yaml_names_the_field(tmp_path, doc, msg):
    with pytest.raises(ValueError, match=msg):
        load_metrics_yaml(write(tmp_path, doc))


def test_telemetry_sums_batches_between_flushes():
    t = Telemetry([50, 10])
    first = t.flush()
    assert ("ElasticRequests", 50, 0.0) in first and ("ElasticRequests", 10, 0.0) in first
    assert ("ElasticShed", None, 0.0) in first and ("ElasticQueueSize", None, 0.0) in first
    t.record_batch(50, served=3, shed=0, bad=1, past_T=0, g=2, predicted_ms=5.0, measured_ms=6.5)
    t.record_batch(10, served=4, shed=2, bad=0, past_T=1, g=9, predicted_ms=2.0, measured_ms=2.5)
    t.record_batch(None, served=0, shed=3, bad=0, past_T=0, g=4)  # everything shed: no level ran
    out = {(n, lv): v for n, lv, v in t.flush()}
    assert out == {("ElasticRequests", 50): 3, ("ElasticRequests", 10): 4, ("ElasticShed", None): 5,
                   ("ElasticBadRequests", None): 1, ("ElasticAnswersPastT", None): 1,
                   ("ElasticBatches", 50): 1, ("ElasticBatches", 10): 1,
                   ("ElasticPredictedBatchMs", 50): 5.0, ("ElasticPredictedBatchMs", 10): 2.0,
                   ("ElasticMeasuredBatchMs", 50): 6.5, ("ElasticMeasuredBatchMs", 10): 2.5,
                   ("ElasticQueueSize", None): 9.0, ("ElasticLevel", None): 10.0}
    # an idle interval: no counter moves, g falls back to 0, the level stays the latest
    assert t.flush() == [("ElasticQueueSize", None, 0.0), ("ElasticLevel", None, 10.0)]


def test_flusher_counts_emit_errors_and_keeps_going():
    seen = []

    def emit(name, level, value):
        if name == "ElasticShed":
            raise RuntimeError("backend down")
        seen.append(name)

    f = Flusher(Telemetry([50]), emit, 60.0)
    f.flush()
    assert f.errors == 1 and "ElasticRequests" in seen and "ElasticQueueSize" in seen


def test_handler_emits_elastic_metrics_through_torchserves_cache(tiny_elastic, tmp_path, caplog):
    from handler.elastic_handler import ElasticDenserHandler

    model = tmp_path / "model"
    shutil.copytree(tiny_elastic, model)
    (model / "metrics.yaml").write_text(yaml.safe_dump(metrics_yaml()))
    cfg = {"batchSize": 2, "handler": {"latency_constraint_ms": 500, "calibration_repeats": 2,
                                       "management_address": "http://127.0.0.1:9", "metrics_interval_s": 60}}
    h = ElasticDenserHandler()
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        h.initialize(MockContext(model, cfg))
        try:
            h.handle([{"body": {"query": "what is a bank"}}, {"body": {"query": ""}}], h.context)
            h.flusher.flush()
        finally:
            h.flusher.stop()
            h.poller.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]Elastic")]
    assert any(x.startswith("[METRICS]ElasticRequests.Count:1.0|#ModelName:elastic,PreservingLevel:50|#type:COUNTER")
               for x in lines), lines
    assert any(x.startswith("[METRICS]ElasticBadRequests.Count:1.0|#ModelName:elastic|") for x in lines)
    assert any(x.startswith("[METRICS]ElasticLevel.Percent:50.0|#ModelName:elastic|#type:GAUGE") for x in lines)
    assert any(x.startswith("[METRICS]ElasticLimitedBatches.Count:0.0|#ModelName:elastic,Bound:spare|#type:COUNTER")
               for x in lines), lines  # every bound's series exists from the first flush
    # a metrics.yaml that does not parse fails the load, naming the file and the field
    (model / "metrics.yaml").write_text(yaml.safe_dump({"model_metrics": {"gauge": [{"name": "ElasticLevel"}]}}))
    with pytest.raises(ValueError, match=r"metrics.yaml: model_metrics.gauge\[0\].unit: missing"):
        ElasticDenserHandler().initialize(MockContext(model, cfg))


def test_the_learned_spare_sigma_is_a_gauge_in_percent_once_known():
    t = Telemetry([50, 10])
    assert not [u for u in t.flush() if u[0] == "ElasticSpareSigma"]  # a server that does not learn σ: no series
    t.record_spare(0.2)
    t.record_spare(0.16)
    assert ("ElasticSpareSigma", None, 16.0) in t.flush()
    assert ("ElasticSpareSigma", None, 16.0) in t.flush()  # a gauge keeps its last value between batches
    assert SPECS["ElasticSpareSigma"].type == "gauge" and SPECS["ElasticSpareSigma"].unit == "Percent"


def test_batches_held_below_the_largest_level_are_counted_by_bound():
    t = Telemetry([50, 10])
    first = {(n, lv): v for n, lv, v in t.flush() if n == "ElasticLimitedBatches"}
    assert first == {("ElasticLimitedBatches", b): 0.0 for b in ("deadline", "queue", "rate", "spare", "standing")}
    t.record_batch(10, served=8, shed=0, bad=0, past_T=0, g=3, limited_by=("spare",))
    t.record_batch(10, served=8, shed=0, bad=0, past_T=0, g=9, limited_by=("deadline", "queue"))
    t.record_batch(10, served=8, shed=0, bad=0, past_T=0, g=1, limited_by=("spare",))
    t.record_batch(50, served=1, shed=0, bad=0, past_T=0, g=0)  # the largest level: held by nothing
    t.record_batch(None, served=0, shed=8, bad=0, past_T=0, g=20, limited_by=("standing",))
    out = {lv: v for n, lv, v in t.flush() if n == "ElasticLimitedBatches"}
    assert out == {"spare": 2.0, "deadline": 1.0, "queue": 1.0, "standing": 1.0}
    with pytest.raises(ValueError, match=r"unknown bound\(s\) \['spar'\]; known: \['deadline'"):
        t.record_batch(10, served=1, shed=0, bad=0, past_T=0, g=0, limited_by=("spar",))
