"""The whole recipe on a tiny teacher (hidden 32, 4 heads, intermediate 37, 2 layers): prune ->
query distillation -> static baseline -> index -> offline evaluation -> .mar -> ablations
(relation distillation and fine-tuning run there), each step through its public run(cfg).
Checks what each writes, not the (meaningless) quality of a random model."""

import json
import zipfile

import pytest
import torch

from tests.conftest import tiny_collection


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir):
    from elastic.data import read_tsv
    from training.config import RecipeConfig

    root = tmp_path_factory.mktemp("run")
    col = tiny_collection(200)
    (root / "collection.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in col.items()))
    train = list(read_tsv("data/train-queries/msmarco.train.tsv.gz").items())[:48]
    (root / "train.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in train))
    dev = dict(list(read_tsv("data/msmarco/queries.dev500.tsv").items())[:30])
    (root / "dev.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in dev.items()))
    # synthetic qrels (every query judged against the first passage): the checks are about outputs
    first = next(iter(col))
    (root / "qrels.tsv").write_text("".join(f"{q} 0 {first} 1\n" for q in dev))
    cfg = RecipeConfig(run_dir=str(root / "run"))
    d, p, ds, ft, qd = cfg.data, cfg.prune, cfg.distill, cfg.finetune, cfg.query_distill
    d.collection, d.dev_queries, d.qrels = (str(root / f) for f in ("collection.tsv", "dev.tsv", "qrels.tsv"))
    d.train_queries = [str(root / "train.tsv")]
    qd.steps, qd.batch_size, qd.candidates = 3, 8, 8
    p.teacher, p.levels, p.score_queries, p.batch_size = str(tiny_dir), [50, 30, 10], 16, 8
    ds.text, ds.steps, ds.batch_size, ds.max_length, ds.relation_heads = ["data/text/wikitext-2.valid.tokens.gz"], 3, 4, 32, 4
    ft.steps, ft.batch_size, ft.bm25_depth = 3, 4, 10
    cfg.static.levels = [30]
    cfg.train.device, cfg.train.checkpoint_every, cfg.train.log_every = "cpu", 2, 1
    cfg.encode.batch_size = 64
    from training import build_index, prune, static, train

    prune.run(cfg)
    train.run(cfg)
    static.run(cfg)
    build_index.run(cfg)
    return cfg


def test_every_stage_writes_its_outputs(tiny_run):
    run = tiny_run.run
    for d in ("pruned", "elastic", "static/30/elastic"):
        assert (run / d / "model.safetensors").exists() and (run / d / "submap.json").exists(), d
    assert not (run / "distilled").exists()  # relation distillation is off in the default recipe
    assert json.loads((run / "elastic" / "finetune.json").read_text())["passage_side"] == "teacher"
    assert json.loads((run / "index" / "index.json").read_text())["passage_encoder"] == "the teacher's passage embeddings"
    log = [json.loads(x) for x in (run / "checkpoints" / "query_distill" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and set(log[0]) >= {"wall_s", "peak_mem_mib", "loss_per_level"}
    assert json.loads((run / "static" / "30" / "elastic" / "submap.json").read_text())["levels"].keys() == {"30"}


def test_offline_evaluation_rows(tiny_run, tmp_path):
    from benchmarks.evaluate import COLUMNS, run

    rows = run(tiny_run, out=tmp_path)
    saved = json.loads((tmp_path / "offline.json").read_text())
    assert saved == rows and all(list(r) == COLUMNS for r in rows)
    assert [(r["system"], r["level"]) for r in rows] == [("bm25", None), ("teacher", None), ("elastic", 50),
                                                          ("elastic", 30), ("elastic", 10), ("static", 30)]
    for r in rows:
        assert all(0 <= r[m] <= 1 for m in ("mrr_at_10", "ndcg_at_10", "r_at_20", "r_at_100"))
        assert r["cos_to_teacher"] is None if r["system"] == "bm25" else -1 <= r["cos_to_teacher"] <= 1.0001
        assert r["r_at_20"] <= r["r_at_100"] and r["latency_q_ms"] > 0
    el = [r for r in rows if r["system"] == "elastic"]
    assert el[0]["params"] > el[1]["params"] > el[2]["params"] and el[0]["gflops"] > el[2]["gflops"]
    st = rows[-1]
    assert (st["params"], st["gflops"]) == (el[1]["params"], el[1]["gflops"])  # same SubLM, trained alone
    assert (tmp_path / "offline.png").stat().st_size > 0 and "| static | 30 |" in (tmp_path / "offline.md").read_text()
    with pytest.raises(ValueError, match="no qid in common"):
        bad = tmp_path / "q.tsv"
        bad.write_text("999999999\tnothing\n")
        run(tiny_run, queries=str(bad), out=tmp_path)


def test_offline_latency_runs_the_matrix_products_in_the_workers_library(tiny_elastic, monkeypatch):
    from benchmarks.evaluate import encoder_latency_ms
    from elastic.encoder import ElasticEncoder
    from elastic.service import HandlerSettings

    enc = ElasticEncoder(tiny_elastic)
    seen, embed = [], enc.embed

    def spy(*a, **k):
        seen.append(torch.backends.mkldnn.enabled)
        return embed(*a, **k)

    monkeypatch.setattr(enc, "embed", spy)
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = not HandlerSettings.onednn
    try:
        assert encoder_latency_ms(enc, 30, 2, 8, repeats=3) > 0
        assert seen == [HandlerSettings.onednn] * 4  # warm-up + 3 timed, as the worker runs them
        assert torch.backends.mkldnn.enabled is (not HandlerSettings.onednn)  # the caller's setting is back
    finally:
        torch.backends.mkldnn.enabled = was


def test_archive_packs_the_fine_tuned_model_unchanged(tiny_run, tmp_path):
    from archive.build_mar import run

    mar = run(tiny_run, tmp_path)
    with zipfile.ZipFile(mar) as z:
        assert z.read("model.safetensors") == (tiny_run.run / "elastic" / "model.safetensors").read_bytes()
        assert z.read("index.faiss") == (tiny_run.run / "index" / "index.faiss").read_bytes()


def test_ablation_trains_and_scores_each_variant(tiny_run):
    from benchmarks.ablation import run

    rows = run(tiny_run)
    names = ["recipe, index=teacher", "recipe, index=largest", "scores=contrastive", "task=finetune",
             "word embeddings=trained", "relations=on", "token loss=on"]
    assert [(r["variant"], r["level"]) for r in rows] == [(n, lv) for n in names for lv in (50, 30, 10)]
    ab = tiny_run.run / "ablation"
    tok = torch.load(ab / "token loss-on" / "checkpoints" / "query_distill" / "checkpoint.pt", weights_only=False)
    assert tok["key"]["query_distill"]["token_weight"] == 1.0
    assert json.loads((ab / "task-finetune" / "elastic" / "finetune.json").read_text())["passage_side"] == "largest"
    assert (ab / "relations-on" / "distilled" / "model.safetensors").exists()
    # a different score objective prunes differently; the other variants share the recipe's pruned model
    assert (ab / "scores-contrastive" / "pruned" / "scores.pt").read_bytes() != (tiny_run.run / "pruned" / "scores.pt").read_bytes()
    assert (ab / "task-finetune" / "pruned" / "model.safetensors").samefile(tiny_run.run / "pruned" / "model.safetensors")
    assert (tiny_run.run / "eval" / "ablation.md").read_text().count("| task=finetune |") == 3
