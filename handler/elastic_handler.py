"""TorchServe handler of ElasticDenser: a thin adapter over elastic.service.ElasticRetriever.

Per batch: read g (the frontend's pending-queue size, polled in the background from the
management API), choose the largest SubLM with expected latency <= T (elastic/schedule.py),
encode the queries with it, search the FAISS index. Each request gets its own status: a bad
request answers 400 with {"error": ...}; the others in its batch answer 200 with
{"results": [{"pid", "score"}...], "level": k, "queue_size": g}. User text is never logged.

T (handler.latency_constraint_ms in model-config.yaml) can be overridden without rebuilding
the .mar by the ELASTIC_LATENCY_CONSTRAINT_MS environment variable of `torchserve --start`.
"""

import logging
import os
import sys

from ts.torch_handler.base_handler import BaseHandler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the packed elastic/ package

from elastic.service import ElasticRetriever, HandlerSettings, QueuePoller  # noqa: E402

log = logging.getLogger(__name__)


class ElasticDenserHandler(BaseHandler):
    """See the module docstring."""

    def initialize(self, context):
        props = context.system_properties
        yaml_cfg = context.model_yaml_config or {}
        settings = HandlerSettings.from_yaml(yaml_cfg.get("handler"))
        max_batch = int(yaml_cfg.get("batchSize", getattr(context, "batch_size", 1) or 1))
        self.poller = QueuePoller(settings.management_address, context.model_name, settings.poll_interval_ms)
        self.retriever = ElasticRetriever(props["model_dir"], settings, max_batch, lambda: self.poller.queue_size)
        self.poller.start()
        self.context = context
        self.initialized = True
        log.info("ElasticDenser ready: %s", self.retriever.describe())

    def describe_handle(self):
        return self.retriever.describe()

    def handle(self, data, context):
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        bodies = [row.get("body", row.get("data")) if isinstance(row, dict) else row for row in data]
        out = []
        for i, r in enumerate(self.retriever.handle_batch(bodies)):
            if r.status != 200:
                context.set_response_status(r.status, r.payload["error"], i)
            out.append(r.payload)
        return out
