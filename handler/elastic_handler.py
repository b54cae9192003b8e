"""TorchServe handler of the elastic models: a thin adapter over elastic.service.server_for, which
serves ElasticDenser (a model directory with index.faiss) or a GLUE ElasticLM (config.json with
finetuning_task) behind the same elastic schedule.

Per batch: read each request's start time (X-Request-Start) and g (the frontend's queue size,
polled after full batches), let elastic/schedule.py pick the best SubLM that keeps every request
within T and shed those that cannot make it, run the task's model with it. Each request gets its
own status: a bad request answers 400 with {"error": ...}; a shed one 503 with Retry-After; the
others in its batch answer 200 with the task's payload plus "level": k and "queue_size": g
(retrieval: {"results": [{"pid", "score"}...]}; GLUE: {"label", "probabilities"} or {"score"}).
User text is never logged.

T (handler.latency_constraint_ms in model-config.yaml) can be overridden without rebuilding
the .mar by the ELASTIC_LATENCY_CONSTRAINT_MS environment variable of `torchserve --start`.
"""

import logging
import os
import sys

from ts.torch_handler.base_handler import BaseHandler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the packed elastic/ package

from elastic.service import HandlerSettings, QueuePoller, server_for  # noqa: E402

log = logging.getLogger(__name__)


class ElasticDenserHandler(BaseHandler):
    """See the module docstring."""

    def initialize(self, context):
        props = context.system_properties
        yaml_cfg = context.model_yaml_config or {}
        settings = HandlerSettings.from_yaml(yaml_cfg.get("handler"))
        max_batch = int(yaml_cfg.get("batchSize", getattr(context, "batch_size", 1) or 1))
        max_delay = float(yaml_cfg.get("maxBatchDelay", 100))  # TorchServe's default maxBatchDelay
        self.poller = QueuePoller(settings.management_address, context.model_name)
        self.server = server_for(props["model_dir"], settings, max_batch, self.poller, max_delay)
        self.start_header = settings.request_start_header.lower()
        self.poller.start()
        self.context = context
        self.initialized = True
        log.info("elastic model ready: %s", self.server.describe())

    def describe_handle(self):
        return self.server.describe()

    def handle(self, data, context):
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        bodies = [row.get("body", row.get("data")) if isinstance(row, dict) else row for row in data]
        starts = [self._request_start(context, i) for i in range(len(bodies))]
        out = []
        for i, r in enumerate(self.server.handle_batch(bodies, starts)):
            if r.status != 200:
                context.set_response_status(r.status, r.payload["error"], i)
            for k, v in r.headers.items():
                context.set_response_header(i, k, v)
            out.append(r.payload)
        return out

    def _request_start(self, context, i):
        """The request-start header of request i (header names compared case-insensitively)."""
        for k, v in context.get_all_request_header(i).items():
            if isinstance(k, str) and k.lower() == self.start_header and isinstance(v, str):
                return v
        return None
