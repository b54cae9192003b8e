"""ElasticRanker's foundations (paper §4.4, eq. 9-11): the cross-encoder, LCE, reciprocal rank
fusion, candidate runs, the teacher stage and the rerank benchmark, on tiny checkpoints that the
tests write themselves."""

import json
import math
import shutil

import pytest
import torch

from elastic.data import read_run
from elastic.ranker import CrossEncoder, reciprocal_rank_fusion
from tests.conftest import make_tiny_checkpoint, tiny_collection
from training.lce_loss import lce_loss
from training.rank_kd_loss import listwise_kd


def test_rrf_sums_reciprocal_ranks_and_keeps_first_appearance_on_ties():
    a = [[1, 2, 3], [7, 8]]
    b = [[3, 1, 4], [8, 9]]
    fused = reciprocal_rank_fusion([a, b], k=1.0)
    # query 0: 1 -> 1/2 + 1/3, 3 -> 1/4 + 1/2, 2 -> 1/3, 4 -> 1/4
    assert fused[0] == [1, 3, 2, 4]
    assert fused[1] == [8, 7, 9]  # 8: 1/3 + 1/2; 7: 1/2; 9: 1/3
    assert reciprocal_rank_fusion([[[5, 6]], [[6, 5]]], k=60.0) == [[5, 6]]  # a tie: first appearance
    assert reciprocal_rank_fusion([a, b], depth=2) == [[1, 3], [8, 7]]
    with pytest.raises(ValueError, match="rankings cover \\[2, 1\\] queries"):
        reciprocal_rank_fusion([a, b[:1]])
    with pytest.raises(ValueError, match="k must be > 0"):
        reciprocal_rank_fusion([a], k=0)
    with pytest.raises(ValueError, match="no rankings"):
        reciprocal_rank_fusion([])


def test_lce_is_the_negative_log_softmax_of_the_positive():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = lce_loss(scores)
    want = (-(2.0 - math.log(math.exp(2) + 1 + math.exp(1))) + math.log(3)) / 2
    assert loss.item() == pytest.approx(want)
    loss.backward()
    assert (scores.grad[:, 0] < 0).all() and (scores.grad[:, 1:] > 0).all()  # descent raises the positive
    with pytest.raises(ValueError, match="expected \\(B, m >= 2\\) scores"):
        lce_loss(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="expected \\(B, m >= 2\\) scores"):
        lce_loss(torch.zeros(3))


def test_listwise_kd_is_zero_at_the_teacher_and_scaled_by_temperature_squared():
    t = torch.tensor([[3.0, 1.0, 0.0]])
    assert listwise_kd(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[0.0, 1.0, 3.0]])
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    assert listwise_kd(s, t, 2.0).item() == pytest.approx(4 * float((p * (p / q).log()).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="student scores \\(1, 3\\) vs teacher \\(1, 2\\)"):
        listwise_kd(s, t[:, :2], 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        listwise_kd(s, t, 0.0)


def test_read_run_orders_trec_runs_by_score_and_packed_runs_by_rank(tmp_path):
    trec = tmp_path / "run.trec"
    trec.write_text("q1 Q0 p1 2 3.5 bm25\nq1 Q0 p2 1 9.0 bm25\nq2 Q0 p3 1 1.0 bm25\n")
    assert read_run(trec) == {"q1": ["p2", "p1"], "q2": ["p3"]}
    packed = tmp_path / "run.tsv"
    packed.write_text("q1\tp9\t2\nq1\tp8\t1\n")
    assert read_run(packed) == {"q1": ["p8", "p9"]}
    assert len(read_run("data/msmarco/bm25.top20.dev500.tsv")) == 500
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 p1 one 3.5 bm25\n")
    with pytest.raises(ValueError, match="bad.trec:1: expected 'qid Q0 pid rank score tag' or 'qid pid rank'"):
        read_run(bad)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_run(tmp_path / "empty")


@pytest.fixture(scope="module")
def hf_cross_encoder(tmp_path_factory):
    """A tiny one-label BertForSequenceClassification: how a user's cross-encoder is saved."""
    from transformers import BertForSequenceClassification

    out = make_tiny_checkpoint(tmp_path_factory.mktemp("xenc"), seed=5, num_labels=1)
    return out, BertForSequenceClassification.from_pretrained(out).eval()


def test_cross_encoder_scores_equal_transformers(hf_cross_encoder):
    path, hf = hf_cross_encoder
    ours = CrossEncoder(path, max_length=24)
    qs = ["what is a cross encoder", "who wrote hamlet"]
    ps = ["A cross-encoder reads the query and the passage together. " * 4, "Hamlet is a play by Shakespeare."]
    tok = ours.tokenizer(qs, ps, truncation="only_second", max_length=24, padding=True, return_tensors="pt")
    assert tok["input_ids"].shape[1] == 24  # the long passage was cut, the query kept
    with torch.no_grad():
        ref = hf(**tok).logits[:, 0]
    assert torch.allclose(ours.score(qs, ps, level=100, batch_size=1), ref, atol=1e-5)
    assert ours.levels == [100]
    with pytest.raises(ValueError, match="2 queries but 1 passages"):
        ours.score(qs, ps[:1], 100)
    with pytest.raises(ValueError, match="level 50 is not one of \\[100\\]"):
        ours.score(qs, ps, 50)


def test_a_classifier_with_two_outputs_is_not_a_cross_encoder(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "cls", num_labels=2)
    with pytest.raises(ValueError, match="the checkpoint has 2 labels, task rerank needs 1"):
        CrossEncoder(path)
    with pytest.raises(ValueError, match="max_length must be > 8"):
        CrossEncoder(path, max_length=8)


def test_ranker_config_fails_at_load_naming_the_field(tmp_path):
    from training.config import load_config

    for body, field in (("ranker: {group_size: 40, depth: 30}", "ranker.group_size"),
                        ("ranker: {max_length: 4}", "ranker.max_length"),
                        ("ranker: {rrf_k: 0}", "ranker.rrf_k"), ("ranker: {steps: 0}", "ranker.steps"),
                        ("ranker: {lr: fast}", "ranker.lr"), ("ranker: {positive: bm25}", "ranker.positive"),
                        ("ranker: {kd_weight: -1}", "ranker.kd_weight")):
        f = tmp_path / "r.yaml"
        f.write_text(body + "\n")
        with pytest.raises(ValueError, match=f"config {field}"):
            load_config(f)


@pytest.fixture(scope="module")
def ranker_cfg(tmp_path_factory, tiny_dir):
    """A recipe on the tiny teacher, 150 passages, 24 training queries, 20 judged dev queries
    whose candidates are BM25-like runs over the tiny collection."""
    from elastic.data import read_tsv
    from training.config import RecipeConfig

    root = tmp_path_factory.mktemp("ranker")
    col = tiny_collection(150)
    pids = list(col)
    (root / "collection.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in col.items()))
    train = list(read_tsv("data/train-queries/msmarco.train.tsv.gz").items())[:24]
    (root / "train.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in train))
    dev = list(read_tsv("data/msmarco/queries.dev500.tsv").items())[:20]
    (root / "dev.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in dev))
    (root / "qrels.tsv").write_text("".join(f"{q} 0 {pids[i]} 1\n" for i, (q, _) in enumerate(dev)))
    (root / "cands.tsv").write_text("".join(f"{q}\t{pids[(i + j) % len(pids)]}\t{j + 1}\n"
                                            for i, (q, _) in enumerate(dev) for j in range(6)))
    cfg = RecipeConfig(run_dir=str(root / "run"))
    d, r = cfg.data, cfg.ranker
    d.collection, d.dev_queries, d.qrels, d.candidates = (str(root / f) for f in
                                                          ("collection.tsv", "dev.tsv", "qrels.tsv", "cands.tsv"))
    d.train_queries = [str(root / "train.tsv")]
    cfg.prune.teacher = str(tiny_dir)
    r.train_queries, r.depth, r.group_size, r.batch_queries, r.steps, r.max_length = 16, 8, 4, 2, 3, 48
    r.eval_depth, r.eval_batch_size = 5, 8
    cfg.train.device, cfg.train.checkpoint_every, cfg.train.log_every = "cpu", 2, 1
    cfg.encode.batch_size = 64
    return cfg


def test_teacher_trains_with_lce_on_fused_candidates_then_skips_when_done(ranker_cfg, capsys):
    from training.ranker_teacher import ranker_data, train_teacher

    data = ranker_data(ranker_cfg)
    assert len(data.queries) == 16 and all(len(set(f)) == len(f) >= 8 for f in data.fused)
    # positive "dense": each query's first candidate is the dense teacher's top-1
    top1 = (data.query_emb @ data.passage_emb.T).argmax(1).tolist()
    assert [f[0] for f in data.fused] == top1
    import copy

    rrf_cfg = copy.deepcopy(ranker_cfg)
    rrf_cfg.ranker.positive = "rrf"
    rrf = ranker_data(rrf_cfg)
    assert [sorted(f) for f in rrf.fused] == [sorted(f) for f in data.fused]  # the same candidates, reordered
    out = train_teacher(ranker_cfg)
    assert out == ranker_cfg.run / "ranker" / "teacher"
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 1 and config["architectures"] == ["BertForSequenceClassification"]
    log = [json.loads(x) for x in (ranker_cfg.run / "checkpoints" / "ranker_teacher" / "train_log.jsonl")
           .read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in log)
    assert not (ranker_cfg.run / "checkpoints" / "ranker_teacher" / "checkpoint.pt").exists()
    assert CrossEncoder(out).levels == [100]
    capsys.readouterr()
    assert train_teacher(ranker_cfg) == out and "is up to date" in capsys.readouterr().out


def test_a_given_cross_encoder_is_the_teacher_and_a_wrong_one_fails_before_training(ranker_cfg, hf_cross_encoder,
                                                                                     tmp_path):
    import copy

    from training.ranker_teacher import train_teacher

    cfg = copy.deepcopy(ranker_cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.ranker.teacher = str(hf_cross_encoder[0])
    assert train_teacher(cfg) == hf_cross_encoder[0] and not (tmp_path / "run").exists()
    cfg.ranker.teacher = str(make_tiny_checkpoint(tmp_path / "two", num_labels=2))
    with pytest.raises(ValueError, match="the checkpoint has 2 labels, task rerank needs 1"):
        train_teacher(cfg)
    assert not (tmp_path / "run").exists()


def test_rerank_benchmark_rows_and_pseudo_label_check(ranker_cfg, tmp_path):
    from benchmarks.rerank import ROW_KEYS, run
    from training.ranker_teacher import train_teacher

    train_teacher(ranker_cfg)
    rows = run(ranker_cfg, None, None, None, None, None, tmp_path)
    assert json.loads((tmp_path / "rerank.json").read_text()) == rows
    assert all(tuple(r) == ROW_KEYS for r in rows)
    assert [(r["system"], r["first_stage"]) for r in rows] == [("bm25", "bm25"), ("dense-teacher", "bm25"),
                                                               ("ranker-teacher", "bm25")]
    bm25, dense, ranker = rows
    # candidates j = 0..5 of query i start at its judged passage: BM25 order ranks it first
    assert bm25["mrr_at_10"] == 1.0 and all(0 <= r["mrr_at_10"] <= 1 for r in rows)
    assert all(r["ndcg_at_10"] is None for r in rows)  # binary qrels
    assert ranker["gflops_per_pair"] > 0 and ranker["latency_ms_per_query"] > 0 and bm25["gflops_per_pair"] is None
    labels = json.loads((tmp_path / "rerank_labels.json").read_text())
    assert labels["queries"] == 20 and set(labels) >= {"bm25", "dense-teacher", "rrf"}
    assert all(0 <= labels[k]["p_at_1"] <= 1 for k in ("bm25", "dense-teacher", "rrf"))
    md = (tmp_path / "rerank.md").read_text()
    assert (tmp_path / "rerank.png").exists() and "Pseudo-label check" in md
    assert f"no ElasticDenser in {ranker_cfg.run}, so no dense first stage" in md
    with pytest.raises(FileNotFoundError, match=r"--denser-run .*nowhere: no elastic/model\.safetensors"):
        run(ranker_cfg, None, None, None, None, None, tmp_path, tmp_path / "nowhere")
    bad = tmp_path / "bad.tsv"
    bad.write_text("nosuchqid\tp1\t1\n")
    with pytest.raises(ValueError, match="no query of the candidate run is among the queries"):
        run(ranker_cfg, None, None, str(bad), None, None, tmp_path)


def test_a_dense_first_stage_given_as_a_run_file_is_reranked_as_its_own_stage(ranker_cfg, tmp_path):
    """--dense-candidates: the "dense" first stage read from a TREC run (e.g. one that
    --save-dense-run wrote where the ElasticDenser lives), tagged with --denser-level."""
    from benchmarks.rerank import run, write_trec_run
    from training.ranker_teacher import train_teacher

    train_teacher(ranker_cfg)
    bm25 = read_run(ranker_cfg.data.candidates)
    depth = ranker_cfg.ranker.eval_depth
    reverse = {q: pids[:depth][::-1] for q, pids in bm25.items()}  # BM25's top 5, the judged passage last
    f = tmp_path / "dense.trec"
    write_trec_run(reverse, f, "elasticdenser-50")
    assert read_run(f) == reverse
    rows = run(ranker_cfg, None, None, None, None, None, tmp_path, dense_candidates=str(f), denser_level=50)
    dense = [r for r in rows if r["first_stage"] == "dense"]
    assert [r["system"] for r in dense] == ["dense-teacher", "ranker-teacher"]
    assert all(r["denser_level"] == 50 for r in dense)
    by = {(r["system"], r["first_stage"]): r["mrr_at_10"] for r in rows}
    # the same candidate sets in another order: a reranker scores them alike
    assert by[("ranker-teacher", "dense")] == by[("ranker-teacher", "bm25")]
    assert "ElasticDenser at 50 % from the run" in (tmp_path / "rerank.md").read_text()
    with pytest.raises(ValueError, match="--dense-candidates and --denser-level go together"):
        run(ranker_cfg, None, None, None, None, None, tmp_path, dense_candidates=str(f))
    with pytest.raises(ValueError, match="give one dense first stage, not both"):
        run(ranker_cfg, None, None, None, None, None, tmp_path, tmp_path, str(f), 50)


def test_a_query_longer_than_the_pair_is_cut_rather_than_refused(hf_cross_encoder):
    """Training queries (NQ, TriviaQA) can outrun max_length on their own: the longer side of
    the pair is cut, and a short query's passage is cut as before."""
    model = CrossEncoder(hf_cross_encoder[0], max_length=16)
    long_query = " ".join(["word"] * 40)
    enc = model.pairs([long_query, "short query"], ["a short passage", " ".join(["passage"] * 40)])
    assert enc["input_ids"].shape == (2, 16)
    types = enc["token_type_ids"][1]
    assert int((types == 0).sum()) == len(model.tokenizer("short query")["input_ids"])  # the query kept whole


# ElasticRanker: LCE expressive scores, elastic distillation + LCE, static baselines (training/ranker.py)


def test_elastic_ranker_config_fails_at_load_naming_the_field(tmp_path):
    from training.config import load_config

    for body, field in (("elastic_ranker: {group_size: 1}", "elastic_ranker.group_size"),
                        ("elastic_ranker: {steps: 0}", "elastic_ranker.steps"),
                        ("elastic_ranker: {kd_temperature: 0}", "elastic_ranker.kd_temperature"),
                        ("elastic_ranker: {relation_weight: -0.5}", "elastic_ranker.relation_weight"),
                        ("elastic_ranker: {lce_weight: 0, kd_weight: 0}", "elastic_ranker.lce_weight / kd_weight"),
                        ("elastic_ranker: {warmup: 1.0}", "elastic_ranker.warmup"),
                        ("elastic_ranker: {level_weight_power: -0.5}", "elastic_ranker.level_weight_power: must be >= 0"),
                        ("elastic_ranker: {score_queries: many}", "elastic_ranker.score_queries")):
        f = tmp_path / "r.yaml"
        f.write_text(body + "\n")
        with pytest.raises(ValueError, match=f"config {field}"):
            load_config(f)


def test_pruned_ranker_levels_equal_the_teacher_with_the_lowest_scored_units_gated_off(hf_cross_encoder, tmp_path):
    from training.importance import lce_scores
    from training.ranker import export_pruned

    teacher = CrossEncoder(hf_cross_encoder[0], max_length=32)
    qs = ["what is a cross encoder", "who wrote hamlet"] * 2
    ps = ["A cross-encoder reads both.", "Hamlet is a play.", "Rain falls in spring.", "Cats sleep a lot."]
    batch = teacher.pairs(qs, ps)  # 2 groups of m = 2
    hs, ns = lce_scores(teacher, [batch], group_size=2)
    L, A, I = teacher.dims.num_hidden_layers, teacher.dims.num_attention_heads, teacher.dims.intermediate_size
    assert hs.shape == (L, A) and ns.shape == (L, I)
    assert torch.allclose(hs.norm(dim=1), torch.ones(L)) and torch.allclose(ns.norm(dim=1), torch.ones(L))
    submap = export_pruned(teacher, hs, ns, [50, 25], tmp_path / "pruned")
    pruned = CrossEncoder(tmp_path / "pruned", max_length=32)
    assert pruned.levels == [50, 25] and pruned.sublm(50) == submap.levels[50]
    for level in (50, 25):
        sub = pruned.sublm(level)
        assert sum(sub.heads) == round(level / 100 * L * A) and sum(sub.neurons) == round(level / 100 * L * I)
        xi = [torch.zeros(A) for _ in range(L)]
        nu = [torch.zeros(I) for _ in range(L)]
        for l in range(L):  # the units a level keeps are each layer's best-scored ones
            xi[l][hs[l].argsort(descending=True, stable=True)[:sub.heads[l]]] = 1
            nu[l][ns[l].argsort(descending=True, stable=True)[:sub.neurons[l]]] = 1
        with torch.no_grad():
            masked = teacher.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], head_gates=xi,
                                   neuron_gates=nu)[:, 0]
        assert torch.allclose(pruned.score(qs, ps, level), masked, atol=1e-5)


def test_elastic_ranker_objective_terms(hf_cross_encoder):
    from training.ranker import ElasticRankerObjective

    teacher = CrossEncoder(hf_cross_encoder[0], max_length=32)
    student = CrossEncoder(hf_cross_encoder[0], max_length=32, dropout=0.0)
    qs = ["q one", "q one", "q one", "q two", "q two", "q two"]
    ps = ["a b c", "d e", "f g h i", "j", "k l", "m n o"]
    batch = teacher.pairs(qs, ps)
    kd_only = ElasticRankerObjective(student, teacher, None, 3, 0.0, 1.0, 2.0, 0.0, 4)
    prep = kd_only.prepare(batch)
    assert prep["scores"].shape == (2, 3)
    assert kd_only.loss(batch, prep, 100).item() == pytest.approx(0.0, abs=1e-6)  # the student is the teacher
    lce_only = ElasticRankerObjective(student, teacher, None, 3, 1.0, 0.0, 1.0, 0.0, 4)
    assert lce_only.loss(batch, prep, 100).item() == pytest.approx(lce_loss(prep["scores"]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="relation_weight > 0 needs a relation head"):
        ElasticRankerObjective(student, teacher, None, 3, 1.0, 0.0, 1.0, 0.5, 4)


def test_elastic_ranker_recipe_trains_every_level_and_static_baselines_then_skips(ranker_cfg, tiny_elastic, tmp_path,
                                                                                   capsys):
    import copy

    from benchmarks.rerank import run as rerank
    from training.ranker import run

    cfg = copy.deepcopy(ranker_cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.prune.levels = [50, 25]
    cfg.static.levels = [25]
    e = cfg.elastic_ranker
    e.score_queries, e.score_batch_queries, e.group_size, e.batch_queries, e.steps = 4, 2, 4, 2, 3
    cfg.distill.relation_heads = 4
    run(cfg)
    root = cfg.run / "ranker"
    elastic = CrossEncoder(root / "elastic")
    assert elastic.levels == [50, 25] and (root / "pruned" / "scores.pt").exists()
    log = [json.loads(x) for x in (root / "elastic" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3]
    assert all(set(x["loss_per_level"]) == {"50", "25"} and math.isfinite(x["loss"]) for x in log)
    static = CrossEncoder(root / "static" / "25" / "model")
    assert static.levels == [25] and static.sublm(25) == elastic.sublm(25)
    assert not (root / "static" / "50").exists()
    assert not list((root / "checkpoints").rglob("checkpoint.pt"))  # dropped once each stage is done
    before = (root / "elastic" / "model.safetensors").read_bytes()
    capsys.readouterr()
    run(cfg)
    out = capsys.readouterr().out
    assert "pruned before" in out and "ranker elastic] done before" in out and "ranker static 25%] done before" in out
    assert (root / "elastic" / "model.safetensors").read_bytes() == before
    cfg.elastic_ranker.level_weight_power = 0.5  # changes the elastic run; a one-level run's weight stays 1
    run(cfg)
    out = capsys.readouterr().out
    assert "ranker elastic] done before" not in out and "ranker static 25%] done before" in out
    log = [json.loads(x) for x in (root / "elastic" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3]
    power = {d: json.loads((root / d / "stage.json").read_text())["key"]["elastic_ranker"]["level_weight_power"]
             for d in ("elastic", "static/25/model")}
    assert power == {"elastic": 0.5, "static/25/model": 0.0}
    rows = rerank(cfg, None, None, None, None, None, tmp_path / "eval")
    assert [(r["system"], r["level"]) for r in rows] == [("bm25", None), ("dense-teacher", None),
                                                         ("ranker-teacher", None), ("elastic", 50), ("elastic", 25),
                                                         ("static", 25)]
    by = {(r["system"], r["level"]): r for r in rows}
    assert by[("elastic", 25)]["gflops_per_pair"] == pytest.approx(by[("static", 25)]["gflops_per_pair"])
    assert by[("elastic", 25)]["gflops_per_pair"] < by[("elastic", 50)]["gflops_per_pair"] < \
        by[("ranker-teacher", None)]["gflops_per_pair"]
    import yaml

    from archive.build_mar import run_ranker

    mar = run_ranker(cfg, tmp_path / "store", "no-archive")  # elasticranker, editable directory
    handler = yaml.safe_load((mar / "model-config.yaml").read_text())["handler"]
    assert handler["max_passages"] == cfg.ranker.eval_depth and handler["pair_max_length"] == cfg.ranker.max_length
    assert "top_k" not in handler and (mar / "submap.json").exists() and (mar / "elastic" / "service.py").exists()
    assert json.loads((mar / "config.json").read_text())["finetuning_task"] == "rerank"

    # the two-stage pipeline over this ranker and a tiny ElasticDenser: quality table, then .mar
    from archive.build_mar import run_pipeline
    from benchmarks.pipeline_quality import run as pipeline_quality
    from elastic.service import ElasticPipelineServer, HandlerSettings, server_for

    denser_run = tmp_path / "denser"
    denser_run.mkdir()
    for sub in ("elastic", "index"):
        (denser_run / sub).symlink_to(tiny_elastic)
    col = tmp_path / "col300.tsv"  # every passage the tiny index holds
    col.write_text("".join(f"{k}\t{v}\n" for k, v in tiny_collection(300).items()))
    cfg.data.collection = str(col)
    rows = pipeline_quality(cfg, denser_run, None, None, None, [2, 4], None, tmp_path / "pq")
    assert len(rows) == 3 * (1 + 2 * 2)  # denser levels x (dense only + ranker levels x depths)
    assert all((r["depth"] == 0) == (r["ranker_level"] is None) and 0 <= r["mrr_at_10"] <= 1 for r in rows)
    g = {(r["denser_level"], r["ranker_level"], r["depth"]): r["gflops_per_query"] for r in rows}
    assert g[(50, 25, 2)] < g[(50, 25, 4)] and g[(50, None, 0)] < g[(50, 25, 2)] < g[(50, 50, 2)]
    table = json.loads((tmp_path / "pq" / "pipeline.json").read_text())["configs"]
    assert len(table) == sum(r["frontier"] for r in rows) >= 1
    best = max(rows, key=lambda r: (r["mrr_at_10"], -r["gflops_per_query"]))
    assert best["frontier"]
    reranked = rerank(cfg, None, None, None, None, None, tmp_path / "eval_dense", denser_run)
    dense = [r for r in reranked if r["first_stage"] == "dense"]
    assert {r["system"] for r in dense} == {"dense-teacher", "ranker-teacher", "elastic", "static"}
    assert all(r["denser_level"] == 50 for r in dense)  # the tiny ElasticDenser's largest SubLM
    assert f"ElasticDenser's largest SubLM from {denser_run}" in (tmp_path / "eval_dense" / "rerank.md").read_text()
    (cfg.run / "pipeline").mkdir()
    shutil.copy(tmp_path / "pq" / "pipeline.json", cfg.run / "pipeline" / "pipeline.json")
    mar = run_pipeline(cfg, denser_run, tmp_path / "store", "no-archive")
    assert {"denser", "ranker", "elastic", "index.faiss", "pids.txt", "passages.tsv.gz", "pipeline.json",
            "model-config.yaml"} <= {f.name for f in mar.iterdir()}
    server = server_for(mar, HandlerSettings(latency_constraint_ms=10_000.0, calibration_repeats=1,
                                             calibration_cache=False), max_batch=1)
    assert isinstance(server, ElasticPipelineServer) and len(server.levels) >= 1
    assert server.handle_batch([{"query": "what is a bank"}])[0].status == 200


def test_ranker_server_scores_every_passage_best_first_and_refuses_bad_requests_alone(hf_cross_encoder, tmp_path):
    from elastic.service import ElasticRankerServer, HandlerSettings, server_for
    from training.importance import lce_scores
    from training.ranker import export_pruned

    teacher = CrossEncoder(hf_cross_encoder[0], max_length=32)
    hs, ns = lce_scores(teacher, [teacher.pairs(["q"] * 4, ["a b", "c d", "e f", "g h"])], group_size=2)
    export_pruned(teacher, hs, ns, [50, 25], tmp_path / "elastic")
    settings = HandlerSettings(latency_constraint_ms=10_000.0, pin_level=25, calibration_repeats=2, max_passages=3,
                               pair_max_length=24, calibration_cache=False)
    server = server_for(tmp_path / "elastic", settings, max_batch=4)
    assert isinstance(server, ElasticRankerServer) and server.describe()["task"] == "rerank"
    assert server.levels == [50, 25]
    good = {"query": "who wrote hamlet", "passages": [{"pid": "p1", "text": "Rain falls."},
                                                      {"pid": 7, "text": "Hamlet is a play by Shakespeare. " * 5},
                                                      {"pid": "p3", "text": "Cats sleep."}]}
    bodies = [good, {"query": "q", "passages": [{"pid": "a", "text": "x"}] * 2},
              {"query": "q", "passages": [{"pid": str(i), "text": "x"} for i in range(4)]},
              {"query": "q"}, b"not json", {"query": "q", "passages": [{"pid": "a", "text": "  "}]}]
    out = server.handle_batch(bodies)
    assert [r.status for r in out] == [200, 400, 400, 400, 400, 400]
    assert out[1].payload["error"] == "passages[1].pid 'a' repeats an earlier pid"
    assert out[2].payload["error"] == '"passages" has 4 entries, the limit is 3 (handler.max_passages)'
    assert out[3].payload["error"].startswith('"passages" must be a non-empty list')
    assert "JSON object" in out[4].payload["error"]
    assert out[5].payload["error"] == "passages[0].text must be a non-empty string"
    ans = out[0].payload
    assert ans["level"] == 25 and ans["queue_size"] == 0 and ans["truncated"] == 1  # the long passage was cut
    ref = CrossEncoder(tmp_path / "elastic", max_length=24).score(
        ["who wrote hamlet"] * 3, [p["text"] for p in good["passages"]], 25)
    want = sorted(zip(["p1", "7", "p3"], ref.tolist()), key=lambda t: -t[1])
    assert [r["pid"] for r in ans["results"]] == [p for p, _ in want]
    assert [r["score"] for r in ans["results"]] == pytest.approx([v for _, v in want], abs=1e-5)
    # two requests in one batch: one forward over all pairs, each answer its own passages
    two = server.handle_batch([good, {"query": "q", "passages": [{"pid": "z", "text": "Cats sleep."}]}])
    assert [r["pid"] for r in two[0].payload["results"]] == [p for p, _ in want]
    assert [r["pid"] for r in two[1].payload["results"]] == ["z"]
    with pytest.raises(ValueError, match="handler.max_passages: must be >= 1"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "max_passages": 0})
    with pytest.raises(ValueError, match="handler.pair_max_length: must be > 8"):
        HandlerSettings.from_yaml({"latency_constraint_ms": 50, "pair_max_length": 8})


def test_relations_are_distilled_on_the_first_pairs_of_each_group(hf_cross_encoder):
    from training.ranker import ElasticRankerObjective
    from training.relations import RelationHead, relation_kl, teacher_relations

    teacher = CrossEncoder(hf_cross_encoder[0], max_length=32)
    student = CrossEncoder(hf_cross_encoder[0], max_length=32, dropout=0.0)
    head = RelationHead(teacher.dims.hidden_size, teacher.model.bert.encoder.layer[-1].attention.self)
    batch = teacher.pairs(["q one"] * 3 + ["q two"] * 3, ["a b c", "d e", "f g h i", "j", "k l", "m n o"])
    obj = ElasticRankerObjective(student, teacher, head, 3, 0.0, 0.0, 1.0, 1.0, 4, relation_pairs=2)
    prep = obj.prepare(batch)
    assert prep["rows"].tolist() == [0, 1, 3, 4]
    sub = {k: v[[0, 1, 3, 4]] for k, v in batch.items()}
    want = teacher_relations(teacher.model.bert, sub, 4)
    assert all(torch.allclose(prep["relations"][k], want[k]) for k in want)
    with torch.no_grad():
        h = student.model.bert(sub["input_ids"], sub["attention_mask"], sub["token_type_ids"])
        ref = relation_kl(want, head(h, sub["attention_mask"], 4), sub["attention_mask"])
        assert obj.loss(batch, prep, 100).item() == pytest.approx(ref.item(), rel=1e-5)
