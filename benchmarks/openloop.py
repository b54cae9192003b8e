"""Open-loop Poisson load with Locust: requests leave at exponential inter-arrival times of a
fixed rate, whether or not earlier ones were answered (no coordinated omission).

    locust -f benchmarks/openloop.py --headless -u 1 -r 1 --host http://127.0.0.1:8080 \
        --queries data/msmarco/queries.dev500.tsv --rate 200 --warmup-s 5 --duration-s 30 \
        --raw-out runs/demo/slo/raw.jsonl

One Locust user runs the arrival schedule and spawns a greenlet per request on its FastHttpUser
client, with enough connections that no send waits for a free one. Python's cyclic garbage
collector is off during the run (``--keep-gc`` leaves it on): its collections paused this process
for 20-30 ms at 300 req/s, which the answers' timings would have charged to the server. Each
request carries ``X-Request-Start: t=<scheduled send, epoch seconds>``, as a load balancer would set it, and its
latency is timed from that scheduled send. The user stops the run once the last request is
answered or ``--drain-s`` has passed. Every scheduled request becomes one line of --raw-out:
scheduled_s (since the measured window began, negative during warm-up), sent_epoch (the
scheduled send, epoch seconds), latency_ms, status
(0 = no answer), retry_after (header value or null), level, queue_size, qid, pids, and wait_ms,
model_ms and handler_ms from the answer's Server-Timing header (null when absent).
benchmarks/slo.py runs this under taskset on a core of its own.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from pathlib import Path

import gevent
from gevent.pool import Group
from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, for elastic/
from benchmarks.report import server_timing  # noqa: E402
from elastic.data import read_tsv  # noqa: E402

RECORDS: list[dict] = []


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--queries", default="data/msmarco/queries.dev500.tsv", help="qid<TAB>query file to replay")
    parser.add_argument("--raw-out", default="raw.jsonl", help="JSON lines, one per scheduled request")
    parser.add_argument("--model-name", default="elastic", help="TorchServe model name")
    parser.add_argument("--rate", type=float, default=100.0, help="offered requests per second (Poisson)")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds of load before the measured window")
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds of the measured window")
    parser.add_argument("--drain-s", type=float, default=10.0, help="seconds to wait for answers after the last send")
    parser.add_argument("--no-start-header", action="store_true", help="send no X-Request-Start header")
    parser.add_argument("--seed", type=int, default=0, help="arrival and query sampling seed")
    parser.add_argument("--keep-gc", action="store_true",
                        help="leave Python's cyclic garbage collector on during the run (its collections pause "
                             "this process, every send and every answer's timing, by 20-30 ms at 300 req/s)")


@events.test_stop.add_listener
def _stop(environment, **_):
    with open(environment.parsed_options.raw_out, "w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")


class OpenLoopUser(FastHttpUser):
    """The arrival schedule (see the module docstring)."""

    concurrency = 2000  # connections of the shared client: never the bottleneck
    network_timeout = 30.0
    connection_timeout = 5.0

    def _send(self, rec: dict, send_epoch: float, text: str, header: bool) -> None:
        headers = {"X-Request-Start": f"t={send_epoch:.6f}"} if header else {}
        path = f"/predictions/{self.environment.parsed_options.model_name}"
        try:
            with self.client.post(path, json={"query": text}, headers=headers, name="predictions",
                                  catch_response=True) as resp:
                rec["latency_ms"] = round((time.time() - send_epoch) * 1000, 3)
                rec["status"] = resp.status_code or 0
                rec["retry_after"] = resp.headers.get("Retry-After") if resp.headers else None
                rec.update(server_timing(resp.headers.get("Server-Timing") if resp.headers else None))
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                        rec.update(level=body["level"], queue_size=body["queue_size"],
                                   pids=[h["pid"] for h in body["results"]])
                        resp.success()
                    except (ValueError, KeyError, TypeError) as e:
                        resp.failure(f"unexpected body: {e}")
                elif resp.status_code == 503:
                    resp.success()  # shed on purpose: counted by the report, not a Locust failure
        except Exception:  # connection errors: status stays 0 (no answer)
            rec["latency_ms"] = round((time.time() - send_epoch) * 1000, 3)

    @task
    def schedule(self):
        o = self.environment.parsed_options
        queries = list(read_tsv(o.queries).items())
        rng = random.Random(o.seed)
        group = Group()
        if not o.keep_gc:  # a collection would stall sends and timings: the load generator's pause, not the server's
            gc.collect()
            gc.freeze()
            gc.disable()
        start = time.time() + 0.2
        window = start + o.warmup_s
        end = window + o.duration_s
        t = start
        while t < end:
            delay = t - time.time()
            if delay > 0:
                gevent.sleep(delay)
            qid, text = rng.choice(queries)
            rec = {"scheduled_s": round(t - window, 6), "sent_epoch": round(t, 6), "latency_ms": None, "status": 0,
                   "retry_after": None,
                   "level": None, "queue_size": None, "qid": qid, "pids": [], "wait_ms": None, "model_ms": None,
                   "handler_ms": None}
            RECORDS.append(rec)
            group.spawn(self._send, rec, t, text, not o.no_start_header)
            t += rng.expovariate(o.rate)
        group.join(timeout=o.drain_s)
        group.kill(block=False)
        gc.enable()
        self.environment.runner.quit()
