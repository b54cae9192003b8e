"""ElasticRanker and the two-stage pipeline through real TorchServe: elasticranker.mar and
elasticpipeline.mar, packed by archive/build_mar.py from the tiny models of conftest's pipeline_dir,
served side by side on free loopback ports with batching; answers equal the models' offline
scores, and a bad request gets its own 400 while the worker keeps serving."""

import json
import shutil
import urllib.error
import urllib.request

import pytest

from archive.build_mar import archive_pipeline, build_mar, model_config, ranker_model_config
from benchmarks.server import TorchServe, local_config
from tests.conftest import tiny_collection
from training.config import ServeConfig

pytestmark = pytest.mark.slow


def _post(url, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def served(pipeline_dir, tmp_path_factory):
    """One TorchServe serving ``rerank`` (elasticranker.mar) and ``search`` (elasticpipeline.mar),
    both pinned to their largest configuration so that answers are comparable offline."""
    work = tmp_path_factory.mktemp("ts2")
    config, inf, mgmt, _ = local_config(work)
    serve = ServeConfig(batch_size=4, max_batch_delay_ms=2)
    common = {"latency_constraint_ms": 10_000, "management_address": f"http://127.0.0.1:{mgmt}",
              "calibration_repeats": 3}
    ranker_cfg = ranker_model_config(serve, 3, 48)
    ranker_cfg["handler"].update(common, pin_level=50)
    ranker = build_mar(pipeline_dir / "ranker", None, work / "store", ranker_cfg, name="elasticranker")
    pipe_cfg = model_config(serve, 16)  # configuration 5 = (denser 50 %, ranker 50 %, K = 5)
    pipe_cfg["handler"].update(common, pair_max_length=48, top_k=6, pin_level=5)
    pipe = archive_pipeline(shutil.copytree(pipeline_dir, work / "stage"), pipe_cfg, work / "store")
    ts = TorchServe(config, work / "store", {"rerank": ranker.name, "search": pipe.name}, work,
                    f"http://127.0.0.1:{mgmt}")
    ts.start()
    try:
        ts.wait_ready("rerank", 180)
        ts.wait_ready("search", 180)
        yield ts, f"http://127.0.0.1:{inf}/predictions"
    finally:
        ts.stop()


def test_elasticranker_mar_scores_like_the_model(served, pipeline_dir):
    from elastic.ranker import CrossEncoder

    ts, url = served
    assert ts.describe("rerank")["task"] == "rerank"
    body = {"query": "who wrote hamlet", "passages": [{"pid": "p1", "text": "Rain falls."},
                                                      {"pid": "p2", "text": "Hamlet is a play by Shakespeare."},
                                                      {"pid": "p3", "text": "Cats sleep."}]}
    status, ans = _post(f"{url}/rerank", body)
    assert status == 200 and ans["level"] == 50 and ans["queue_size"] == 0
    ref = CrossEncoder(pipeline_dir / "ranker", max_length=48).score(
        [body["query"]] * 3, [p["text"] for p in body["passages"]], 50)
    want = sorted(zip(["p1", "p2", "p3"], ref.tolist()), key=lambda t: -t[1])
    assert [x["pid"] for x in ans["results"]] == [p for p, _ in want]
    assert [x["score"] for x in ans["results"]] == pytest.approx([v for _, v in want], abs=1e-4)
    status, text = _post(f"{url}/rerank", {"query": "q", "passages": [{"pid": str(i), "text": "x"} for i in range(4)]})
    assert status == 400 and "the limit is 3 (handler.max_passages)" in text
    assert _post(f"{url}/rerank", body)[0] == 200  # the worker survived


def test_elasticpipeline_mar_reranks_the_dense_head(served, pipeline_dir):
    from elastic.ranker import CrossEncoder

    ts, url = served
    info = ts.describe("search")
    assert info["task"] == "pipeline" and "5" in info["configurations"]
    q = "what is the capital of france"
    status, ans = _post(f"{url}/search", {"query": q})
    assert status == 200 and ans["level"] == 5
    assert ans["configuration"] == {"denser_level": 50, "ranker_level": 50, "depth": 5}
    assert [x["stage"] for x in ans["results"]] == ["rerank"] * 5 + ["dense"]
    head = [x["pid"] for x in ans["results"][:5]]
    texts = dict(tiny_collection())
    ref = CrossEncoder(pipeline_dir / "ranker", max_length=48).score([q] * 5, [texts[p] for p in head], 50)
    assert [x["score"] for x in ans["results"][:5]] == pytest.approx(sorted(ref.tolist(), reverse=True), abs=1e-4)
    status, text = _post(f"{url}/search", b'{"query": "unterminated')
    assert status == 400 and "malformed JSON" in text
    assert _post(f"{url}/search", {"query": q})[0] == 200
