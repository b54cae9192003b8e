"""Locust replay of MS MARCO queries against ElasticDenser, in a rush (paper §5.3).

    locust -f benchmarks/locustfile.py --headless --host http://127.0.0.1:8080 \
        --queries data/msmarco/queries.dev500.tsv --raw-out runs/demo/online/raw.jsonl \
        --peak-users 120 --ramp-up-s 40 --hold-s 30 --ramp-down-s 20 --tail-s 15

Users ramp up linearly to the peak, hold it, ramp down, then one user stays for the tail so
the return to larger SubLMs shows; each user pauses 1-3 s between requests. With
--start-header each request carries X-Request-Start (its send time), as a load balancer in
front of TorchServe would set it, so the schedule sees each request's true age instead of
estimating it from the queue sizes. Every response is
recorded (start time, latency, status, level, queue size, qid, returned pids, and the
Server-Timing wait / model / handler milliseconds) in the
--raw-out JSON lines file; benchmarks/report.py turns it into requests.csv, the summary and
the plot. benchmarks/online.py runs this under taskset on its own core.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, for elastic/
from benchmarks.report import server_timing  # noqa: E402
from elastic.data import read_tsv  # noqa: E402

RECORDS: list[dict] = []
STATE: dict = {}


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--queries", default="data/msmarco/queries.dev500.tsv", help="qid<TAB>query file to replay")
    parser.add_argument("--raw-out", default="runs/demo/online/raw.jsonl", help="JSON lines of every response")
    parser.add_argument("--model-name", default="elastic", help="TorchServe model name")
    parser.add_argument("--peak-users", type=int, default=400, help="users at the peak")
    parser.add_argument("--ramp-up-s", type=float, default=40.0, help="seconds of linear ramp-up")
    parser.add_argument("--hold-s", type=float, default=30.0, help="seconds at the peak")
    parser.add_argument("--ramp-down-s", type=float, default=20.0, help="seconds of linear ramp-down")
    parser.add_argument("--tail-s", type=float, default=15.0, help="seconds with one user at the end")
    parser.add_argument("--min-wait-s", type=float, default=1.0, help="least pause between a user's requests")
    parser.add_argument("--max-wait-s", type=float, default=3.0, help="longest pause between a user's requests")
    parser.add_argument("--seed", type=int, default=0, help="query sampling seed")
    parser.add_argument("--start-header", action="store_true",
                        help="send X-Request-Start: t=<send, epoch seconds> as a load balancer in front would")


@events.test_start.add_listener
def _start(environment, **_):
    o = environment.parsed_options
    STATE["queries"] = list(read_tsv(o.queries).items())
    STATE["rng"] = random.Random(o.seed)
    STATE["t0"] = time.time()
    STATE["path"] = f"/predictions/{o.model_name}"


@events.test_stop.add_listener
def _stop(environment, **_):
    with open(environment.parsed_options.raw_out, "w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")


class QueryUser(FastHttpUser):
    """Sends one MS MARCO query, waits 1-3 s (--min-wait-s/--max-wait-s), repeats."""

    def wait_time(self):
        o = self.environment.parsed_options
        return between(o.min_wait_s, o.max_wait_s)(self)

    @task
    def search(self):
        qid, text = STATE["rng"].choice(STATE["queries"])
        t_start = time.time()
        headers = {"X-Request-Start": f"t={t_start:.6f}"} if self.environment.parsed_options.start_header else {}
        with self.client.post(STATE["path"], json={"query": text}, headers=headers, name="predictions",
                              catch_response=True) as resp:
            latency_ms = (time.time() - t_start) * 1000
            rec = {"timestamp_s": round(t_start - STATE["t0"], 4), "latency_ms": round(latency_ms, 3),
                   "status": resp.status_code, "qid": qid, "level": None, "queue_size": None, "pids": []}
            # wait_ms / model_ms / handler_ms: where the time went on the server (None without Server-Timing)
            rec.update(server_timing(resp.headers.get("Server-Timing") if resp.headers else None))
            if resp.status_code == 200:
                try:
                    body = resp.json()
                    rec.update(level=body["level"], queue_size=body["queue_size"],
                               pids=[h["pid"] for h in body["results"]])
                except (ValueError, KeyError) as e:
                    resp.failure(f"unexpected body: {e}")
            RECORDS.append(rec)


class Rush(LoadTestShape):
    """Linear ramp-up, hold, linear ramp-down, a one-user tail; then stop."""

    def tick(self):
        o = self.runner.environment.parsed_options
        t = self.get_run_time()
        up, hold, down, tail = o.ramp_up_s, o.hold_s, o.ramp_down_s, o.tail_s
        peak = o.peak_users
        if t < up:
            users = max(1, round(peak * t / up))
        elif t < up + hold:
            users = peak
        elif t < up + hold + down:
            users = max(1, round(peak * (1 - (t - up - hold) / down)))
        elif t < up + hold + down + tail:
            users = 1
        else:
            return None
        return users, max(1, peak / 5)  # spawn rate: reach any target within ~5 s
