"""Python's garbage collector in a serving worker: how long its collections stop the worker, and
``gc.freeze()`` to keep the loaded model's objects out of them.

Why it matters to the schedule
------------------------------
CPython's cyclic collector stops the interpreter while it runs, and a full (generation 2)
collection walks every tracked container object. A worker that has imported TorchServe, torch
and transformers and loaded a model holds 220,000-279,000 of them (the more when it calibrates at
load, which imports scikit-learn); one full collection of the demo model's took 73-111 ms on this
machine in four runs (``gc.collect(2)`` after ``server_for``), more
than T = 50 ms. A collection that falls inside a batch adds its pause to the batch's time; the
schedule sees it only afterwards, as one slow batch among its recent ratios.

``gc.freeze()`` (Python >= 3.7, docs.python.org/3/library/gc.html#gc.freeze) moves every object
tracked so far into a permanent generation that no collection walks again, so the collections
that follow walk only what the worker allocated since: the requests. The Python docs describe
it for a server that forks workers after start-up (to keep pages shared copy-on-write); here it
serves the collector's pauses. Objects frozen are never freed by the collector, which a model
loaded once and kept does not need.

``GcPauses`` times every collection through ``gc.callbacks`` (per generation: count, total and
largest pause, milliseconds) so that describe() shows what the collector cost a running worker.
"""

from __future__ import annotations

import gc
import time


class GcPauses:
    """Counts and times the collector's pauses in this process, from ``gc.callbacks``.

    ``start()`` registers the callback, ``stop()`` removes it; ``summary()`` gives
    {"gen0": {"count", "total_ms", "max_ms"}, "gen1": ..., "gen2": ...}. The callback runs inside
    the collection (with the GIL held), so its own cost is two perf_counter calls and a few
    additions per collection. It takes no lock: ``summary()`` allocates, an allocation can start
    a collection in the same thread, and a callback waiting on a lock that thread holds would
    never return. A summary read while a collection ends may mix counts of two moments.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self._t0 is None:  # registered mid-collection
            return
        ms = (time.perf_counter() - self._t0) * 1000
        g = min(max(int(info.get("generation", 2)), 0), 2)
        self.count[g] += 1
        self.total_ms[g] += ms
        self.max_ms[g] = max(self.max_ms[g], ms)
        self._t0 = None

    def start(self) -> "GcPauses":
        """Register with ``gc.callbacks`` (once)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        """Unregister from ``gc.callbacks``."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        """Per generation: collections, their summed and their largest pause (milliseconds)."""
        return {f"gen{g}": {"count": self.count[g], "total_ms": round(self.total_ms[g], 3),
                            "max_ms": round(self.max_ms[g], 3)} for g in range(3)}


GC_PAUSES = GcPauses()  # the collector is per process, so one timer per process


def freeze_heap() -> int:
    """Collect once, then move every tracked object into the permanent generation
    (``gc.freeze()``): later collections skip the loaded model, libraries and calibration state.

    Returns:
        how many objects were frozen (``gc.get_freeze_count()``).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
