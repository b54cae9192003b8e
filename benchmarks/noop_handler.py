"""A TorchServe handler that answers every request with a fixed top-10, without a model: the
ceiling of the serving stack (frontend, IPC, JSON) for the SLO benchmark (server "noop").

The answer has the shape and size of ElasticDenser's ({"results": 10 x {"pid", "score"},
"level": null, "queue_size": 0}); the body is not parsed, so it measures what the stack costs
per request and batch, nothing more.
"""

from ts.torch_handler.base_handler import BaseHandler

ANSWER = {"results": [{"pid": str(1000000 + i), "score": round(0.9 - i / 100, 6)} for i in range(10)],
          "level": None, "queue_size": 0}


class NoopHandler(BaseHandler):
    """See the module docstring."""

    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return [ANSWER for _ in data]
