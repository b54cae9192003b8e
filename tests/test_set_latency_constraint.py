"""Changing T without downtime (archive/set_latency_constraint.py): T is validated before the
server is touched; through a real TorchServe, requests sent throughout the change all succeed,
the new version serves the new T, and the old one is gone."""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from archive.build_mar import build_mar
from archive.set_latency_constraint import Management, parse_ms, set_latency_constraint
from benchmarks.server import TorchServe, local_config


@pytest.mark.parametrize("text,msg", [("fast", "must be a number of milliseconds, got 'fast'"),
                                      ("0", "must be a positive number"), ("-5", "must be a positive number"),
                                      ("nan", "must be a positive number"), ("inf", "must be a positive number")])
def test_bad_T_is_refused_before_touching_the_server(text, msg):
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
        parse_ms(text)
    assert parse_ms("80") == 80.0


@pytest.mark.slow
def test_T_changes_with_no_request_failing(tiny_elastic, tmp_path):
    config, inf, mgmt, _ = local_config(tmp_path)
    mar = build_mar(tiny_elastic, tiny_elastic, tmp_path / "store", {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 2, "responseTimeout": 60,
        "handler": {"latency_constraint_ms": 1000, "management_address": f"http://127.0.0.1:{mgmt}",
                    "calibration_repeats": 5}})
    ts = TorchServe(config, mar.parent, {"elastic": mar.name}, tmp_path,
                    f"http://127.0.0.1:{mgmt}")
    ts.start()
    statuses: list[int] = []
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            req = urllib.request.Request(f"http://127.0.0.1:{inf}/predictions/elastic",
                                         data=json.dumps({"query": f"query {i} {time.time()}"}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
            except OSError:
                statuses.append(0)

    try:
        ts.wait_ready("elastic", 120)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        new = set_latency_constraint(Management(ts.management), mar.parent, "elastic", 2000.0, 120, log=lambda _: None)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))
        versions = Management(ts.management).call("GET", "/models/elastic/all")
        assert [v["modelVersion"] for v in versions] == [new]
        assert ts.describe("elastic")["latency_constraint_ms"] == 2000.0
    finally:
        stop.set()
        ts.stop()
