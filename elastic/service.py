"""ElasticDenser serving core, independent of TorchServe: settings, request parsing, the queue
poller, calibration of t_k, and the per-batch path (schedule -> encode -> FAISS search).

handler/elastic_handler.py is a thin TorchServe adapter over ``ElasticRetriever``.
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from elastic.encoder import ElasticEncoder
from elastic.schedule import Calibration, choose_level

log = logging.getLogger(__name__)

ENV_T = "ELASTIC_LATENCY_CONSTRAINT_MS"
ENV_MANAGEMENT = "ELASTIC_MANAGEMENT_ADDRESS"
MAX_QUERY_CHARS = 2000  # refuse before tokenizing anything larger
CALIBRATION_QUERY = "what is the average processing time of a typical web search query"


@dataclass(frozen=True)
class HandlerSettings:
    """Settings under ``handler:`` in model-config.yaml; environment variables override two of them.

    Attributes:
        latency_constraint_ms: T in milliseconds (> 0); env ELASTIC_LATENCY_CONSTRAINT_MS wins.
        management_address: TorchServe management API, polled for the queue size g;
            env ELASTIC_MANAGEMENT_ADDRESS wins.
        query_max_length: longest query in tokens ([CLS] and [SEP] included); longer -> 400.
        top_k: passages returned per query.
        poll_interval_ms: period of the queue-size poll.
        torch_threads: intra-op threads of this worker.
        calibration_repeats: timed runs per (level, batch size) when calibrating t_k.
    """

    latency_constraint_ms: float
    management_address: str = "http://127.0.0.1:8081"
    query_max_length: int = 32
    top_k: int = 10
    poll_interval_ms: float = 5.0
    torch_threads: int = 1
    calibration_repeats: int = 30

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
            typ = {"float": float, "int": int, "str": str}[known[k].type]
            try:
                kw[k] = typ(v)
            except (TypeError, ValueError):
                raise ValueError(f"handler.{k}: expected {known[k].type}, got {v!r}") from None
        s = cls(**kw)
        if not (s.latency_constraint_ms > 0 and math.isfinite(s.latency_constraint_ms)):
            raise ValueError("handler.latency_constraint_ms: must be a positive number of milliseconds, "
                             f"got {raw['latency_constraint_ms']!r}")
        for k in ("query_max_length", "top_k", "torch_threads", "calibration_repeats"):
            if getattr(s, k) < 1:
                raise ValueError(f"handler.{k}: must be >= 1, got {getattr(s, k)}")
        if not s.poll_interval_ms > 0:
            raise ValueError(f"handler.poll_interval_ms: must be > 0, got {s.poll_interval_ms}")
        return s


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


class QueuePoller:
    """Polls ``GET /models/{name}`` on the management API from a daemon thread and keeps the
    latest ``jobQueueStatus.pendingRequests`` (the queue size g), so the per-batch path reads
    an attribute instead of waiting on HTTP. A failed poll keeps the last value and logs once
    per minute. About 0.4 ms per poll on a keep-alive connection (notes/torchserve-0.12.md)."""

    def __init__(self, management_address: str, model_name: str, interval_ms: float):
        u = urlparse(management_address)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"handler.management_address: expected http://host:port, got {management_address!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = f"/models/{model_name}"
        self.interval = interval_ms / 1000
        self.queue_size = 0
        self._last_warning = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="queue-poller", daemon=True)

    def start(self) -> "QueuePoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, conn: http.client.HTTPConnection) -> int:
        conn.request("GET", self.path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {self.path} answered {resp.status}")
        return int(json.loads(body)[0]["jobQueueStatus"]["pendingRequests"])

    def _loop(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=2)
                self.queue_size = self.poll_once(conn)
            except Exception as e:  # keep serving on the last known g
                if conn is not None:
                    conn.close()
                conn = None
                if time.monotonic() - self._last_warning > 60:
                    log.warning("queue-size poll failed (%s); keeping g=%d", e, self.queue_size)
                    self._last_warning = time.monotonic()
            self._stop.wait(self.interval)


@dataclass
class Result:
    """The answer to one request: HTTP status and JSON-able payload."""

    status: int
    payload: dict


class ElasticRetriever:
    """ElasticDenser behind one worker: the elastic query encoder, the FAISS index of passages
    encoded by the largest SubLM, and calibrated t_k per level and batch size.

    Args:
        model_dir: holds config.json, model.safetensors, submap.json, tokenizer files,
            index.faiss and pids.txt.
        settings: handler settings.
        max_batch: TorchServe batchSize of this model.
        queue_size: callable returning the current g (the poller's attribute in production).

    Raises:
        ValueError / FileNotFoundError: files missing or not matching each other.
    """

    def __init__(self, model_dir: str | Path, settings: HandlerSettings, max_batch: int = 1, queue_size=lambda: 0):
        import faiss

        d = Path(model_dir)
        self.settings = settings
        self.max_batch = max_batch
        self.queue_size = queue_size
        torch.set_num_threads(settings.torch_threads)
        faiss.omp_set_num_threads(settings.torch_threads)
        self.encoder = ElasticEncoder(d)
        for f in ("index.faiss", "pids.txt"):
            if not (d / f).exists():
                raise FileNotFoundError(f"{d}: {f} is missing")
        self.index = faiss.read_index(str(d / "index.faiss"))
        self.pids = (d / "pids.txt").read_text().split()
        if self.index.ntotal != len(self.pids):
            raise ValueError(f"index.faiss has {self.index.ntotal} vectors but pids.txt has {len(self.pids)} pids")
        if self.index.d != self.encoder.dims.hidden_size:
            raise ValueError(f"index.faiss has dimension {self.index.d}, config.json hidden_size is "
                             f"{self.encoder.dims.hidden_size}")
        self.calibration = self.calibrate()
        self.overhead_ms = 0.0  # o: per-batch cost outside the handler, EWMA (see elastic/schedule.py)
        self._last_end: float | None = None
        self._last_waiting = False

    def _batch_sizes(self) -> tuple[int, ...]:
        sizes = {1, self.max_batch}
        b = 2
        while b < self.max_batch:
            sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))

    def calibrate(self) -> Calibration:
        """Median milliseconds of the whole per-batch path (tokenize, encode, search) per level
        and batch size, on a typical-length query (paper §4.3: t_k is measured, not assumed)."""
        sizes = self._batch_sizes()
        ms = {}
        for level in self.encoder.levels:
            times = []
            for b in sizes:
                texts = [CALIBRATION_QUERY] * b
                for _ in range(3):
                    self._search(self._token_ids(texts), level)  # warm-up
                runs = []
                for _ in range(self.settings.calibration_repeats):
                    t0 = time.perf_counter()
                    self._search(self._token_ids(texts), level)
                    runs.append((time.perf_counter() - t0) * 1000)
                times.append(statistics.median(runs))
            ms[level] = tuple(times)
        return Calibration(sizes, ms)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, untruncated (their lengths decide over-long queries)."""
        return self.encoder.tokenizer(texts, truncation=False)["input_ids"]

    def _search(self, ids: list[list[int]], level: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, top_k) scores and index rows for already tokenized queries, at ``level``."""
        batch = self.encoder.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        with torch.inference_mode():
            q = self.encoder.embed(batch, level)
        return self.index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), self.settings.top_k)

    OVERHEAD_EWMA = 0.05  # weight of the newest gap
    OVERHEAD_CAP_MS = 100.0  # a longer gap is not overhead (e.g. a GC pause): ignored

    def _observe_gap(self, start: float) -> None:
        """Update o from the gap since the previous batch ended, if requests were waiting then
        (the worker was not idle: the gap is frontend and IPC time)."""
        if self._last_end is not None and self._last_waiting:
            gap = (start - self._last_end) * 1000
            if gap < self.OVERHEAD_CAP_MS:
                self.overhead_ms += self.OVERHEAD_EWMA * (gap - self.overhead_ms)

    def handle_batch(self, bodies: list[Any]) -> list[Result]:
        """Answer every request of a batch; a bad one gets a 400 Result and the others go on.

        Each good answer: {"results": [{"pid", "score"} x top_k], "level": k in percent,
        "queue_size": g seen when the level was chosen}.
        """
        start = time.perf_counter()
        self._observe_gap(start)
        results: list[Result | None] = [None] * len(bodies)
        texts, parsed_at = [], []
        for i, body in enumerate(bodies):
            try:
                texts.append(parse_query(body))
                parsed_at.append(i)
            except BadRequest as e:
                results[i] = Result(400, {"error": str(e)})
        ids, where = [], []
        limit = self.settings.query_max_length
        for i, tok in zip(parsed_at, self._token_ids(texts) if texts else []):  # one tokenizer call per batch
            if len(tok) > limit:
                results[i] = Result(400, {"error": f"query has {len(tok)} tokens, the limit is {limit}"})
            else:
                ids.append(tok)
                where.append(i)
        g = int(self.queue_size())
        if ids:
            level = choose_level(g, self.settings.latency_constraint_ms, self.calibration, min(len(ids), self.max_batch),
                                 self.max_batch, self.overhead_ms)
            scores, idx = self._search(ids, level)
            for i, srow, irow in zip(where, scores, idx):
                hits = [{"pid": self.pids[j], "score": round(float(s), 6)} for j, s in zip(irow, srow) if j >= 0]
                results[i] = Result(200, {"results": hits, "level": level, "queue_size": g})
        self._last_end, self._last_waiting = time.perf_counter(), g > 0
        return results  # type: ignore[return-value]

    def describe(self) -> dict:
        """Levels, T and the calibrated t_k table (GET /models/{name}?customized=true)."""
        c = self.calibration
        return {
            "latency_constraint_ms": self.settings.latency_constraint_ms,
            "levels": self.encoder.levels,
            "batch_sizes": list(c.batch_sizes),
            "processing_ms": {str(k): [round(t, 3) for t in v] for k, v in c.ms.items()},
            "overhead_ms": round(self.overhead_ms, 3),
        }
