"""Query heads (elastic/query_head.py, training/align.py): the closed-form fit, the query side
only, the checks at load, the stage's skip and refusal, and serving through them."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elastic.encoder import ElasticEncoder
from elastic.query_head import FILE, QueryHeads, file_sha256
from training.align import align, fit_heads
from training.config import RecipeConfig, load_config
from tests.conftest import faiss_top

QUERIES = ["what is a bank", "who wrote hamlet", "how tall is the eiffel tower", "define photosynthesis",
           "cheap flights to rome", "symptoms of flu", "python list sort", "capital of peru"]


def test_fit_recovers_an_affine_map_and_reports_the_held_out_gain():
    g = torch.Generator().manual_seed(0)
    d, n = 7, 400
    A, c = torch.randn(d, d, generator=g), torch.randn(d, generator=g)
    S = {50: torch.randn(n, d, generator=g), 10: torch.randn(n, d, generator=g)}
    T = S[50] @ A.T + c  # level 50 is exactly affine in T; level 10 is unrelated noise
    heads, report = fit_heads(S, T, [1e-6], 0.1, 0)
    W, b = heads[50]
    assert torch.allclose(W, A, atol=1e-3) and torch.allclose(b, c, atol=1e-3)
    assert report[50]["holdout_cos_after"] > 0.999 > report[50]["holdout_cos_before"]
    # nothing to learn but the mean c: the held-out split says so
    mean_only = float(F.cosine_similarity(c.expand(40, d), T[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40]]).mean())
    assert abs(report[10]["holdout_cos_after"] - mean_only) < 0.05
    assert report[50]["alpha"] == 1e-6
    with pytest.raises(ValueError, match=r"level 50 embeddings have shape \(400, 6\), the teacher's \(400, 7\)"):
        fit_heads({50: S[50][:, :6]}, T, [1.0], 0.1, 0)
    with pytest.raises(ValueError, match="1 training queries"):
        fit_heads({50: S[50][:1]}, T[:1], [1.0], 0.0, 0)


def random_heads(enc: ElasticEncoder, seed: int = 0) -> QueryHeads:
    g = torch.Generator().manual_seed(seed)
    d = enc.dims.hidden_size
    return QueryHeads({k: (torch.randn(d, d, generator=g), torch.randn(d, generator=g)) for k in enc.levels},
                      file_sha256(enc.model_dir / "model.safetensors"))


@pytest.fixture()
def headed(tmp_path, tiny_elastic):
    """A copy of the tiny ElasticDenser with random query heads."""
    d = tmp_path / "headed"
    shutil.copytree(tiny_elastic, d)
    random_heads(ElasticEncoder(d)).save(d / FILE)
    return d


def test_heads_map_queries_only(headed):
    with_heads, without = ElasticEncoder(headed), ElasticEncoder(headed, query_heads=False)
    assert without.query_heads is None and with_heads.query_heads is not None
    for level in with_heads.levels:
        s = without.encode(QUERIES, level, 16)  # (N, d) pooled as the submap says
        W, b = with_heads.query_heads.heads[level]
        want = s @ W.T + b
        if with_heads.submap.normalize:
            want = F.normalize(want, dim=-1)
        assert torch.allclose(with_heads.encode(QUERIES, level, 16, query=True), want, atol=1e-5)
        assert torch.allclose(with_heads.encode(QUERIES, level, 16), s, atol=1e-6)  # passages: untouched
    # a model without heads encodes queries as it always did
    assert torch.allclose(without.encode(QUERIES, 10, 16, query=True), without.encode(QUERIES, 10, 16))


def test_heads_that_do_not_fit_the_model_fail_the_load(headed):
    from safetensors.torch import load_file, save_file

    good = load_file(str(headed / FILE))
    meta = {"model_sha256": file_sha256(headed / "model.safetensors")}
    save_file({k: v for k, v in good.items() if k != "10.bias"}, str(headed / FILE), metadata=meta)
    with pytest.raises(ValueError, match=r"query_heads.safetensors: no tensor '10.bias'"):
        ElasticEncoder(headed)
    save_file({**good, "30.weight": good["30.weight"][:, :5].contiguous()}, str(headed / FILE), metadata=meta)
    with pytest.raises(ValueError, match=r"tensor '30.weight' has shape \(32, 5\), expected \(32, 32\)"):
        ElasticEncoder(headed)
    save_file(good, str(headed / FILE), metadata={"model_sha256": "0" * 64})
    with pytest.raises(ValueError, match="'model_sha256' does not match .*rerun python -m training.align"):
        ElasticEncoder(headed)
    save_file(good, str(headed / FILE))
    with pytest.raises(ValueError, match="metadata 'model_sha256' is missing"):
        ElasticEncoder(headed)
    # heads of levels the submap does not hold are ignored (an archive may pack a subset of levels)
    save_file({**good, "77.weight": good["50.weight"].clone(), "77.bias": good["50.bias"].clone()}, str(headed / FILE), metadata=meta)
    assert sorted(ElasticEncoder(headed).query_heads.heads) == [10, 30, 50]


def test_saving_new_weights_drops_stale_heads(headed, tmp_path):
    out = tmp_path / "retrained"
    shutil.copytree(headed, out)  # a model directory with heads, about to get new weights
    ElasticEncoder(headed).save(out)
    assert not (out / FILE).exists()
    assert ElasticEncoder(out).query_heads is None


def small_cfg(tmp_path, **align) -> RecipeConfig:
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "align": align}))
    return load_config(p)


def test_align_stage_writes_heads_skips_when_done_and_refuses_a_largest_index(headed, tiny_dir, tmp_path, capsys):
    (headed / FILE).unlink()
    teacher = ElasticEncoder(tiny_dir)  # same hidden size (32): stands in for the teacher
    texts = [f"{q} {i}" for i in range(12) for q in QUERIES]  # 96 queries
    targets = teacher.encode(texts, 100, 16)
    cfg = small_cfg(tmp_path, alphas=[0.01, 1.0], holdout=0.25, max_queries=80)
    with pytest.raises(ValueError, match="finetune.json: passage_side is 'largest'.*align.enabled: false"):
        align(cfg, headed, texts, targets)
    (headed / "finetune.json").write_text(json.dumps({"passage_side": "teacher"}))
    out = align(cfg, headed, texts, targets)
    assert out["queries"] == 80 and out["holdout"] == 20
    for rep in out["levels"].values():
        assert rep["alpha"] in (0.01, 1.0)
        assert rep["holdout_cos_after"] > rep["holdout_cos_before"]
    enc = ElasticEncoder(headed)
    assert sorted(enc.query_heads.heads) == [10, 30, 50]
    # held-out queries move toward the teacher through the heads
    q = enc.encode(QUERIES, 10, 16, query=True)
    t = teacher.encode(QUERIES, 100, 16)
    assert F.cosine_similarity(q, t).mean() > F.cosine_similarity(enc.encode(QUERIES, 10, 16), t).mean()
    capsys.readouterr()
    align(cfg, headed, texts, targets)
    assert "already fitted to these weights" in capsys.readouterr().out
    align(small_cfg(tmp_path, alphas=[0.5], holdout=0.25, max_queries=80), headed, texts, targets)  # other settings: refit
    assert json.loads((headed / "align.json").read_text())["levels"]["50"]["alpha"] == 0.5


@pytest.mark.parametrize("align_cfg,msg", [
    ({"alphas": []}, r"align.alphas: expected a non-empty list of positive numbers"),
    ({"alphas": [1.0, -2]}, r"align.alphas"),
    ({"holdout": 0.5}, r"align.holdout: a share of the training queries in \[0, 0.5\)"),
    ({"max_queries": -1}, r"align.max_queries: must be >= 0"),
])
def test_bad_align_settings_fail_at_load(tmp_path, align_cfg, msg):
    with pytest.raises(ValueError, match=msg):
        small_cfg(tmp_path, **align_cfg)


def test_served_answers_go_through_the_heads(headed):
    from elastic.service import ElasticRetriever, FixedQueue, HandlerSettings

    r = ElasticRetriever(headed, HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16,
                                                 calibration_repeats=1), max_batch=2, queue=FixedQueue(0))
    assert r.describe()["query_heads"] is True
    out = r.handle_batch([{"query": "what is a bank"}])[0].payload
    for enc in (ElasticEncoder(headed), ElasticEncoder(headed, query_heads=False)):
        q = enc.encode(["what is a bank"], out["level"], 16, query=True)
        idx = faiss_top(headed, q)
        if enc.query_heads is not None:
            assert [h["pid"] for h in out["results"]] == [r.pids[j] for j in idx[0]]
        else:  # random heads change the ranking: the answer is not the headless one
            assert [h["pid"] for h in out["results"]] != [r.pids[j] for j in idx[0]]


def test_the_archive_packs_the_heads_with_a_subset_of_levels(headed, tmp_path):
    from archive.build_mar import build_mar
    from elastic.service import ElasticRetriever, FixedQueue, HandlerSettings

    out = build_mar(headed, headed, tmp_path / "store", {"batchSize": 2, "handler": {"latency_constraint_ms": 1000}},
                    archive_format="no-archive", levels=[50, 10])
    served = ElasticEncoder(out)
    assert served.levels == [50, 10] and sorted(served.query_heads.heads) == [10, 50]
    want = ElasticEncoder(headed).encode(QUERIES, 10, 16, query=True)
    assert torch.allclose(served.encode(QUERIES, 10, 16, query=True), want, atol=1e-6)
    r = ElasticRetriever(out, HandlerSettings(latency_constraint_ms=1000.0, query_max_length=16, calibration_repeats=1),
                         max_batch=2, queue=FixedQueue(0))
    assert r.describe()["query_heads"] is True


def test_the_handler_setting_serves_without_the_heads(headed):
    from elastic.service import ElasticRetriever, FixedQueue, HandlerSettings

    settings = HandlerSettings.from_yaml({"latency_constraint_ms": 1000, "query_max_length": 16,
                                          "calibration_repeats": 1, "query_heads": False}, environ={})
    r = ElasticRetriever(headed, settings, max_batch=2, queue=FixedQueue(0))
    assert r.encoder.query_heads is None and r.describe()["query_heads"] is False
    out = r.handle_batch([{"query": "what is a bank"}])[0].payload
    q = ElasticEncoder(headed, query_heads=False).encode(["what is a bank"], out["level"], 16)
    idx = faiss_top(headed, q)
    assert [h["pid"] for h in out["results"]] == [r.pids[j] for j in idx[0]]
    with pytest.raises(ValueError, match="handler.query_heads: expected bool, got 'maybe'"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "query_heads": "maybe"}, environ={})
