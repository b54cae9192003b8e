"""The elastic serving core, independent of TorchServe and generic over tasks: settings, request
parsing, the queue poller, calibration of t_k, and the per-batch path (schedule -> the task's
model at the chosen SubLM -> one answer per request).

``ElasticServer`` holds everything the schedule needs (ages, g, o, c, λ, shedding, counters,
Server-Timing); a task supplies four hooks: parse a batch of bodies, run items at a level, turn
outputs into answers, and a calibration item. Four tasks:

- ``ElasticRetriever``: ElasticDenser, query -> top-k passages (exact search of the FAISS flat
  index, one sgemm per batch);
- ``ElasticClassifierServer``: ElasticLM fine-tuned on a GLUE task, text (+ text_pair) -> label
  and probabilities, or STS-B's score;
- ``ElasticRankerServer``: ElasticRanker, a query and its candidate passages -> a score per
  passage, best first (one forward over every pair of the batch);
- ``ElasticPipelineServer``: query -> ElasticDenser top-K -> ElasticRanker -> top-k, the schedule
  choosing (denser level, ranker level, K) per batch (elastic/pipeline.py).

``server_for`` picks the task from the model directory; handler/elastic_handler.py is a thin
TorchServe adapter over it.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
import torch

from elastic import calibration_store
from elastic.encoder import ElasticEncoder
from elastic.gc_pauses import GC_PAUSES, freeze_heap
from elastic.telemetry import Telemetry
from elastic.schedule import (BOUNDS, LATE_POLICIES, RULES, SPARE_RUNGS, ArrivalRate, Calibration, LatencyCorrection,
                              SpareFeedback, StandingQueue, estimate_age_ms, level_corrections, monotone_calibration,
                              parse_request_start, plan_batch, youngest_age_ms)

log = logging.getLogger(__name__)

ENV_T = "ELASTIC_LATENCY_CONSTRAINT_MS"
ENV_MANAGEMENT = "ELASTIC_MANAGEMENT_ADDRESS"
MAX_QUERY_CHARS = 2000  # refuse before tokenizing anything larger
LONG_QUERY_POLICIES = ("truncate", "refuse")
CALIBRATION_QUERY = "what is the average processing time of a typical web search query"


@dataclass(frozen=True)
class HandlerSettings:
    """Settings under ``handler:`` in model-config.yaml; environment variables override two of them.

    Attributes:
        latency_constraint_ms: T in milliseconds (> 0); env ELASTIC_LATENCY_CONSTRAINT_MS wins.
        schedule: "deadline" (each request's age, corrected t_k, queue bound; the default) or
            "paper" ((g+1)·t_k <= T, batched): see elastic/schedule.py.
        late_requests: "shed" (a request that cannot be answered within T even by the smallest
            SubLM gets 503 + Retry-After at once; one past its deadline is never computed) or
            "serve" (computed however late).
        pin_level: serve every batch with this preserving level (percent): a static baseline
            on the same serving stack. Empty = elastic.
        max_utilization: ρ_max of the deadline rule's rate bound: at the arrival rate the worker
            sees, the chosen SubLM may fill at most this share of its time. 1.0 (no headroom of
            its own: a burst meets the queue bound and the batch's own deadline, which step down
            for the batches it lasts) by the side-by-side runs in README "Under load": 0.7 gave
            up 0.03-0.07 effective MRR@10 at 200-300 req/s for no better within-T minimum there,
            but held T better at 400 req/s (0.984-0.996 against 0.930), near the smallest
            SubLM's own capacity.
        min_spare: σ of the deadline rule's spare bound, in [0, 1): a SubLM above the smallest
            is chosen only while the level it would step down to in a burst (``spare_from``), at
            the arrival rate and at full batches, would leave at least this share of the
            worker's time spare; near the stack's last capacity no smaller level is left to
            absorb a burst (elastic/schedule.py). 0 = off. 0.25 with "next" by the probe in
            README "Under load", "The spare bound from the next level" (slo_probes/spare-from/,
            3 runs a point): 0.4 with "next" stepped down to level 11 at 300 req/s already.
            With "smallest", 0.4 came from the earlier probe (slo_probes/min-spare/): the
            lowest within T rose from 0.972 to 0.988 at 300 req/s and from 0.951 to 0.988 at
            400 against 0 (off).
        spare_feedback: learn σ online, within [0.02, min_spare], instead of holding it at
            ``min_spare`` (elastic/schedule.py, ``SpareFeedback``): σ starts at min_spare, falls
            by a fifth after each second that missed at most a quarter of ``miss_budget``, rises
            by 0.1 (up to min_spare) after each second in which more than the budget missed T
            (shed or late) and a batch served a level that min_spare would have kept out, and
            then falls no lower than the σ that missed plus 0.05 until that floor has faded (3 %
            a clean second). So the server is never more cautious than the fixed σ, and gives
            back what the fixed σ holds in reserve where the machine and the rate allow it. A
            fixed σ is right for one machine and rate only: on the 2-core machine of the probes
            of 2026-11-24, 18:30-20:10 (twice as fast as the one σ = 0.25 was set on) a fixed
            0.25 held the elastic server at a mean level of 17-22 at 600 req/s, where static
            30 % kept 0.99-1.00 within T, and σ = 0 matched static 30 % there but missed 0.99 at
            800-1000 req/s (README "Under load", "A spare bound that learns"). Ignored while
            min_spare is 0.
        miss_budget: the share of requests per second that may miss T before the feedback
            tightens σ, in (0, 0.5); 0.005, half of the 1 % that within_T >= 0.99 allows.
        spare_from: the rung whose spare the spare bound tests for a SubLM: "next" (the next
            level down, so the level steps down one rung at a time as the rate rises) or
            "smallest" (one test for every level above the smallest, the first form: at
            400 req/s it flipped batches between 5 % and 20 % and scored 0.367-0.388 effective
            MRR@10, against 0.398-0.406 for "next" at σ 0.25).
        rate_window_s: seconds of recent batches over which the arrival rate λ of the rate and
            spare bounds is counted (> 0; elastic/schedule.py, ``ArrivalRate``). Longer is
            steadier (Poisson noise falls as 1/sqrt(λ·window)) and slower to see a rush begin;
            a burst within it still meets the batch's own deadline and the queue bound.
        deadline_quantile: the quantile of observed / predicted processing time (c_k, over the
            level's last 200 batches) that a batch's own deadline budgets for, in (0, 1]. Higher
            budgets for more of the tail, but a rush's slow batches then hold the level down for
            longer after it (0.99 is about the largest ratio of the window). 0.98 by the probes
            in README "Under load": 0.9 kept 0.983-0.988 of requests within T at 100-200 req/s,
            0.95 kept 0.989-0.999 at 100-300 req/s.
        return_share: r in [0, 2], the share of the per-batch overhead o (the gap between
            batches while requests wait) that a batch's own deadline and shedding budget for an
            answer's way back from the handler to the client. 0.5 (an even split of the gap
            between the two ways). The probe in README "Under load" ("The way back",
            slo_probes/return-share/) measured a way back near o at full batches, but 1.0 shed
            3-6 times as many requests at 100 req/s and kept no more within T.
        standing_target: τ / T, in (0, 1]: the queue stands while the youngest request of every
            batch is older than τ (elastic/schedule.py, point 4).
        standing_interval_ms: drain a queue that has stood this long: shed every request of each
            batch until a batch's youngest request is within τ again (ms, >= 0; 0 = off; shedding
            only). Defaults τ = 0.4·T and 100 ms: in the raw runs of the SLO probe of 2026-11-24
            at 600 req/s (T = 50 ms), the test would have fired 0-6 times in 30 s in the runs
            that held T and 104 times in the 23 s of the run that fell into a standing queue.
            Measured beside the drain off (README "The schedule", three probes): 14-33 points
            more within T at 800 req/s (9 pairings of 9), 0.1-1.5 fewer at 600 (6 of 7);
            200 ms gained less at 800.
        retry_after_s: the Retry-After header (seconds) of a shed request's 503.
        request_start_header: request header carrying the client-side start time (load
            balancers set X-Request-Start); without it, a request's age is estimated.
        request_start_max_age_ms: an older start is absurd: ignored for that request, counted.
        management_address: TorchServe management API, polled for the queue size g after each
            full batch; env ELASTIC_MANAGEMENT_ADDRESS wins.
        query_max_length: retrieval: longest query in tokens ([CLS] and [SEP] included); what
            happens to a longer one is ``long_queries``. (A GLUE model truncates to its task's
            max_length and says so.)
        long_queries: retrieval: "truncate" (a longer query keeps its first query_max_length
            tokens, as offline evaluation encodes it, and the answer says "truncated": true; the
            default) or "refuse" (400 naming the limit).
        top_k: retrieval: passages returned per query.
        query_heads: retrieval and pipeline: encode queries through the model's per-level query
            heads (query_heads.safetensors, elastic/query_head.py) when it has them; False serves
            the same weights without them (to compare, or to fall back) with no rebuild.
        max_passages: rerank: most passages in one request. t_k is calibrated at this many
            pairs per request, so that the schedule's prediction bounds every request; a longer
            list is refused with 400 naming the limit.
        pair_max_length: rerank: tokens per (query, passage) pair, the longer side cut first
            (CrossEncoder.TRUNCATION; the recipe's ranker.max_length); an answer counts the
            pairs that were cut.
        torch_threads: intra-op threads of this worker.
        calibration_cache: reuse the t_k calibration stored in the model directory for the same
            model files, machine, torch version, thread count, levels and batch sizes
            (elastic/calibration_store.py), so that a restarted worker serves at once; it is
            then re-measured while the worker is idle. False: measure at every load.
        worker_nice: added to this worker process's nice value at load (os.nice), in [-20, 19].
            The frontend shares the worker's core; a negative value lets a batch in progress
            run ahead of it. Raising priority needs CAP_SYS_NICE: without it the load fails,
            naming this field. 0 leaves the process as TorchServe started it.
        calibration_repeats: timed runs per (level, batch size) when calibrating t_k.
        metrics_interval_s: seconds between flushes of the elastic metrics (elastic/telemetry.py)
            to TorchServe's metrics API; what happens in between is summed.
        large_batch_tail: a batch at hand of more than half of batchSize budgets its own
            deadline for the tail of the level's large batches when that is higher than the
            level's pooled tail (elastic/schedule.py, point 2); False pools every batch size.
        packed_levels: retrieval and pipeline: serve each level from its own contiguous copy of
            the encoder layers (elastic/structure.py, ``pack``) instead of strided slices of the
            largest SubLM's matrices; costs the encoder-layer weights of every smaller level
            (``describe()["packed_bytes"]``). Off: under load it shed more than slicing at
            600-800 req/s and ran level 5 no faster (README "Contiguous per-level weights",
            slo_probes/packed-levels/).
        onednn: run the worker's matrix products through oneDNN (``torch.backends.mkldnn``).
            Off (the default), they go to MKL's sgemm. oneDNN builds a primitive per operand
            shape and keeps 1,024 of them (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``); one level's
            shapes (batch size x query length x its layer widths) fit, every level's do not,
            so an elastic worker that changes level batch by batch keeps rebuilding them.
            Measured on the demo model (README "Matrix products"): after batches at mixed
            levels, a level-5 batch of 8 took 5.8-5.9 ms with oneDNN against 3.8-4.2 ms with
            MKL, and MKL was no slower for a single level. Process-wide: the worker serves
            one model.
        gc_freeze: after the model is loaded and calibrated, move every object the worker holds
            into Python's permanent generation (``gc.freeze()``, elastic/gc_pauses.py), so that
            the collector's full collections no longer walk the loaded libraries and model
            (73-111 ms each on the demo model's worker, inside whichever batch they fall in).
    """

    latency_constraint_ms: float
    schedule: str = "deadline"
    late_requests: str = "shed"
    pin_level: Optional[int] = None
    max_utilization: float = 1.0
    min_spare: float = 0.25
    spare_feedback: bool = True
    miss_budget: float = 0.005
    spare_from: str = "next"
    rate_window_s: float = 2.0
    deadline_quantile: float = 0.98
    return_share: float = 0.5
    standing_target: float = 0.4
    standing_interval_ms: float = 100.0
    retry_after_s: int = 1
    request_start_header: str = "X-Request-Start"
    request_start_max_age_ms: float = 60_000.0
    management_address: str = "http://127.0.0.1:8081"
    query_max_length: int = 32
    long_queries: str = "truncate"
    top_k: int = 10
    query_heads: bool = True
    max_passages: int = 20
    pair_max_length: int = 160
    torch_threads: int = 1
    worker_nice: int = 0
    calibration_repeats: int = 30
    calibration_cache: bool = True
    metrics_interval_s: float = 1.0
    large_batch_tail: bool = True
    packed_levels: bool = False
    onednn: bool = False
    gc_freeze: bool = True

    @classmethod
    def from_yaml(cls, handler_cfg: dict | None, environ: dict | None = None) -> "HandlerSettings":
        """Build from the yaml's ``handler`` mapping and the environment.

        Raises:
            ValueError: naming the field that is missing, unknown or out of range.
        """
        environ = os.environ if environ is None else environ
        raw = dict(handler_cfg or {})
        if environ.get(ENV_T):
            raw["latency_constraint_ms"] = environ[ENV_T]
        if environ.get(ENV_MANAGEMENT):
            raw["management_address"] = environ[ENV_MANAGEMENT]
        known = {f.name: f for f in fields(cls)}
        for k in raw:
            if k not in known:
                raise ValueError(f"handler.{k}: unknown setting (known: {sorted(known)})")
        if "latency_constraint_ms" not in raw:
            raise ValueError(f"handler.latency_constraint_ms: missing (set it in model-config.yaml or {ENV_T})")
        kw = {}
        for k, v in raw.items():
            typ = {"float": float, "int": int, "str": str, "bool": _strict_bool, "Optional[int]": int}[known[k].type]
            if v is None and known[k].type.startswith("Optional"):
                kw[k] = None
                continue
            try:
                kw[k] = typ(v)
            except (TypeError, ValueError):
                raise ValueError(f"handler.{k}: expected {known[k].type}, got {v!r}") from None
        s = cls(**kw)
        if not (s.latency_constraint_ms > 0 and math.isfinite(s.latency_constraint_ms)):
            raise ValueError("handler.latency_constraint_ms: must be a positive number of milliseconds, "
                             f"got {raw['latency_constraint_ms']!r}")
        for k in ("query_max_length", "top_k", "torch_threads", "calibration_repeats", "retry_after_s", "max_passages"):
            if getattr(s, k) < 1:
                raise ValueError(f"handler.{k}: must be >= 1, got {getattr(s, k)}")
        if s.pair_max_length <= 8:
            raise ValueError(f"handler.pair_max_length: must be > 8 tokens, got {s.pair_max_length}")
        if s.schedule not in RULES:
            raise ValueError(f"handler.schedule: expected one of {list(RULES)}, got {s.schedule!r}")
        if s.long_queries not in LONG_QUERY_POLICIES:
            raise ValueError(f"handler.long_queries: expected one of {list(LONG_QUERY_POLICIES)}, "
                             f"got {s.long_queries!r}")
        if s.late_requests not in LATE_POLICIES:
            raise ValueError(f"handler.late_requests: expected one of {list(LATE_POLICIES)}, got {s.late_requests!r}")
        if not 0 < s.max_utilization <= 1:
            raise ValueError(f"handler.max_utilization: must be in (0, 1], got {s.max_utilization}")
        if not 0 <= s.min_spare < 1:
            raise ValueError(f"handler.min_spare: must be in [0, 1), got {s.min_spare}")
        if not 0 < s.miss_budget < 0.5:
            raise ValueError(f"handler.miss_budget: must be in (0, 0.5), got {s.miss_budget}")
        if s.spare_from not in SPARE_RUNGS:
            raise ValueError(f"handler.spare_from: expected one of {list(SPARE_RUNGS)}, got {s.spare_from!r}")
        if not (s.rate_window_s > 0 and math.isfinite(s.rate_window_s)):
            raise ValueError(f"handler.rate_window_s: must be a positive number of seconds, got {s.rate_window_s}")
        if not -20 <= s.worker_nice <= 19:
            raise ValueError(f"handler.worker_nice: must be in [-20, 19], got {s.worker_nice}")
        if not 0 < s.deadline_quantile <= 1:
            raise ValueError(f"handler.deadline_quantile: must be in (0, 1], got {s.deadline_quantile}")
        if not 0 <= s.return_share <= 2:
            raise ValueError(f"handler.return_share: must be in [0, 2], got {s.return_share}")
        if not 0 < s.standing_target <= 1:
            raise ValueError(f"handler.standing_target: must be in (0, 1], got {s.standing_target}")
        if not (s.standing_interval_ms >= 0 and math.isfinite(s.standing_interval_ms)):
            raise ValueError(f"handler.standing_interval_ms: must be >= 0 milliseconds (0 = off), "
                             f"got {s.standing_interval_ms}")
        if not (s.metrics_interval_s > 0 and math.isfinite(s.metrics_interval_s)):
            raise ValueError("handler.metrics_interval_s: must be a positive number of seconds, "
                             f"got {s.metrics_interval_s}")
        if not s.request_start_max_age_ms > 0:
            raise ValueError(f"handler.request_start_max_age_ms: must be > 0, got {s.request_start_max_age_ms}")
        if not s.request_start_header.strip():
            raise ValueError("handler.request_start_header: must be a header name")
        return s


def _strict_bool(v: Any) -> bool:
    """A yaml / environment boolean: true / false (any case), 1 / 0, or a bool."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(v)


class BadRequest(ValueError):
    """A request that gets a 400 on its own; the rest of its batch goes on."""


def parse_query(body: Any) -> str:
    """The query text of one request body.

    Accepts a decoded JSON object ``{"query": "..."}`` (TorchServe decodes application/json),
    raw bytes holding such JSON, or raw UTF-8 text.

    Raises:
        BadRequest: malformed JSON, not UTF-8, no "query" field, a non-string or empty query,
            or more than MAX_QUERY_CHARS characters.
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not UTF-8 text") from None
        if text.lstrip().startswith(("{", "[")):
            try:
                body = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadRequest(f"malformed JSON: {e.msg} at position {e.pos}") from None
        else:
            body = text
    if isinstance(body, dict):
        if "query" not in body:
            raise BadRequest('JSON body must have a "query" field')
        body = body["query"]
    if not isinstance(body, str):
        raise BadRequest(f"query must be a string, got {type(body).__name__}")
    if not body.strip():
        raise BadRequest("query is empty")
    if len(body) > MAX_QUERY_CHARS:
        raise BadRequest(f"query has {len(body)} characters, the limit is {MAX_QUERY_CHARS}")
    return body.strip()


ACCEPTED_CONTENT_TYPES = ("application/json", "text/plain")


def http_refusal(body: Any, content_type: str | None, hint: str) -> Optional["Result"]:
    """The 405 or 415 answer to a request that is not a POST of a supported body, else None.

    TorchServe does not pass the HTTP method to the handler. A GET (or DELETE, or a POST with
    neither body nor Content-Type) reaches it as an empty body without a Content-Type header, so
    that is what is answered 405 with ``Allow: POST``. A form (application/x-www-form-urlencoded,
    multipart/form-data) reaches it split into fields, without a body (``body`` None): 415, as is
    any other Content-Type than ACCEPTED_CONTENT_TYPES. No Content-Type with a body is read as
    JSON or text (``parse_query``).

    Args:
        body: the request's body as TorchServe delivers it (``row["body"]`` or ``row["data"]``;
            None when it split a form into fields).
        content_type: the request's Content-Type header (any case, parameters allowed), or None.
        hint: what to send instead, e.g. 'a JSON body {"query": "..."}'.

    Returns:
        Result(405 | 415, {"error": ...}) or None (the body goes on to the task's parser).
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not ctype and (body is None or (isinstance(body, (bytes, bytearray, str)) and not body)):
        return Result(405, {"error": f"method not allowed: POST {hint} with Content-Type: application/json"},
                      {"Allow": "POST"})
    if body is None or (ctype and ctype not in ACCEPTED_CONTENT_TYPES):
        return Result(415, {"error": f"unsupported Content-Type {ctype or '(form fields)'}: send {hint} with "
                                     "Content-Type: application/json"})
    return None


class QueuePoller:
    """The queue size g from ``GET /models/{name}`` → ``jobQueueStatus.pendingRequests``, polled
    once per request from a daemon thread, so the per-batch path reads an attribute and never
    waits on HTTP.

    The serving core asks for a poll after each full batch only. A batch that leaves the
    frontend partly filled means the queue ran dry while it formed (g = 0), so an idle or
    lightly loaded server sends no polls at all. Under load there is at most one poll per batch
    instead of one every few milliseconds. About 0.4 ms per poll on a keep-alive connection
    (notes/torchserve-0.12.md). A failed poll keeps the last value and logs once per minute.

    Attributes:
        queue_size: the latest g polled (read by the serving core; it may also reset it to 0).
        polls: polls sent since start (for measuring the poller's cost).
    """

    def __init__(self, management_address: str, model_name: str):
        u = urlparse(management_address)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"handler.management_address: expected http://host:port, got {management_address!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = f"/models/{model_name}"
        self.queue_size = 0
        self.polls = 0
        self._last_warning = 0.0
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="queue-poller", daemon=True)

    def start(self) -> "QueuePoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()

    def request(self) -> None:
        """Ask for one poll (non-blocking; requests made while one is running merge into one)."""
        self._wanted.set()

    def poll_once(self, conn: http.client.HTTPConnection) -> int:
        conn.request("GET", self.path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {self.path} answered {resp.status}")
        return int(json.loads(body)[0]["jobQueueStatus"]["pendingRequests"])

    def _loop(self) -> None:
        conn = None
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop.is_set():
                return
            try:
                conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=2)
                self.polls += 1
                self.queue_size = self.poll_once(conn)
            except Exception as e:  # keep serving on the last known g
                if conn is not None:
                    conn.close()
                conn = None
                if time.monotonic() - self._last_warning > 60:
                    log.warning("queue-size poll failed (%s); keeping g=%d", e, self.queue_size)
                    self._last_warning = time.monotonic()


class FixedQueue:
    """A queue signal that always reports ``queue_size`` (tests, and serving without a frontend)."""

    def __init__(self, queue_size: int = 0):
        self.queue_size = queue_size
        self.polls = 0

    def request(self) -> None:
        self.polls += 1


@dataclass
class Result:
    """The answer to one request: HTTP status, JSON-able payload and extra response headers."""

    status: int
    payload: dict
    headers: dict = field(default_factory=dict)


def flat_ip_matrix(index) -> torch.Tensor | None:
    """The vectors of an exact inner-product FAISS index (IndexFlatIP) as one (d, N) float32
    matrix, a passage per column, for ``q @ matrix`` then ``torch.topk``; None for any other index.

    Why one sgemm: below 20 queries (faiss ``distance_compute_blas_threshold``)
    IndexFlatIP.search scans the whole index once per query, so a batch of 8 reads the N x d
    matrix 8 times; one sgemm reads it once.

    Why (d, N) and not FAISS's own (N, d) rows: with the rows, ``q @ V.T`` at 2-3 queries took
    longer than at 4 (measured, not explained: the search alone 1.0 / 3.2 / 2.6 / 1.7 ms at
    1 / 2 / 3 / 4 queries over rows, 0.3 / 0.8 / 0.9 / 1.6 ms over columns; in the SLO probe of
    2026-11-24 a batch of 3 spent 7.9-9.1 ms in the model path against 5.8-6.0 ms for 4). Encode + search
    at level 5 on the demo index, per batch of 1 / 3 / 8 queries: rows 3.0 / 7.3 / 6.5 ms,
    columns 2.1 / 4.0 / 6.2 ms (benchmarks/results/search.md).

    FAISS's own search is as fast on the demo index (2.0 / 3.6 / 6.3 ms there): its 15 MB fit in
    this CPU's 32 MB L3 cache, so reading them once per query costs little. On a random index of
    200,000 x 384 (300 MB) one sgemm took 45 ms per batch of 8 against FAISS's 86 ms (12.7 / 38.8
    against 12.3 / 33.5 ms at 1 / 3 queries): the matrix is read once per batch, however large.

    The matrix is a copy (the index's rows cannot be read as columns): the caller drops the
    index once it holds the matrix, so the vectors stay in memory once.
    """
    import faiss

    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT or not index.ntotal:
        return None
    xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)  # a view of the index's storage
    return torch.from_numpy(xb).view(index.ntotal, index.d).T.contiguous()  # (d, N) float32


class ElasticServer:
    """The elastic schedule behind one worker, for any task: calibrated t_k per level and batch
    size, and the schedule's online state (per-batch overhead o, correction c, recent batches for
    age and arrival-rate estimates). A task subclass loads its model, then calls ``_ready()``,
    and implements ``levels``, ``_prepare``, ``_run``, ``_answers`` and ``_calibration_items``.

    Args:
        settings: handler settings.
        max_batch: TorchServe batchSize of this model.
        queue: the queue signal: ``queue_size`` attribute and ``request()`` (a QueuePoller in
            production; FixedQueue(0) by default).
        max_batch_delay_ms: TorchServe maxBatchDelay (what a request reaching an idle worker waits).

    Raises:
        ValueError: worker_nice without CAP_SYS_NICE, or (in ``_ready``) a pinned level that the
            model does not have (handler.pin_level).
    """

    TASK = "none"  # what describe() reports: "retrieval" or "glue:<task>"
    REQUEST_HINT = "a JSON body"  # what a request should be, for 405 / 415 messages
    LEVELS_FROM = "submap.json"  # where the levels come from, for the pin_level error
    HISTORY = 32  # recent batches kept for the age estimate
    RATE_MIN_SPAN_S = 0.25  # λ over at least this span (schedule.ArrivalRate)
    SPARE_LOW = 0.02  # the least σ that handler.spare_feedback lowers σ to (schedule.SpareFeedback)

    def __init__(self, settings: HandlerSettings, max_batch: int = 1, queue=None, max_batch_delay_ms: float = 0.0):
        self.settings = settings
        self.max_batch = max_batch
        self.max_batch_delay_ms = max_batch_delay_ms
        self.queue = queue if queue is not None else FixedQueue(0)
        if settings.worker_nice:
            try:
                os.nice(settings.worker_nice)
            except OSError as e:
                raise ValueError(f"handler.worker_nice: {settings.worker_nice} needs CAP_SYS_NICE ({e}); set it to 0 "
                                 "or grant the capability") from None
        torch.set_num_threads(settings.torch_threads)
        torch.backends.mkldnn.enabled = settings.onednn  # handler.onednn: MKL's sgemm unless asked

    def _ready(self, model_dir: str | Path) -> None:
        """Check the pinned level, calibrate t_k (or reuse the one stored for this model, machine
        and thread count, then re-measure it while idle) and start the schedule's state (after
        the model is loaded)."""
        s = self.settings
        if s.pin_level is not None and s.pin_level not in self.levels:
            raise ValueError(f"handler.pin_level: {s.pin_level} is not a level of {self.LEVELS_FROM} {self.levels}")
        self._model_dir = Path(model_dir)
        self.remeasured = 0  # background re-measurements of a stored calibration that replaced it
        key = stored = None
        if s.calibration_cache:
            key = calibration_store.calibration_key(model_dir, self.TASK, self.levels, self._batch_sizes(),
                                                    s.torch_threads, s.packed_levels)
            stored = calibration_store.load(model_dir, key)
        if stored is not None:
            self.calibration, self.calibration_source = stored, "stored"
        else:
            self.calibration, self.calibration_source = self.calibrate(), "measured"
            if key is not None:
                calibration_store.save(model_dir, key, self.calibration)
        self.overhead_ms = 0.0  # o: per-batch cost outside the handler, EWMA (see elastic/schedule.py)
        self._overhead_weight = 0.0  # the EWMA's total weight so far, 1 - (1 - OVERHEAD_EWMA)^gaps
        # c: observed / predicted time over all levels; c_k per level (a level with fewer than
        # LEVEL_MIN_BATCHES batches borrows the all-level c); ratios older than CORRECTION_MAX_AGE_S
        # leave both windows, so a level held off by a stall's ratios comes back
        def window() -> LatencyCorrection:
            return LatencyCorrection(quantile=s.deadline_quantile, max_age_s=self.CORRECTION_MAX_AGE_S)

        self.correction = window()
        self.level_correction = {k: window() for k in self.levels}
        # c_k over the level's large batches alone (more than LARGE_SHARE of batchSize): the tail
        # a large batch at hand budgets for (handler.large_batch_tail)
        self.large_correction = {k: window() for k in self.levels}
        self.history: deque[tuple[float, int, int]] = deque(maxlen=self.HISTORY)  # (start, g, b)
        self.arrivals = ArrivalRate(s.rate_window_s, min(self.RATE_MIN_SPAN_S, s.rate_window_s))  # λ
        self.counters = {"batches": 0, "served": 0, "shed": 0, "shed_standing": 0, "bad_request": 0,
                         "request_start_used": 0, "request_start_ignored": 0}
        # batches held below the largest level, by the bound that held them ("standing": drained)
        self.limited_by = dict.fromkeys(BOUNDS, 0)
        self.standing = StandingQueue()  # how long the frontend's queue has stood (schedule.py, point 4)
        self.spare = self.spare_feedback(s)  # σ of the spare bound, learned (schedule.py, point 5)
        self.telemetry = Telemetry(self.levels)  # summed per flush interval into Prometheus metrics (the handler)
        self._last_end: float | None = None  # perf_counter seconds
        self._last_waiting = False
        self._in_batch = False
        self._ready_at = time.perf_counter()
        GC_PAUSES.start()  # describe() reports the collector's pauses
        self.gc_frozen = freeze_heap() if s.gc_freeze else 0  # after everything the worker keeps is loaded
        if stored is not None:  # started last: it reads the state above
            threading.Thread(target=self._remeasure_when_idle, args=(key,), name="recalibration", daemon=True).start()

    @classmethod
    def spare_feedback(cls, s: HandlerSettings) -> SpareFeedback | None:
        """The learned σ that the serving core keeps for these settings, or None where σ stays
        fixed (handler.spare_feedback off, or min_spare 0: the bound off). σ starts at min_spare
        and never rises above it: the feedback only gives back what a fixed σ holds in reserve,
        and after misses it returns to that σ; it falls no lower than SPARE_LOW."""
        if not (s.spare_feedback and s.min_spare > 0):
            return None
        return SpareFeedback(s.min_spare, low=min(cls.SPARE_LOW, s.min_spare), high=s.min_spare,
                             miss_budget=s.miss_budget)

    # --- the task's hooks -------------------------------------------------------------------------
    @property
    def levels(self) -> list[int]:
        """Preserving levels in percent, largest first."""
        raise NotImplementedError

    def _prepare(self, bodies: list[Any]) -> list[Any]:
        """Per body, the item the model takes (e.g. token ids), or a 400 ``Result`` naming what
        was wrong with that request alone."""
        raise NotImplementedError

    def _run(self, items: list[Any], level: int) -> Any:
        """The model on ``items`` at ``level``: the time the schedule predicts as t_k."""
        raise NotImplementedError

    def _answers(self, items: list[Any], outputs: Any) -> list[dict]:
        """One JSON-able payload per item from ``_run``'s outputs."""
        raise NotImplementedError

    def _calibration_items(self, b: int) -> list[Any]:
        """``b`` typical items, timed per level and batch size by ``calibrate``."""
        raise NotImplementedError

    # --- the schedule -------------------------------------------------------------------------------
    def _batch_sizes(self) -> tuple[int, ...]:
        sizes = {1, self.max_batch}
        b = 2
        while b < self.max_batch:
            sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))

    def calibrate(self) -> Calibration:
        """Median milliseconds of the task's model path (``_run``) per level and batch size, on
        typical items (paper §4.3: t_k is measured, not assumed).

        The cells are timed in rounds, each round once through every (level, batch size), so a
        noisy stretch of this shared machine falls on all cells alike instead of on the few timed
        while it lasted; the medians are then made non-decreasing in level and batch size
        (``monotone_calibration``)."""
        return self._time_cells(self._timed_run)

    def _timed_run(self, items: list[Any], level: int) -> float:
        """Milliseconds of one ``_run``."""
        t0 = time.perf_counter()
        self._run(items, level)
        return (time.perf_counter() - t0) * 1000

    def _time_cells(self, timed) -> Calibration:
        """``calibrate``'s rounds with ``timed(items, level) -> ms`` as the timer: 3 warm-up runs
        per cell, then calibration_repeats rounds through every cell; medians, made monotone."""
        return monotone_calibration(*self._median_cells(timed))

    def _median_cells(self, timed) -> tuple[tuple[int, ...], dict[int, tuple[float, ...]]]:
        """(batch sizes, level -> median ms per batch size) of ``_time_cells``' rounds, as measured."""
        sizes = self._batch_sizes()
        items = {b: self._calibration_items(b) for b in sizes}
        cells = [(level, b) for level in self.levels for b in sizes]
        for level, b in cells:
            for _ in range(3):
                timed(items[b], level)  # warm-up
        runs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
        for _ in range(self.settings.calibration_repeats):
            for level, b in cells:
                runs[(level, b)].append(timed(items[b], level))
        return sizes, {level: tuple(statistics.median(runs[(level, b)]) for b in sizes) for level in self.levels}

    IDLE_S = 1.0  # a stored calibration is re-measured only after this long without a batch
    CLEAN_RUN = 0.9  # a re-measured run counts only if this thread had the CPU for this share of its wall time

    def _idle(self) -> bool:
        last = self._last_end if self._last_end is not None else self._ready_at
        return not self._in_batch and time.perf_counter() - last >= self.IDLE_S

    def _timed_run_when_idle(self, items: list[Any], level: int) -> float:
        """Milliseconds of one ``_run`` that started while the worker was idle, overlapped no
        batch and had the CPU for CLEAN_RUN of its time; other runs are repeated a second later."""
        while True:
            while not self._idle():
                time.sleep(0.2)
            before = self.counters["batches"]
            t0, cpu0 = time.perf_counter(), time.thread_time()
            self._run(items, level)
            ms = (time.perf_counter() - t0) * 1000
            cpu_ms = (time.thread_time() - cpu0) * 1000
            if self.counters["batches"] == before and not self._in_batch and cpu_ms >= self.CLEAN_RUN * ms:
                return ms
            time.sleep(1.0)  # the core was busy (this worker's batch, another worker, another tenant)

    def _remeasure_when_idle(self, key: dict) -> None:
        """Re-time every (level, batch size) cell as ``calibrate`` does, one run at a time and
        only while the worker is idle (``_timed_run_when_idle``). When every cell has its
        repeats, the new calibration replaces the stored one (here and on disk). A batch that
        arrives during a run shares the CPU with that one run (<= t_k(b_max) of the largest level)."""
        self.calibration = self._time_cells(self._timed_run_when_idle)
        self.remeasured += 1
        calibration_store.save(self._model_dir, key, self.calibration)
        log.info("stored calibration re-measured while idle: %s", self.calibration.ms)

    LEVEL_MIN_BATCHES = 20  # batches a level's own correction needs before it replaces the all-level one
    CORRECTION_MAX_AGE_S = 10.0  # seconds an observed / predicted ratio counts in c and c_k

    LARGE_SHARE = 0.5  # a batch of more than this share of batchSize is large

    def _large(self, b: int) -> bool:
        """Whether a batch of ``b`` requests is large (handler.large_batch_tail)."""
        return self.max_batch >= 2 and b > self.LARGE_SHARE * self.max_batch

    def _corrections(self, now_s: float, b: int) -> tuple[dict[int, float], dict[int, float]]:
        """(c_k, c̄_k) per level for plan_batch at ``now_s`` (perf_counter seconds) for a batch of
        ``b`` requests: the level's own ratio once it has LEVEL_MIN_BATCHES batches of the last
        CORRECTION_MAX_AGE_S in its window, else the ratio over all levels carried to this level
        as an additive excess (``transfer_correction``, at the window's mean batch size; 1 when no
        batch ran in that time); for a large batch, c_k no lower than the tail of the level's
        large batches (elastic/schedule.py, point 2)."""
        self.correction.expire(now_s)
        for own in self.level_correction.values():
            own.expire(now_s)
        large = None
        if self.settings.large_batch_tail and self._large(b):
            large = self.large_correction
            for own in large.values():
                own.expire(now_s)
        return level_corrections(self.correction, self.level_correction, self.calibration, self.LEVEL_MIN_BATCHES,
                                 large)

    OVERHEAD_EWMA = 0.05  # weight of the newest gap
    OVERHEAD_CAP_MS = 100.0  # a longer gap is not overhead (e.g. a GC pause): ignored

    def _observe_gap(self, start: float) -> None:
        """Update o from the gap since the previous batch ended, if requests were waiting then
        (the worker was not idle: the gap is frontend and IPC time).

        o is the exponentially weighted mean of the gaps seen so far, bias-corrected as Adam's
        moments are (Kingma & Ba 2015, §3): the newest gap weighs OVERHEAD_EWMA of the total
        weight 1 - (1 - OVERHEAD_EWMA)^n after n gaps, so the first gap sets o and the tenth
        counts as much as an EWMA started at the mean. An EWMA started at 0 would take about 60
        busy batches (1 / OVERHEAD_EWMA · 3) to reach 95 % of o, and a rush's first seconds would
        budget nearly nothing for the frontend and IPC."""
        if self._last_end is not None and self._last_waiting:
            gap = (start - self._last_end) * 1000
            if gap < self.OVERHEAD_CAP_MS:
                self._overhead_weight += self.OVERHEAD_EWMA * (1 - self._overhead_weight)
                self.overhead_ms += self.OVERHEAD_EWMA / self._overhead_weight * (gap - self.overhead_ms)

    def _ages_ms(self, request_starts: list[str | None], now_mono: float,
                 now_epoch: float) -> tuple[list[float], list[bool]]:
        """Each request's age, and whether it was read from its start header (where valid; else
        it is the FIFO estimate)."""
        s = self.settings
        estimate = None
        ages, read = [], []
        for value in request_starts:
            age = parse_request_start(value, now_epoch, s.request_start_max_age_ms)
            read.append(age is not None)
            if age is None:
                if value is not None:
                    self.counters["request_start_ignored"] += 1
                if estimate is None:
                    estimate = estimate_age_ms(now_mono, self.history, self.max_batch_delay_ms + self.overhead_ms,
                                               self._last_end, len(request_starts))
                age = estimate
            else:
                self.counters["request_start_used"] += 1
            ages.append(age)
        return ages, read

    def handle_batch(self, bodies: list[Any], request_starts: list[str | None] | None = None) -> list[Result]:
        """Answer every request of a batch; a bad one gets a 400 Result, a shed one a 503 with
        Retry-After, and the others go on.

        Args:
            bodies: request bodies (the task's ``_prepare`` reads them); a ``Result`` in their
                place is that request's answer already (e.g. ``http_refusal``'s 405 / 415).
            request_starts: per request, the value of the request-start header, or None.

        Each good answer: the task's payload plus "level" (k in percent) and "queue_size" (g seen
        when the level was chosen), with a ``Server-Timing`` header ``wait;dur=<ms>,
        model;dur=<ms>, handler;dur=<ms>`` (W3C Server Timing, milliseconds): the request's age
        when the batch began (from its start header, else estimated), the batch's model path, and
        the handler up to the answer.
        """
        start, now_epoch = time.perf_counter(), time.time()
        self._in_batch = True
        self._observe_gap(start)
        n = len(bodies)
        request_starts = request_starts or [None] * n
        # g: a partly filled batch left an empty frontend queue behind; a full one leaves what the
        # poll after the previous full batch saw, less this batch
        full = n >= self.max_batch
        if not full:
            self.queue.queue_size = 0
        g = max(0, int(self.queue.queue_size) - n) if full else 0
        results: list[Result | None] = [b if isinstance(b, Result) else None for b in bodies]  # refused by the adapter
        todo = [i for i in range(n) if results[i] is None]
        items, where = [], []
        prepared = self._prepare([bodies[i] for i in todo]) if todo else []  # one tokenizer call per batch
        for i, p in zip(todo, prepared):
            if isinstance(p, Result):
                results[i] = p
            else:
                items.append(p)
                where.append(i)
        self.counters["bad_request"] += n - len(items)
        level, served, shed, past_T, predicted, model_ms, limited = None, 0, 0, 0, 0.0, 0.0, ()
        if items:
            s = self.settings
            ages, read = self._ages_ms([request_starts[i] for i in where], start, now_epoch)  # at the batch's start
            c, cm = self._corrections(start, len(items))
            spent = (time.perf_counter() - start) * 1000  # this batch's handler time so far (parsing, tokenizing)
            standing = self.standing.observe(start, youngest_age_ms(ages, read) + spent,
                                             s.standing_target * s.latency_constraint_ms)
            plan = plan_batch([a + spent for a in ages], g, s.latency_constraint_ms, self.calibration,
                              self.max_batch, self.overhead_ms, c, s.schedule, s.late_requests, s.pin_level,
                              self.arrivals.rate(start, n), s.max_utilization, cm,
                              self.spare.sigma if self.spare else s.min_spare, s.return_share,
                              s.spare_from, standing, s.standing_interval_ms)
            keep = [k for k, ok in enumerate(plan.serve) if ok]
            limited = plan.limited_by
            for name in limited:
                self.limited_by[name] += 1
            for k, ok in enumerate(plan.serve):
                if not ok:
                    results[where[k]] = Result(503, {"error": f"shed: cannot be answered within T = "
                                                              f"{s.latency_constraint_ms:g} ms"},
                                               {"Retry-After": str(s.retry_after_s)})
            shed = len(where) - len(keep)
            self.counters["shed"] += shed
            if plan.limited_by == ("standing",):
                self.counters["shed_standing"] += shed
            if keep:
                kept = [items[k] for k in keep]
                t0 = time.perf_counter()
                outputs = self._run(kept, plan.level)
                t1 = time.perf_counter()
                model_ms = (t1 - t0) * 1000
                predicted = self.calibration.t(plan.level, len(keep))
                self.correction.observe(predicted, model_ms, t1, len(keep))
                self.level_correction[plan.level].observe(predicted, model_ms, t1, len(keep))
                if self._large(len(keep)):
                    self.large_correction[plan.level].observe(predicted, model_ms, t1, len(keep))
                # W3C Server-Timing: the request's age when its batch began (the schedule's input),
                # what the batch spent in the model and in the whole handler so far, so a client
                # can tell waiting, the model and the serving stack apart
                timing = f"model;dur={model_ms:.3f}, handler;dur={(t1 - start) * 1000:.3f}"
                for k, payload in zip(keep, self._answers(kept, outputs)):
                    results[where[k]] = Result(200, {**payload, "level": plan.level, "queue_size": g},
                                               {"Server-Timing": f"wait;dur={ages[k]:.3f}, {timing}"})
                self.counters["served"] += len(keep)
                level, served = plan.level, len(keep)
                done_ms = (time.perf_counter() - start) * 1000  # each answer's age when it leaves: its age + this
                past_T = sum(ages[k] + done_ms > s.latency_constraint_ms for k in keep)
            if self.spare is not None:  # the misses, and whether the level got in only through a σ below min_spare
                self.telemetry.record_spare(self.spare.observe(start, len(items), shed + past_T,
                                                               self.spare.loosened_by(plan.spare_slack)))
        self.telemetry.record_batch(level, served, shed, n - len(items), past_T, g, predicted, model_ms, limited)
        self.counters["batches"] += 1
        self.history.append((start, g, n))
        self.arrivals.observe(start, n)
        if full:
            self.queue.request()  # the next batch reads a g polled while this one was answered
        self._last_end, self._last_waiting, self._in_batch = time.perf_counter(), full, False
        return results  # type: ignore[return-value]

    def describe(self) -> dict:
        """Levels, T and the calibrated t_k table (GET /models/{name}?customized=true)."""
        c = self.calibration
        return {
            "latency_constraint_ms": self.settings.latency_constraint_ms,
            "task": self.TASK,
            "levels": self.levels,
            "batch_sizes": list(c.batch_sizes),
            "processing_ms": {str(k): [round(t, 3) for t in v] for k, v in c.ms.items()},
            "calibration": self.calibration_source,
            "calibration_remeasured": self.remeasured,
            "onednn": bool(torch.backends.mkldnn.enabled),  # the matrix products' library (handler.onednn)
            "overhead_ms": round(self.overhead_ms, 3),
            "schedule": self.settings.schedule,
            "late_requests": self.settings.late_requests,
            "pin_level": self.settings.pin_level,
            "max_batch": self.max_batch,
            "max_batch_delay_ms": self.max_batch_delay_ms,
            "correction": round(self.correction.value, 3),
            "mean_correction": round(self.correction.mean, 3),
            "level_corrections": {str(k): {"c": round(lc.value, 3), "mean": round(lc.mean, 3), "batches": lc.count}
                                  for k, lc in self.level_correction.items()},
            "large_batch_tail": self.settings.large_batch_tail,
            "large_batch_corrections": {str(k): {"c": round(lc.value, 3), "batches": lc.count}
                                        for k, lc in self.large_correction.items()},
            "max_utilization": self.settings.max_utilization,
            "min_spare": self.settings.min_spare,
            "spare_feedback": ({"sigma": round(self.spare.sigma, 4), "tightened": self.spare.tightened,
                                "loosened": self.spare.loosened} if self.spare else None),
            "spare_from": self.settings.spare_from,
            "rate_window_s": self.settings.rate_window_s,
            "arrival_rate_rps": round(self.arrivals.rate(time.perf_counter(), 0), 1),  # λ now, req/s
            "return_share": self.settings.return_share,
            "standing_target": self.settings.standing_target,
            "standing_interval_ms": self.settings.standing_interval_ms,
            "queue_polls": self.queue.polls,
            "counters": dict(self.counters),
            "limited_by": dict(self.limited_by),
            "gc_frozen_objects": self.gc_frozen,
            "gc_pauses": GC_PAUSES.summary(),
        }


def load_index(d: Path, hidden_size: int):
    """(FAISS index, pids) of a model directory's index.faiss and pids.txt.

    Raises:
        FileNotFoundError: a file is missing; ValueError: they disagree with each other or with
            the encoder's hidden size.
    """
    import faiss

    for f in ("index.faiss", "pids.txt"):
        if not (d / f).exists():
            raise FileNotFoundError(f"{d}: {f} is missing")
    index = faiss.read_index(str(d / "index.faiss"))
    pids = (d / "pids.txt").read_text().split()
    if index.ntotal != len(pids):
        raise ValueError(f"index.faiss has {index.ntotal} vectors but pids.txt has {len(pids)} pids")
    if index.d != hidden_size:
        raise ValueError(f"index.faiss has dimension {index.d}, config.json hidden_size is {hidden_size}")
    return index, pids


def load_passage_search(d: Path, hidden_size: int):
    """(FAISS index or None, (d, N) matrix or None, pids) for ``dense_search``: a flat
    inner-product index becomes the matrix (``flat_ip_matrix``) and the index is dropped, so its
    vectors are in memory once; any other index is kept for FAISS's own search.

    Raises:
        as ``load_index``.
    """
    index, pids = load_index(d, hidden_size)
    matrix = flat_ip_matrix(index)
    return (None if matrix is not None else index), matrix, pids


def dense_search(encoder: ElasticEncoder, index, matrix: torch.Tensor | None, ids: list[list[int]], level: int,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, k) scores and index rows of already tokenized queries encoded at ``level``: one sgemm
    over ``matrix``, (d, N) (``flat_ip_matrix``), when given, else ``index``'s FAISS search."""
    batch = encoder.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    with torch.inference_mode():
        q = encoder.embed(batch, level, query=True)  # (B, d), through the level's query head if any
        if matrix is not None:  # exact inner product: the same top-k as IndexFlatIP.search
            top = torch.topk(q @ matrix, min(k, matrix.shape[1]), dim=1)  # (B, N) scores -> (B, k)
            return top.values.numpy(), top.indices.numpy()
    return index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)


class ElasticRetriever(ElasticServer):
    """ElasticDenser behind one worker: the elastic query encoder and the FAISS index of passages
    encoded by the largest SubLM. A request is {"query": ...} (see ``parse_query``); an answer
    {"results": [{"pid", "score"} x top_k], "truncated", "level", "queue_size"} ("truncated":
    the query was cut to query_max_length tokens, see ``long_queries``).

    Args:
        model_dir: holds config.json, model.safetensors, submap.json, tokenizer files,
            index.faiss and pids.txt.
        settings, max_batch, queue, max_batch_delay_ms: see ElasticServer.

    Raises:
        ValueError / FileNotFoundError: files missing or not matching each other, or a pinned
            level that the submap does not have (handler.pin_level).
    """

    TASK = "retrieval"
    REQUEST_HINT = 'a JSON body {"query": "..."}'

    def __init__(self, model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue=None,
                 max_batch_delay_ms: float = 0.0):
        import faiss

        super().__init__(settings, max_batch, queue, max_batch_delay_ms)
        d = Path(model_dir)
        faiss.omp_set_num_threads(settings.torch_threads)
        self.encoder = ElasticEncoder(d, query_heads=settings.query_heads, packed=settings.packed_levels)
        self.index, self._matrix, self.pids = load_passage_search(d, self.encoder.dims.hidden_size)
        self._ready(d)

    @property
    def levels(self) -> list[int]:
        return self.encoder.levels

    def describe(self) -> dict:
        """The base description, plus whether queries go through per-level query heads
        (elastic/query_head.py) and the bytes that handler.packed_levels adds (0 when off)."""
        return {**super().describe(), "query_heads": self.encoder.query_heads is not None,
                "packed_bytes": self.encoder.packed_bytes}

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, untruncated (their lengths decide over-long queries)."""
        return self.encoder.tokenizer(texts, truncation=False)["input_ids"]

    def _search(self, ids: list[list[int]], level: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, top_k) scores and index rows for already tokenized queries, at ``level``."""
        return dense_search(self.encoder, self.index, self._matrix, ids, level, self.settings.top_k)

    def _prepare(self, bodies: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(bodies)
        texts, at = [], []
        for i, body in enumerate(bodies):
            try:
                texts.append(parse_query(body))
                at.append(i)
            except BadRequest as e:
                out[i] = Result(400, {"error": str(e)})
        limit = self.settings.query_max_length
        for i, text, tok in zip(at, texts, self._token_ids(texts) if texts else []):
            if len(tok) <= limit:
                out[i] = (tok, False)
            elif self.settings.long_queries == "refuse":
                out[i] = Result(400, {"error": f"query has {len(tok)} tokens, the limit is {limit} "
                                               "(handler.long_queries: refuse)"})
            else:  # the tokenizer's own truncation, as offline evaluation encodes queries
                out[i] = (self.encoder.tokenizer(text, truncation=True, max_length=limit)["input_ids"], True)
        return out

    def _run(self, items: list[tuple[list[int], bool]], level: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search([ids for ids, _ in items], level)

    def _answers(self, items: list[tuple[list[int], bool]], outputs: tuple[np.ndarray, np.ndarray]) -> list[dict]:
        scores, idx = outputs
        return [{"results": [{"pid": self.pids[j], "score": round(float(v), 6)} for j, v in zip(irow, srow) if j >= 0],
                 "truncated": cut}
                for srow, irow, (_, cut) in zip(scores, idx, items)]

    def _calibration_items(self, b: int) -> list[tuple[list[int], bool]]:
        return [(ids, False) for ids in self._token_ids([CALIBRATION_QUERY] * b)]


CALIBRATION_PAIR = ("A man with a hard hat is dancing on the stage in front of a small crowd.",
                    "A man wearing a hard hat is dancing.")  # a typical GLUE pair (~30 tokens together)


def parse_pair(body: Any, needs_pair: bool) -> tuple[str, str | None]:
    """(text, text_pair) of one classification request: a JSON object {"text": ..., "text_pair": ...}
    (decoded, or as bytes); text_pair is required for sentence-pair tasks and refused otherwise.

    Raises:
        BadRequest: not a JSON object, a missing / non-string / empty field, a text_pair for a
            single-sentence task, or more than MAX_QUERY_CHARS characters in a field.
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest('request body must be a JSON object {"text": ...' +
                             (', "text_pair": ...}' if needs_pair else "}")) from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    names = ("text", "text_pair") if needs_pair else ("text",)
    if not needs_pair and "text_pair" in body:
        raise BadRequest("this task takes one sentence: drop text_pair")
    out = []
    for name in names:
        v = body.get(name)
        if not isinstance(v, str) or not v.strip():
            raise BadRequest(f'"{name}" must be a non-empty string')
        if len(v) > MAX_QUERY_CHARS:
            raise BadRequest(f'"{name}" has {len(v)} characters, the limit is {MAX_QUERY_CHARS}')
        out.append(v.strip())
    return out[0], (out[1] if needs_pair else None)


class ElasticClassifierServer(ElasticServer):
    """ElasticLM fine-tuned on a GLUE task behind one worker (the same schedule as retrieval).

    A request is {"text": ...} (SST-2) or {"text": ..., "text_pair": ...} (MRPC, STS-B, RTE); an
    answer {"label": name, "probabilities": {name: p}} or, for STS-B, {"score": s}, plus
    "truncated" (the input was cut to the task's max_length tokens), "level" and "queue_size".

    Args:
        model_dir: an ElasticLM GLUE model directory (config.json with finetuning_task,
            model.safetensors, submap.json, tokenizer), as training/glue.py writes.
        settings, max_batch, queue, max_batch_delay_ms: see ElasticServer.

    Raises:
        ValueError: config.json names no GLUE task (finetuning_task) or an unknown one, or a
            pinned level the model does not have.
    """

    def __init__(self, model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue=None,
                 max_batch_delay_ms: float = 0.0):
        from elastic.classifier import GlueModel
        from elastic.glue import get_task

        super().__init__(settings, max_batch, queue, max_batch_delay_ms)
        d = Path(model_dir)
        name = json.loads((d / "config.json").read_text()).get("finetuning_task")
        if name is None:
            raise ValueError(f"{d}/config.json: finetuning_task is missing (not a GLUE model from training/glue.py)")
        self.task = get_task(name)
        self.TASK = f"glue:{self.task.name}"
        self.REQUEST_HINT = 'a JSON body {"text": "..."' + (', "text_pair": "..."}' if self.task.text_b else "}")
        self.model = GlueModel(d, self.task)
        self._ready(d)

    @property
    def levels(self) -> list[int]:
        return self.model.levels

    def _prepare(self, bodies: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(bodies)
        a, b, at = [], [], []
        pair = self.task.text_b is not None
        for i, body in enumerate(bodies):
            try:
                x, y = parse_pair(body, pair)
                a.append(x)
                b.append(y)
                at.append(i)
            except BadRequest as e:
                out[i] = Result(400, {"error": str(e)})
        if at:
            keys = ("input_ids", "attention_mask", "token_type_ids")
            enc = self.model.tokenizer(a, b if pair else None, truncation=False)  # one call per batch
            long = [j for j in range(len(at)) if len(enc["input_ids"][j]) > self.task.max_length]
            cut = self.model.tokenize([a[j] for j in long], [b[j] for j in long] if pair else None) if long else None
            row_in_cut = {j: r for r, j in enumerate(long)}  # over-long requests: their truncated encoding
            for j, i in enumerate(at):
                src, row = (cut, row_in_cut[j]) if j in row_in_cut else (enc, j)
                out[i] = ({k: src[k][row] for k in keys if k in src}, j in row_in_cut)
        return out

    def _run(self, items: list[tuple[dict, bool]], level: int) -> torch.Tensor:
        batch = dict(self.model.tokenizer.pad([f for f, _ in items], return_tensors="pt"))
        with torch.inference_mode():
            return self.model.logits(batch, level)  # (B, num_labels)

    def _answers(self, items: list[tuple[dict, bool]], outputs: torch.Tensor) -> list[dict]:
        t = self.task
        if t.regression:
            return [{"score": round(float(row[0]), 4), "truncated": cut} for row, (_, cut) in zip(outputs, items)]
        probs = torch.softmax(outputs.float(), -1)
        return [{"label": t.class_names[int(p.argmax())],
                 "probabilities": {n: round(float(v), 6) for n, v in zip(t.class_names, p)}, "truncated": cut}
                for p, (_, cut) in zip(probs, items)]

    def _calibration_items(self, b: int) -> list[tuple[dict, bool]]:
        body = {"text": CALIBRATION_PAIR[0]}
        if self.task.text_b is not None:
            body["text_pair"] = CALIBRATION_PAIR[1]
        return [p for p in self._prepare([body] * b)]


CALIBRATION_PASSAGE = ("The average processing time of a web search query is the time a search engine takes to "
                       "retrieve, score and rank the documents that match it, usually a fraction of a second, "
                       "measured from the moment the query arrives until the results page is returned.")


def parse_rerank(body: Any, max_passages: int) -> tuple[str, list[str], list[str]]:
    """(query, pids, passage texts) of one rerank request: a JSON object
    {"query": "...", "passages": [{"pid": "...", "text": "..."}, ...]} (decoded, or as bytes).

    Raises:
        BadRequest: not a JSON object; a bad query (as ``parse_query``); "passages" missing, not a
            list, empty or longer than ``max_passages``; a passage that is not an object, whose
            "pid" is not a string or integer, repeats an earlier pid, or whose "text" is not a
            non-empty string of at most MAX_QUERY_CHARS characters (the message names its index).
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest('request body must be a JSON object {"query": ..., "passages": [{"pid": ..., '
                             '"text": ...}, ...]}') from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    query = parse_query(body)
    passages = body.get("passages")
    if not isinstance(passages, list) or not passages:
        raise BadRequest('"passages" must be a non-empty list of {"pid": ..., "text": ...}')
    if len(passages) > max_passages:
        raise BadRequest(f'"passages" has {len(passages)} entries, the limit is {max_passages} (handler.max_passages)')
    pids, texts, seen = [], [], set()
    for i, p in enumerate(passages):
        if not isinstance(p, dict):
            raise BadRequest(f"passages[{i}] must be an object {{\"pid\": ..., \"text\": ...}}")
        pid, text = p.get("pid"), p.get("text")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise BadRequest(f'passages[{i}].pid must be a string or an integer')
        if str(pid) in seen:
            raise BadRequest(f"passages[{i}].pid {str(pid)!r} repeats an earlier pid")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(f"passages[{i}].text must be a non-empty string")
        if len(text) > MAX_QUERY_CHARS:
            raise BadRequest(f"passages[{i}].text has {len(text)} characters, the limit is {MAX_QUERY_CHARS}")
        seen.add(str(pid))
        pids.append(str(pid))
        texts.append(text.strip())
    return query, pids, texts


class ElasticRankerServer(ElasticServer):
    """ElasticRanker behind one worker (the same schedule as retrieval): a cross-encoder scoring
    each (query, passage) pair (paper eq. 11).

    A request is {"query": ..., "passages": [{"pid": ..., "text": ...}, ...]} (at most
    ``max_passages``); an answer {"results": [{"pid", "score"}, ...] (every passage, best first),
    "truncated": pairs cut to ``pair_max_length`` tokens, "level", "queue_size"}. t_k is
    calibrated per batch of requests of ``max_passages`` typical pairs each, so a shorter list
    is predicted conservatively.

    Args:
        model_dir: an ElasticRanker model directory (config.json with finetuning_task "rerank",
            model.safetensors, submap.json, tokenizer), as training/ranker.py writes; a user's
            one-label BertForSequenceClassification cross-encoder serves as one level, 100.
        settings, max_batch, queue, max_batch_delay_ms: see ElasticServer.

    Raises:
        ValueError: the checkpoint is not a one-output cross-encoder, or a pinned level the
            model does not have.
    """

    TASK = "rerank"
    REQUEST_HINT = 'a JSON body {"query": "...", "passages": [{"pid": "...", "text": "..."}, ...]}'

    def __init__(self, model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue=None,
                 max_batch_delay_ms: float = 0.0):
        from elastic.ranker import CrossEncoder

        super().__init__(settings, max_batch, queue, max_batch_delay_ms)
        d = Path(model_dir)
        self.model = CrossEncoder(d, settings.pair_max_length)
        self._ready(d)

    @property
    def levels(self) -> list[int]:
        return self.model.levels

    def _prepare(self, bodies: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(bodies)
        for i, body in enumerate(bodies):
            try:
                query, pids, texts = parse_rerank(body, self.settings.max_passages)
            except BadRequest as e:
                out[i] = Result(400, {"error": str(e)})
                continue
            enc = self.model.tokenizer([query] * len(texts), texts, truncation=False)
            cut = sum(len(ids) > self.settings.pair_max_length for ids in enc["input_ids"])
            if cut:
                enc = self.model.tokenizer([query] * len(texts), texts, truncation=self.model.TRUNCATION,
                                           max_length=self.settings.pair_max_length)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            out[i] = ([{k: enc[k][j] for k in keys} for j in range(len(texts))], pids, cut)
        return out

    def _run(self, items: list[tuple[list[dict], list[str], int]], level: int) -> torch.Tensor:
        feats = [f for pairs, _, _ in items for f in pairs]  # every pair of the batch in one forward
        batch = dict(self.model.tokenizer.pad(feats, return_tensors="pt"))
        with torch.inference_mode():
            return self.model.scores(batch, level)  # (pairs,)

    def _answers(self, items: list[tuple[list[dict], list[str], int]], outputs: torch.Tensor) -> list[dict]:
        out, at = [], 0
        for pairs, pids, cut in items:
            scores = outputs[at:at + len(pairs)].tolist()
            at += len(pairs)
            ranked = sorted(zip(pids, scores), key=lambda t: -t[1])
            out.append({"results": [{"pid": pid, "score": round(float(v), 6)} for pid, v in ranked], "truncated": cut})
        return out

    def _calibration_items(self, b: int) -> list[Any]:
        body = {"query": CALIBRATION_QUERY,
                "passages": [{"pid": str(j), "text": CALIBRATION_PASSAGE} for j in range(self.settings.max_passages)]}
        return self._prepare([body] * b)


class ElasticPipelineServer(ElasticRetriever):
    """The elastic two-stage pipeline behind one worker: query -> ElasticDenser top-K ->
    ElasticRanker -> top_k, with one schedule choosing the configuration (denser level, ranker
    level, rerank depth K; K = 0: dense only) per batch (elastic/pipeline.py).

    The configurations and their offline quality come from ``pipeline.json``; each one's t is
    calibrated at load (on the calibration query and the passages the index returns for it) and
    only the quality-time Pareto frontier is kept, numbered by quality: "level" in an answer and
    ``handler.pin_level`` are these numbers, N the best, 1 the cheapest (``describe()`` lists
    them). A request is {"query": ...} as for retrieval; an answer {"results": [{"pid", "score",
    "stage"}] ("rerank": the ranker's score, "dense": the denser's, for candidates past K),
    "configuration": {denser_level, ranker_level, depth}, "truncated", "level", "queue_size"}.

    Args:
        model_dir: holds denser/ (an ElasticDenser model directory), ranker/ (a cross-encoder
            directory), index.faiss + pids.txt (the denser's passage index), passages.tsv.gz
            (pid<TAB>text of every indexed passage) and pipeline.json
            (archive/build_mar.py --pipeline packs them).
        settings, max_batch, queue, max_batch_delay_ms: see ElasticServer.

    Raises:
        FileNotFoundError / ValueError: a file missing or not matching the others (an indexed pid
            without text, a configuration naming a level a model lacks), or a pinned
            configuration that does not exist.
    """

    TASK = "pipeline"
    LEVELS_FROM = "the quality-time frontier of pipeline.json (configurations numbered by quality)"

    def __init__(self, model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue=None,
                 max_batch_delay_ms: float = 0.0):
        import dataclasses

        import faiss

        from elastic.data import read_tsv
        from elastic.pipeline import load_quality_table
        from elastic.ranker import CrossEncoder

        if settings.pin_level is not None:  # a stored frontier need not hold the pinned configuration
            settings = dataclasses.replace(settings, calibration_cache=False)
        ElasticServer.__init__(self, settings, max_batch, queue, max_batch_delay_ms)
        d = Path(model_dir)
        faiss.omp_set_num_threads(settings.torch_threads)
        self.encoder = ElasticEncoder(d / "denser", query_heads=settings.query_heads, packed=settings.packed_levels)
        self.ranker = CrossEncoder(d / "ranker", settings.pair_max_length)
        self.index, self._matrix, self.pids = load_passage_search(d, self.encoder.dims.hidden_size)
        text = read_tsv(d / "passages.tsv.gz")
        missing = [p for p in self.pids if p not in text]
        if missing:
            raise ValueError(f"{d}/passages.tsv.gz: no text for indexed pid {missing[0]!r} ({len(missing)} missing)")
        self.texts = [text[p] for p in self.pids]  # aligned with the index rows
        cands = load_quality_table(d / "pipeline.json", self.encoder.levels, self.ranker.levels, settings.top_k)
        order = sorted(range(len(cands)), key=lambda i: (cands[i].mrr_at_10, -i))  # worst first
        self.configs = {rank + 1: cands[i] for rank, i in enumerate(order)}  # key: quality rank, N = best
        self._ready(d)

    @property
    def levels(self) -> list[int]:
        """Configuration numbers, best first: every candidate until calibrated, then the frontier."""
        if getattr(self, "calibration", None) is not None:
            return sorted(self.calibration.ms, reverse=True)
        return sorted(self.configs, reverse=True)

    def calibrate(self) -> Calibration:
        """t of every candidate configuration (``ElasticServer.calibrate``'s rounds), then only the
        quality-time frontier at batch size 1 (and a pinned configuration) is kept."""
        from elastic.pipeline import frontier

        self.calibration = None
        sizes, ms = self._median_cells(self._timed_run)
        keys = sorted(ms)
        kept = {keys[i] for i in frontier([self.configs[k] for k in keys], [ms[k][0] for k in keys])}
        if self.settings.pin_level is not None:
            kept.add(self.settings.pin_level)
        return monotone_calibration(sizes, {k: ms[k] for k in kept})

    def _run(self, items: list[tuple[list[int], bool]], level: int):
        from elastic.pipeline import merge_reranked

        cfg, top_k = self.configs[level], self.settings.top_k
        ids = [tok for tok, _ in items]
        scores, rows = dense_search(self.encoder, self.index, self._matrix, ids, cfg.denser_level,
                                    max(top_k, cfg.depth))
        if cfg.depth == 0:
            return cfg, [[(int(j), float(v), "dense") for j, v in zip(r[:top_k], sc[:top_k]) if j >= 0]
                         for r, sc in zip(rows, scores)]
        queries = self.encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        heads = [[int(j) for j in r[:cfg.depth] if j >= 0] for r in rows]
        qs = [q for q, h in zip(queries, heads) for _ in h]
        ps = [self.texts[j] for h in heads for j in h]
        with torch.inference_mode():  # every pair of the batch in one forward
            flat = self.ranker.scores(self.ranker.pairs(qs, ps), cfg.ranker_level).tolist()
        out, at = [], 0
        for r, sc, h in zip(rows, scores, heads):
            rerank = dict(zip(h, flat[at:at + len(h)]))
            at += len(h)
            dense = {int(j): float(v) for j, v in zip(r, sc) if j >= 0}
            final = merge_reranked([int(j) for j in r if j >= 0], [rerank[j] for j in h], top_k)
            out.append([(j, rerank[j], "rerank") if j in rerank else (j, dense[j], "dense") for j in final])
        return cfg, out

    def _answers(self, items: list[tuple[list[int], bool]], outputs) -> list[dict]:
        cfg, lists = outputs
        return [{"results": [{"pid": self.pids[j], "score": round(v, 6), "stage": st} for j, v, st in ranked],
                 "configuration": cfg.describe(), "truncated": cut}
                for ranked, (_, cut) in zip(lists, items)]

    def describe(self) -> dict:
        out = super().describe()
        out["configurations"] = {str(k): {**self.configs[k].describe(), "mrr_at_10": self.configs[k].mrr_at_10}
                                 for k in self.levels}
        return out


def server_for(model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue=None,
               max_batch_delay_ms: float = 0.0) -> ElasticServer:
    """The task server of a model directory: the two-stage pipeline when it holds pipeline.json,
    retrieval when it holds index.faiss, reranking when
    its config.json's finetuning_task is "rerank" (training/ranker.py), GLUE classification when
    it names another finetuning_task.

    Raises:
        ValueError: the directory is neither (the message says what each needs).
    """
    d = Path(model_dir)
    if (d / "pipeline.json").exists():
        return ElasticPipelineServer(d, settings, max_batch, queue, max_batch_delay_ms)
    if (d / "index.faiss").exists():
        return ElasticRetriever(d, settings, max_batch, queue, max_batch_delay_ms)
    cfg = d / "config.json"
    from elastic.classifier import config_num_labels

    config = json.loads(cfg.read_text()) if cfg.exists() else {}
    task = config.get("finetuning_task")
    one_label_classifier = ("BertForSequenceClassification" in (config.get("architectures") or [])
                            and config_num_labels(config) == 1)
    if task == "rerank" or (task is None and one_label_classifier):  # ours, or a user's cross-encoder
        return ElasticRankerServer(d, settings, max_batch, queue, max_batch_delay_ms)
    if task is not None:
        return ElasticClassifierServer(d, settings, max_batch, queue, max_batch_delay_ms)
    raise ValueError(f"{d}: neither a retrieval model (index.faiss), a cross-encoder (config.json finetuning_task "
                     "'rerank', or a one-label BertForSequenceClassification) nor a GLUE model (config.json "
                     "finetuning_task)")
