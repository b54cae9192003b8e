"""TorchServe handler of the elastic models: a thin adapter over elastic.service.server_for, which
serves ElasticDenser (a model directory with index.faiss), ElasticRanker (a cross-encoder) or a
GLUE ElasticLM (config.json with finetuning_task) behind the same elastic schedule.

Per batch: read each request's start time (X-Request-Start) and g (the frontend's queue size,
polled after full batches), let elastic/schedule.py pick the best SubLM that keeps every request
within T and shed those that cannot make it, run the task's model with it. Each request gets its
own status: a bad request answers 400 with {"error": ...}, a GET 405, a form or another unsupported
Content-Type 415 (``http_refusal``); a shed one 503 with Retry-After; the
others in its batch answer 200 with the task's payload plus "level": k and "queue_size": g
(retrieval: {"results": [{"pid", "score"}...]}; rerank: {"results": [{"pid", "score"}...]} over the
request's passages, best first; GLUE: {"label", "probabilities"} or {"score"}).
User text is never logged.

Elastic metrics (elastic/telemetry.py: requests per level, g, level, answers past T, shed,
predicted and measured batch time, σ, batches held down per bound) go through TorchServe's
custom metrics API, as the packed metrics.yaml declares them, once per
handler.metrics_interval_s.

T (handler.latency_constraint_ms in model-config.yaml) can be overridden without rebuilding
the .mar by the ELASTIC_LATENCY_CONSTRAINT_MS environment variable of `torchserve --start`.
"""

import logging
import os
import sys

from ts.torch_handler.base_handler import BaseHandler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the packed elastic/ package

from elastic.service import HandlerSettings, QueuePoller, http_refusal, server_for  # noqa: E402
from elastic.telemetry import SPECS, Flusher, load_metrics_yaml  # noqa: E402

log = logging.getLogger(__name__)


class ElasticDenserHandler(BaseHandler):
    """See the module docstring."""

    def initialize(self, context):
        self.context = context
        props = context.system_properties
        yaml_cfg = context.model_yaml_config or {}
        settings = HandlerSettings.from_yaml(yaml_cfg.get("handler"))
        max_batch = int(yaml_cfg.get("batchSize", getattr(context, "batch_size", 1) or 1))
        max_delay = float(yaml_cfg.get("maxBatchDelay", 100))  # TorchServe's default maxBatchDelay
        self.metrics = self._metrics(context, props["model_dir"])  # a bad metrics.yaml fails before the model loads
        self.poller = QueuePoller(settings.management_address, context.model_name)
        self.server = server_for(props["model_dir"], settings, max_batch, self.poller, max_delay)
        self.start_header = settings.request_start_header.lower()
        self.flusher = Flusher(self.server.telemetry, self._emit, settings.metrics_interval_s).start()
        self.poller.start()
        self.initialized = True
        log.info("elastic model ready: %s", self.server.describe())

    @staticmethod
    def _metrics(context, model_dir):
        """name -> (TorchServe metric object, its spec) for each elastic metric the packed
        metrics.yaml declares (all of them when the model directory has none). Raises
        ValueError naming the file and field of a metrics.yaml that does not parse."""
        from ts.metrics.metric_type_enum import MetricTypes

        path = os.path.join(model_dir, "metrics.yaml")
        specs = load_metrics_yaml(path) if os.path.exists(path) else SPECS
        out = {}
        for name, spec in specs.items():
            mtype = MetricTypes.COUNTER if spec.type == "counter" else MetricTypes.GAUGE
            out[name] = (context.metrics.add_metric_to_cache(name, spec.unit, list(spec.dimensions), mtype), spec)
        return out

    def _emit(self, name, label, value):
        """One elastic metric update through TorchServe's custom metrics API (a [METRICS] line on
        stdout that the frontend exports on /metrics); ``label``: the value of the metric's
        second dimension (PreservingLevel or Bound), when it has one."""
        if name in self.metrics:
            metric, spec = self.metrics[name]
            labels = [self.context.model_name] + ([str(label)] if len(spec.dimensions) > 1 else [])
            metric.add_or_update(value, labels)

    def describe_handle(self):
        return self.server.describe()

    def handle(self, data, context):
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        bodies, starts = [], []
        for i, row in enumerate(data):
            headers = self._headers(context, i)
            body = row.get("body", row.get("data")) if isinstance(row, dict) else row
            refused = http_refusal(body, headers.get("content-type"), self.server.REQUEST_HINT)
            bodies.append(refused or body)
            starts.append(headers.get(self.start_header))
        out = []
        for i, r in enumerate(self.server.handle_batch(bodies, starts)):
            if r.status != 200:
                context.set_response_status(r.status, r.payload["error"], i)
            for k, v in r.headers.items():
                context.set_response_header(i, k, v)
            out.append(r.payload)
        return out

    @staticmethod
    def _headers(context, i):
        """The HTTP headers of request i, names lower-cased (first one wins). TorchServe adds
        entries of its own to the same map ("explain", "url_path", per-field content types under
        the field's name); none of them is named like the headers read here."""
        out = {}
        for k, v in context.get_all_request_header(i).items():
            if isinstance(k, str) and isinstance(v, str):
                out.setdefault(k.lower(), v)
        return out
