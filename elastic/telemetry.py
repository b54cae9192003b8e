"""What the elastic schedule does, as Prometheus metrics: the metric specs, the packed
metrics.yaml that declares them, and a window that sums each batch into them between flushes.

TorchServe-free: the handler turns ``Telemetry.flush()``'s (name, level, value) triples into
``context.metrics`` updates (TorchServe's custom metrics API: each update is a ``[METRICS]`` line
on the worker's stdout, which the frontend parses and, in ``metrics_mode=prometheus``, exports on
the metrics address). Updates are summed per flush interval (one second by default) instead of
sent per batch, so their cost does not grow with the load.

The metrics (ModelName is TorchServe's model name, PreservingLevel the SubLM's level in percent):

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| ElasticRequests | counter | ModelName, PreservingLevel | requests answered 200 at that level |
| ElasticAnswersPastT | counter | ModelName | 200 answers that left the handler more than T after their start |
| ElasticShed | counter | ModelName | requests refused with 503 + Retry-After (cannot make T) |
| ElasticBadRequests | counter | ModelName | requests answered 400 / 405 / 415 |
| ElasticBatches | counter | ModelName, PreservingLevel | batches run at that level |
| ElasticPredictedBatchMs | counter | ModelName, PreservingLevel | sum of calibrated t_k(b) of those batches (ms) |
| ElasticMeasuredBatchMs | counter | ModelName, PreservingLevel | sum of their measured model time (ms) |
| ElasticQueueSize | gauge | ModelName | largest queue size g a batch saw in the last interval (0: none) |
| ElasticLevel | gauge | ModelName | preserving level of the latest batch (percent) |
| ElasticSpareSigma | gauge | ModelName | σ of the spare bound as learned (handler.spare_feedback), in percent |
| ElasticLimitedBatches | counter | ModelName, Bound | batches held below the largest level by that bound |

Bound is one of elastic/schedule.py's ``BOUNDS``: deadline, queue, rate, spare (the bounds that
the next larger level failed; a batch held by two counts under both) or standing (a batch shed
whole to drain a standing queue). Their rates say why the server steps down: mostly "spare" at
moderate load is the spare bound's σ at work, "deadline" the batch's own requests' ages.

rate(ElasticMeasuredBatchMs) / rate(ElasticPredictedBatchMs) per level is the observed / predicted
ratio the schedule corrects t_k by (c̄_k, elastic/schedule.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from elastic.schedule import BOUNDS

log = logging.getLogger(__name__)

MODEL = "ModelName"
LEVEL = "PreservingLevel"
BOUND = "Bound"


@dataclass(frozen=True)
class MetricSpec:
    """One elastic metric: TorchServe metric name, type ("counter" | "gauge"), unit, label names
    (ModelName, then at most one more: PreservingLevel or Bound)."""

    name: str
    type: str
    unit: str
    dimensions: tuple[str, ...]


SPECS = {s.name: s for s in (
    MetricSpec("ElasticRequests", "counter", "Count", (MODEL, LEVEL)),
    MetricSpec("ElasticAnswersPastT", "counter", "Count", (MODEL,)),
    MetricSpec("ElasticShed", "counter", "Count", (MODEL,)),
    MetricSpec("ElasticBadRequests", "counter", "Count", (MODEL,)),
    MetricSpec("ElasticBatches", "counter", "Count", (MODEL, LEVEL)),
    MetricSpec("ElasticPredictedBatchMs", "counter", "Milliseconds", (MODEL, LEVEL)),
    MetricSpec("ElasticMeasuredBatchMs", "counter", "Milliseconds", (MODEL, LEVEL)),
    MetricSpec("ElasticQueueSize", "gauge", "Count", (MODEL,)),
    MetricSpec("ElasticLevel", "gauge", "Percent", (MODEL,)),
    MetricSpec("ElasticSpareSigma", "gauge", "Percent", (MODEL,)),
    MetricSpec("ElasticLimitedBatches", "counter", "Count", (MODEL, BOUND)),
)}


def metrics_yaml() -> dict:
    """The metrics.yaml packed into the .mar: every elastic metric, in TorchServe's metrics
    configuration format (``model_metrics: {counter: [...], gauge: [...]}``)."""
    out: dict[str, list] = {}
    for s in SPECS.values():
        out.setdefault(s.type, []).append({"name": s.name, "unit": s.unit, "dimensions": list(s.dimensions)})
    return {"model_metrics": out}


def load_metrics_yaml(path: str | Path) -> dict[str, MetricSpec]:
    """The elastic metrics a metrics.yaml declares (the others are not emitted).

    Args:
        path: a YAML file in TorchServe's metrics configuration format; its ``model_metrics``
            section lists metrics by type (counter, gauge), each with name, unit, dimensions.

    Returns:
        name -> MetricSpec (the unit as declared there).

    Raises:
        ValueError: the file does not parse, or a field is missing or wrong; the message names
            the file and the field (e.g. ``metrics.yaml: model_metrics.gauge[0].dimensions``).
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path.name}: does not parse: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_metrics"), dict):
        raise ValueError(f"{path.name}: model_metrics: expected a mapping of metric type -> list of metrics")
    out = {}
    for mtype, items in doc["model_metrics"].items():
        where = f"{path.name}: model_metrics.{mtype}"
        if mtype not in ("counter", "gauge"):
            raise ValueError(f"{where}: unknown metric type (elastic metrics are counter or gauge)")
        if not isinstance(items, list):
            raise ValueError(f"{where}: expected a list of metrics")
        for i, m in enumerate(items):
            at = f"{where}[{i}]"
            if not isinstance(m, dict):
                raise ValueError(f"{at}: expected a mapping with name, unit, dimensions")
            for key in ("name", "unit", "dimensions"):
                if key not in m:
                    raise ValueError(f"{at}.{key}: missing")
            spec = SPECS.get(m["name"])
            if spec is None:
                raise ValueError(f"{at}.name: {m['name']!r} is not an elastic metric (known: {sorted(SPECS)})")
            if spec.type != mtype:
                raise ValueError(f"{at}: {spec.name} is a {spec.type}, listed under {mtype}")
            if not isinstance(m["unit"], str) or not m["unit"]:
                raise ValueError(f"{at}.unit: expected a unit name, got {m['unit']!r}")
            if list(m["dimensions"] or []) != list(spec.dimensions):
                raise ValueError(f"{at}.dimensions: {spec.name} has dimensions {list(spec.dimensions)}, "
                                 f"got {m['dimensions']!r}")
            if spec.name in out:
                raise ValueError(f"{at}.name: {spec.name} is listed twice")
            out[spec.name] = MetricSpec(spec.name, spec.type, m["unit"], spec.dimensions)
    return out


class Telemetry:
    """Sums what each batch did until the next flush (thread-safe: batches come from the
    worker's main thread, flushes from a timer).

    Args:
        levels: preserving levels in percent (each per-level counter starts at 0 for each).
    """

    def __init__(self, levels: list[int]):
        self.levels = list(levels)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int | None], float] = {}
        self._max_g = 0
        self._level: int | None = None
        self._sigma: float | None = None  # the spare bound's learned σ (None: not learned)
        self._first = True

    def _add(self, name: str, label: int | str | None, value: float) -> None:
        self._counts[(name, label)] = self._counts.get((name, label), 0.0) + value

    def record_batch(self, level: int | None, served: int, shed: int, bad: int, past_T: int, g: int,
                     predicted_ms: float = 0.0, measured_ms: float = 0.0, limited_by: Sequence[str] = ()) -> None:
        """One batch: its level (None when nothing in it was run), requests served / shed / bad,
        served answers past T, the queue size g it saw, its predicted and measured model time
        (milliseconds), and the bounds that held it below the largest level (``Plan.limited_by``).

        Raises:
            ValueError: a bound that is not one of ``BOUNDS``.
        """
        unknown = [b for b in limited_by if b not in BOUNDS]
        if unknown:
            raise ValueError(f"Telemetry.record_batch: unknown bound(s) {unknown}; known: {list(BOUNDS)}")
        with self._lock:
            for b in limited_by:
                self._add("ElasticLimitedBatches", b, 1)
            self._max_g = max(self._max_g, int(g))
            self._add("ElasticShed", None, shed)
            self._add("ElasticBadRequests", None, bad)
            if level is not None:
                self._level = level
                self._add("ElasticRequests", level, served)
                self._add("ElasticAnswersPastT", None, past_T)
                self._add("ElasticBatches", level, 1)
                self._add("ElasticPredictedBatchMs", level, predicted_ms)
                self._add("ElasticMeasuredBatchMs", level, measured_ms)

    def record_spare(self, sigma: float) -> None:
        """The spare bound's σ after a batch (a share in [0, 1); exported in percent)."""
        with self._lock:
            self._sigma = float(sigma)

    def flush(self) -> list[tuple[str, int | str | None, float]]:
        """(metric name, label, value) per update since the last flush, the label being the
        value of the metric's second dimension (a preserving level, or a bound) or None:
        counter increments that are not zero (every counter series, zeros included, on the first
        flush, so that each exists from the start), the largest g since the last flush (0 when
        no batch ran), the latest level (once there is one) and the latest learned σ in percent
        (once there is one). Resets the window."""
        with self._lock:
            counts, max_g, level, first = self._counts, self._max_g, self._level, self._first
            sigma = self._sigma
            self._counts, self._max_g, self._first = {}, 0, False
        if first:
            for s in SPECS.values():
                if s.type == "counter":
                    labels = self.levels if LEVEL in s.dimensions else BOUNDS if BOUND in s.dimensions else [None]
                    for lv in labels:
                        counts.setdefault((s.name, lv), 0.0)
        ordered = sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
        out = [(name, lv, round(v, 3)) for (name, lv), v in ordered if v or first]
        out.append(("ElasticQueueSize", None, float(max_g)))
        if level is not None:
            out.append(("ElasticLevel", None, float(level)))
        if sigma is not None:
            out.append(("ElasticSpareSigma", None, round(100 * sigma, 2)))
        return out


class Flusher:
    """Calls ``emit(name, label, value)`` for each of ``telemetry.flush()``'s updates every
    ``interval_s`` seconds, from a daemon thread (so the g gauge falls back to 0 when the worker
    goes idle). ``emit`` errors are counted and logged once, never raised into serving."""

    def __init__(self, telemetry: Telemetry, emit: Any, interval_s: float = 1.0):
        self.telemetry, self.emit, self.interval_s = telemetry, emit, interval_s
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-flusher", daemon=True)

    def start(self) -> "Flusher":
        self.flush()  # every series exists from the start
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def flush(self) -> None:
        for name, level, value in self.telemetry.flush():
            try:
                self.emit(name, level, value)
            except Exception as e:  # a metrics backend failure must not stop serving
                self.errors += 1
                if self.errors == 1:
                    log.warning("emitting metric %s failed: %s (further failures are counted only)", name, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()
