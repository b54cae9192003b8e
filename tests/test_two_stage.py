"""The elastic two-stage pipeline (elastic/pipeline.py, ElasticPipelineServer): configuration
tables, the quality-time frontier, merging reranked candidates, and the server on a tiny
ElasticDenser and a tiny ElasticRanker that the tests build themselves."""

import shutil

import pytest

from elastic.pipeline import PipelineConfig, frontier, load_quality_table, merge_reranked
from tests.conftest import tiny_collection, write_table


def test_quality_table_is_checked_against_the_models(tmp_path):
    ok = write_table(tmp_path / "ok.json", [(50, None, 0, 0.3), (10, 25, 5, 0.35)])
    assert load_quality_table(ok, [50, 10], [50, 25], 10) == [PipelineConfig(50, None, 0, 0.3),
                                                              PipelineConfig(10, 25, 5, 0.35)]
    for rows, msg in (([(40, None, 0, 0.3)], r"configs\[0\]: denser_level 40 is not a level of the denser \[50, 10\]"),
                      ([(50, 25, 0, 0.3)], r"configs\[0\]: depth 0 \(dense only\) takes no ranker_level, got 25"),
                      ([(50, 30, 5, 0.3)], r"configs\[0\]: ranker_level 30 is not a level of the ranker"),
                      ([(50, None, -1, 0.3)], r"depth must be an integer >= 0, got -1"),
                      ([(50, None, 0, 1.5)], r"mrr_at_10 must be in \[0, 1\], got 1.5"),
                      ([(50, None, 0, 0.3), (50, None, 0, 0.2)], r"configs\[1\]: repeats configuration"),
                      ([], "'configs' must be a non-empty list")):
        with pytest.raises(ValueError, match=msg):
            load_quality_table(write_table(tmp_path / "bad.json", rows), [50, 10], [50, 25], 10)
    (tmp_path / "x.json").write_text('{"configs": [{"denser_level": 50}]}')
    with pytest.raises(ValueError, match=r"x.json: configs\[0\]: needs denser_level, ranker_level, depth and mrr_at_10"):
        load_quality_table(tmp_path / "x.json", [50], [50], 10)
    with pytest.raises(FileNotFoundError, match="benchmarks.pipeline_quality"):
        load_quality_table(tmp_path / "none.json", [50], [50], 10)


def test_frontier_keeps_configurations_no_other_beats_in_quality_at_no_more_time():
    c = [PipelineConfig(50, None, 0, 0.30), PipelineConfig(10, None, 0, 0.20), PipelineConfig(50, 50, 20, 0.40),
         PipelineConfig(30, None, 0, 0.25), PipelineConfig(10, 5, 5, 0.28), PipelineConfig(50, 5, 5, 0.30)]
    cost = [5.0, 2.0, 50.0, 6.0, 4.0, 9.0]
    # 30 % dense: slower and worse than 50 % dense; (50, 5, 5): as good as 50 % dense, slower
    assert frontier(c, cost) == [1, 4, 0, 2]
    kept = frontier(c, cost)
    assert all(cost[a] < cost[b] and c[a].mrr_at_10 < c[b].mrr_at_10 for a, b in zip(kept, kept[1:]))
    with pytest.raises(ValueError, match="2 configurations but 1 costs"):
        frontier(c[:2], cost[:1])


def test_merge_reranked_reorders_the_head_and_keeps_the_tail():
    assert merge_reranked([7, 8, 9, 10, 11], [0.1, 0.9, 0.5], 4) == [8, 9, 7, 10]
    assert merge_reranked([7, 8], [], 5) == [7, 8]
    with pytest.raises(ValueError, match="3 scores for 2 candidates"):
        merge_reranked([1, 2], [0.0, 0.0, 0.0], 2)


def settings(**kw):
    from elastic.service import HandlerSettings

    return HandlerSettings(latency_constraint_ms=10_000.0, calibration_repeats=2, query_max_length=16, top_k=6,
                           pair_max_length=48, calibration_cache=False, **kw)


def test_pipeline_server_reranks_the_dense_head_with_the_chosen_ranker_level(pipeline_dir, tiny_elastic):
    from elastic.ranker import CrossEncoder
    from elastic.service import ElasticPipelineServer, ElasticRetriever, server_for

    server = server_for(pipeline_dir, settings(pin_level=5), max_batch=2)
    assert isinstance(server, ElasticPipelineServer) and server.describe()["task"] == "pipeline"
    assert 5 in server.levels and server.configs[5] == PipelineConfig(50, 50, 5, 0.40)
    q = "what is the capital of france"
    out = server.handle_batch([{"query": q}, b"{oops"])
    assert [r.status for r in out] == [200, 400]
    ans = out[0].payload
    assert ans["level"] == 5 and ans["configuration"] == {"denser_level": 50, "ranker_level": 50, "depth": 5}
    assert [r["stage"] for r in ans["results"]] == ["rerank"] * 5 + ["dense"]
    dense = ElasticRetriever(tiny_elastic, settings(pin_level=50), max_batch=2).handle_batch([{"query": q}])[0]
    dense_pids = [r["pid"] for r in dense.payload["results"]]
    assert {r["pid"] for r in ans["results"][:5]} == set(dense_pids[:5])  # the dense top-5, reordered
    assert ans["results"][5]["pid"] == dense_pids[5]
    texts = dict(tiny_collection())
    ref = CrossEncoder(pipeline_dir / "ranker", max_length=48).score([q] * 5, [texts[p] for p in dense_pids[:5]], 50)
    want = sorted(zip(dense_pids[:5], ref.tolist()), key=lambda t: -t[1])
    assert [r["pid"] for r in ans["results"][:5]] == [p for p, _ in want]
    assert [r["score"] for r in ans["results"][:5]] == pytest.approx([v for _, v in want], abs=1e-5)
    # a dense-only configuration answers as the retriever at that level
    only = server_for(pipeline_dir, settings(pin_level=3), max_batch=2).handle_batch([{"query": q}])[0].payload
    assert only["configuration"]["depth"] == 0 and [r["pid"] for r in only["results"]] == dense_pids
    assert all(r["stage"] == "dense" for r in only["results"])


def test_pipeline_server_keeps_the_quality_time_frontier_numbered_by_quality(pipeline_dir):
    from elastic.service import server_for

    server = server_for(pipeline_dir, settings(), max_batch=2)
    kept = server.levels  # best first
    conf = server.describe()["configurations"]
    assert set(conf) == {str(k) for k in kept} and kept[0] == 5  # the best configuration is never dominated
    q = [server.configs[k].mrr_at_10 for k in kept]
    assert q == sorted(q, reverse=True)
    t1 = [server.calibration.t(k, 1) for k in kept]
    assert t1 == sorted(t1, reverse=True)
    with pytest.raises(ValueError, match="handler.pin_level: 9 is not a level of the quality-time frontier of "
                                         "pipeline.json"):
        server_for(pipeline_dir, settings(pin_level=9), max_batch=2)


def test_pipeline_needs_text_for_every_indexed_passage(pipeline_dir, tmp_path):
    import gzip

    from elastic.service import server_for

    bad = shutil.copytree(pipeline_dir, tmp_path / "bad")
    with gzip.open(bad / "passages.tsv.gz", "rt") as f:
        lines = f.readlines()
    with gzip.open(bad / "passages.tsv.gz", "wt") as f:
        f.writelines(lines[1:])
    with pytest.raises(ValueError, match="passages.tsv.gz: no text for indexed pid"):
        server_for(bad, settings(), max_batch=2)
