"""The collector's pauses in a worker: timed per generation, and gc.freeze() after the model loads
(elastic/gc_pauses.py, handler.gc_freeze)."""

import gc

import pytest

from elastic.gc_pauses import GcPauses, freeze_heap
from elastic.service import ElasticRetriever, FixedQueue, HandlerSettings


class Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


def test_pauses_are_counted_and_timed_per_generation():
    pauses = GcPauses().start()
    try:
        for _ in range(3):
            Cycle()
            gc.collect(1)
        gc.collect(2)
        got = pauses.summary()
    finally:
        pauses.stop()
    assert got["gen1"]["count"] >= 3 and got["gen2"]["count"] >= 1
    assert got["gen2"]["max_ms"] > 0 and got["gen1"]["total_ms"] >= got["gen1"]["max_ms"] > 0
    assert pauses._callback not in gc.callbacks
    gc.collect(2)  # after stop(): not counted
    assert pauses.summary()["gen2"]["count"] == got["gen2"]["count"]


def test_freezing_takes_the_loaded_objects_out_of_full_collections():
    kept = [Cycle() for _ in range(20_000)]  # a loaded model's worth of tracked objects, kept
    try:
        frozen = freeze_heap()
        assert frozen >= len(kept) and gc.get_freeze_count() == frozen
        assert all(not any(o is k for o in gc.get_objects(2)) for k in kept[:3])  # no generation walks them
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_worker_freezes_its_heap_when_set_and_reports_the_pauses(tiny_elastic):
    try:
        on = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, gc_freeze=True,
                                                            calibration_repeats=1), max_batch=2, queue=FixedQueue(0))
        assert on.gc_frozen > 0 and on.describe()["gc_frozen_objects"] == on.gc_frozen
        gc.collect(2)
        assert on.describe()["gc_pauses"]["gen2"]["count"] >= 1
    finally:
        gc.unfreeze()
    off = ElasticRetriever(tiny_elastic, HandlerSettings(latency_constraint_ms=1000.0, gc_freeze=False,
                                                         calibration_repeats=1), max_batch=2, queue=FixedQueue(0))
    assert off.gc_frozen == 0 and gc.get_freeze_count() == 0


def test_gc_freeze_is_validated():
    assert HandlerSettings.from_yaml({"latency_constraint_ms": 50, "gc_freeze": "false"}, environ={}).gc_freeze is False
    with pytest.raises(ValueError, match="handler.gc_freeze: expected bool, got 'maybe'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "gc_freeze": "maybe"}, environ={})
