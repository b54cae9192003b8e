"""ElasticLM on GLUE: task files, the classifier, the loss, the metrics, the recipe's checks and a
tiny end-to-end run (tiny odd-sized BERT, a few GLUE rows written by the test)."""

import json
from pathlib import Path

import pytest
import torch

from elastic.classifier import GlueModel
from elastic.glue import TASKS, get_task, predictions, read_glue, score
from training.config import RecipeConfig, load_config, validate
from training.glue_loss import glue_loss, logit_kd, task_loss

from conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- task files ---------------------------------------------------------------------------------

def test_packed_files_read_with_the_documented_sizes():
    sizes = {("SST-2", "dev"): 872, ("MRPC", "train"): 3668, ("MRPC", "dev"): 408, ("STS-B", "dev"): 1500,
             ("RTE", "train"): 2490, ("RTE", "dev"): 277}
    for (name, split), n in sizes.items():
        ds = read_glue(ROOT / "data" / "glue" / f"{name}.{split}.tsv.gz", TASKS[name])
        assert len(ds) == n
        assert (ds.text_b is None) == (name == "SST-2")
    sts = read_glue(ROOT / "data" / "glue" / "STS-B.dev.tsv.gz", TASKS["STS-B"])
    assert sts.labels.dtype == torch.float32 and 0 <= sts.labels.min() and sts.labels.max() <= 5
    mrpc = read_glue(ROOT / "data" / "glue" / "MRPC.dev.tsv.gz", TASKS["MRPC"])
    assert mrpc.text_a[0].startswith("He said the foodservice pie")  # quotes are text, not CSV quoting
    assert set(mrpc.labels.tolist()) == {0, 1}


def test_missing_column_names_file_and_column(tmp_path):
    f = write(tmp_path / "RTE.train.tsv", "sentence1\tlabel\nA.\t0\n")
    with pytest.raises(ValueError, match=r"RTE.train.tsv: column 'sentence2' is missing"):
        read_glue(f, TASKS["RTE"])


def test_unknown_label_names_file_and_line(tmp_path):
    f = write(tmp_path / "SST-2.train.tsv", "sentence\tlabel\ngood .\t1\nbad .\tnegative\n")
    with pytest.raises(ValueError, match=r"SST-2.train.tsv: line 3: unknown label 'negative' for SST-2"):
        read_glue(f, TASKS["SST-2"])


def test_stsb_score_outside_range(tmp_path):
    f = write(tmp_path / "STS-B.dev.tsv", "sentence1\tsentence2\tscore\na\tb\t5.5\n")
    with pytest.raises(ValueError, match=r"line 2: score '5.5' is not a score in \[0, 5\]"):
        read_glue(f, TASKS["STS-B"])


def test_short_row_and_missing_file(tmp_path):
    f = write(tmp_path / "RTE.dev.tsv", "sentence1\tsentence2\tlabel\nA.\t0\n")
    with pytest.raises(ValueError, match="line 2 has 2 fields, the header has 3"):
        read_glue(f, TASKS["RTE"])
    with pytest.raises(FileNotFoundError, match="GLUE RTE file not found"):
        read_glue(tmp_path / "nope.tsv", TASKS["RTE"])


def test_unknown_task_name():
    with pytest.raises(ValueError, match="GLUE task 'QNLI' is not one of"):
        get_task("QNLI")


@pytest.mark.parametrize("yaml_text, message", [
    ("glue:\n  tasks: [SST-2, MNLI]\n", "config glue.tasks: 'MNLI' is not one of"),
    ("glue:\n  kd_weight: 1.5\n", r"config glue.kd_weight: alpha must be in \[0, 1\]"),
    ("glue:\n  epochs: 0\n", "config glue.epochs: must be > 0"),
    ("glue:\n  pooling: max\n", "config glue.pooling: expected 'cls' or 'mean', got 'max'"),
    ("glue:\n  level_weight_power: -0.5\n", r"config glue.level_weight_power: must be >= 0 \(0 = uniform\), got -0.5"),
    ("glue:\n  max_epoch_examples: -1\n", "config glue.max_train_examples / max_epoch_examples / length_window: must "
                                           "be >= 0"),
    ("distill:\n  pair_fraction: 1.5\n", r"config distill.pair_fraction: a probability in \[0, 1\], got 1.5"),
])
def test_config_checks_glue_fields(tmp_path, yaml_text, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path / "bad.yaml", yaml_text))


def test_an_epoch_of_a_large_task_counts_max_epoch_examples():
    from training.glue import finetune_steps

    assert finetune_steps(3, 6000, 32) == 563  # ceil(3 * 6000 / 32): every example is an epoch
    assert finetune_steps(3, 60614, 32, max_epoch_examples=6000) == 563  # SST-2: the 6,000 sample's steps
    assert finetune_steps(3, 2490, 32, max_epoch_examples=6000) == 234  # a smaller task: all of its examples
    assert finetune_steps(0.01, 10, 32) == 1


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_match_hand_computed_values():
    gold = torch.tensor([1, 0, 1, 1])
    pred = torch.tensor([1, 1, 0, 1])
    assert score(TASKS["RTE"], pred, gold) == {"accuracy": 50.0}
    s = score(TASKS["MRPC"], pred, gold)  # tp 2, fp 1, fn 1 -> F1 = 2/3
    assert s["f1"] == pytest.approx(200 / 3) and s["accuracy"] == 50.0
    s = score(TASKS["STS-B"], torch.tensor([0.1, 0.5, 0.2, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert s["spearman"] == pytest.approx(100.0)  # same order
    assert s["pearson"] < 100.0
    assert predictions(TASKS["SST-2"], torch.tensor([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]
    assert predictions(TASKS["STS-B"], torch.tensor([[3.5], [1.0]])).tolist() == [3.5, 1.0]


# --- loss ---------------------------------------------------------------------------------------

def test_kd_is_zero_at_the_teacher_and_scaled_by_temperature_squared():
    t = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    assert logit_kd(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    for tau in (1.0, 3.0):
        p = torch.softmax(t / tau, -1)
        manual = (p * (p.log() - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
        assert logit_kd(s, t, tau).item() == pytest.approx(manual.item(), rel=1e-5)
    reg = logit_kd(torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [2.0]]), 2.0)  # STS-B: MSE, no temperature
    assert reg.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"student logits \(2, 1\) vs teacher \(2, 2\)"):
        logit_kd(torch.zeros(2, 1), torch.zeros(2, 2), 1.0)


def test_glue_loss_mixes_task_and_kd():
    s, t, y = torch.tensor([[0.3, -0.2]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert glue_loss(s, y, None, 0.5, 2.0).item() == pytest.approx(task_loss(s, y).item())
    mixed = 0.25 * task_loss(s, y) + 0.75 * logit_kd(s, t, 2.0)
    assert glue_loss(s, y, t, 0.75, 2.0).item() == pytest.approx(mixed.item())
    assert task_loss(torch.tensor([[2.0]]), torch.tensor([3.0])).item() == pytest.approx(1.0)  # regression: MSE


# --- classifier ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory) -> tuple[Path, object]:
    """A tiny transformers BertForSequenceClassification (hidden 32, 4 heads, intermediate 37)."""
    from transformers import BertForSequenceClassification

    out = make_tiny_checkpoint(tmp_path_factory.mktemp("hfcls"), num_labels=2)
    return out, BertForSequenceClassification.from_pretrained(out).eval()


PAIRS = (["A man plays a guitar.", "Two dogs run in the park on a sunny day."], ["Someone plays music.", "Dogs run."])


def test_classifier_equals_transformers(hf_classifier):
    path, hf = hf_classifier
    ours = GlueModel(path, TASKS["RTE"])
    tok = ours.tokenizer(*PAIRS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**tok).logits
    assert torch.allclose(ours.predict_logits(*PAIRS, level=100), ref, atol=1e-5)


def test_teacher_with_other_label_count_is_refused(hf_classifier):
    with pytest.raises(ValueError, match="the checkpoint has 2 labels, task STS-B needs 1"):
        GlueModel(hf_classifier[0], TASKS["STS-B"])


@pytest.fixture(scope="module")
def glue_elastic(hf_classifier, tmp_path_factory) -> Path:
    """An elastic RTE model directory (levels 50/30/10, random expressive scores) as training/glue.py writes."""
    from elastic.encoder import ElasticEncoder
    from training.prune import export_pruned

    out = tmp_path_factory.mktemp("glue_elastic")
    g = torch.Generator().manual_seed(2)
    export_pruned(ElasticEncoder(hf_classifier[0]), torch.rand(2, 4, generator=g), torch.rand(2, 37, generator=g),
                  [50, 30, 10], out / "pruned")
    model = GlueModel(out / "pruned", TASKS["RTE"], seed=3)
    model.model.classifier.weight.data.normal_(0, 1.0)
    model.save(out / "elastic")
    return out / "elastic"


def test_mean_pooling_reads_the_unpadded_tokens_and_survives_save_and_cut(glue_elastic, tmp_path):
    """A mean-pooling classifier averages exactly the tokens its mask keeps (padding changes
    nothing), differs from [CLS] pooling, and keeps its pooling through save, load and cut."""
    cls = GlueModel(glue_elastic, TASKS["RTE"])
    mean = GlueModel(glue_elastic, TASKS["RTE"])
    mean.model.pooling = "mean"
    tok = mean.tokenizer(*PAIRS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = mean.model.bert(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], sublm=mean.sublm(30))
        m = tok["attention_mask"].unsqueeze(-1).float()
        by_hand = mean.model.classifier(torch.tanh(mean.model.pooler.dense((h * m).sum(1) / m.sum(1))))
    batched = mean.predict_logits(*PAIRS, level=30)  # both rows in one padded batch
    alone = torch.cat([mean.predict_logits([a], [b], level=30) for a, b in zip(*PAIRS)])  # no padding
    assert torch.allclose(batched, by_hand, atol=1e-5) and torch.allclose(batched, alone, atol=1e-5)
    assert not torch.allclose(batched, cls.predict_logits(*PAIRS, level=30), atol=1e-3)
    mean.save(tmp_path / "mean")
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["classifier_pooling"] == "mean"
    again = GlueModel(tmp_path / "mean", TASKS["RTE"], pooling="cls")  # a stored head keeps its own pooling
    assert again.model.pooling == "mean"
    again.cut(10, tmp_path / "cut10")
    cut = GlueModel(tmp_path / "cut10", TASKS["RTE"])
    assert cut.model.pooling == "mean"
    assert torch.allclose(cut.predict_logits(*PAIRS, level=10), mean.predict_logits(*PAIRS, level=10), atol=1e-5)
    with pytest.raises(ValueError, match="mean pooling needs the attention mask"):
        mean.model.head(h)
    config = json.loads((tmp_path / "mean" / "config.json").read_text())
    (tmp_path / "mean" / "config.json").write_text(json.dumps({**config, "classifier_pooling": "max"}))
    with pytest.raises(ValueError, match=r"mean: classifier_pooling must be one of \('cls', 'mean'\), got 'max'"):
        GlueModel(tmp_path / "mean", TASKS["RTE"])


def test_linear_probe_features_are_the_masked_mean_of_the_sublm_with_one_more_head(glue_elastic):
    from benchmarks.linear_probe import features, with_head

    model = GlueModel(glue_elastic, TASKS["RTE"])
    sub = model.sublm(10)
    more = with_head(sub, 0)
    assert more.heads[0] == sub.heads[0] + 1 and more.heads[1:] == sub.heads[1:] and more.neurons == sub.neurons
    x = features(model, *PAIRS, more, batch_size=1)  # one example per batch: no padding
    tok = model.tokenizer(*PAIRS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.model.bert(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], sublm=more)
    m = tok["attention_mask"].unsqueeze(-1).float()
    assert x.shape == (2, model.dims.hidden_size) and torch.allclose(x, (h * m).sum(1) / m.sum(1), atol=1e-5)


def test_saved_then_sliced_equals_cut(glue_elastic, tmp_path):
    """An elastic GLUE model at level p computes what its physically pruned copy computes."""
    elastic = GlueModel(glue_elastic, TASKS["RTE"])
    assert json.loads((glue_elastic / "config.json").read_text())["id2label"] == {"0": "entailment",
                                                                                  "1": "not_entailment"}
    for level in (50, 10):
        elastic.cut(level, tmp_path / f"cut{level}")
        cut = GlueModel(tmp_path / f"cut{level}", TASKS["RTE"])
        assert cut.levels == [level]
        assert torch.allclose(elastic.predict_logits(*PAIRS, level=level), cut.predict_logits(*PAIRS, level=level),
                              atol=1e-5)
    assert not torch.allclose(elastic.predict_logits(*PAIRS, level=50), elastic.predict_logits(*PAIRS, level=10))


# --- the recipe ---------------------------------------------------------------------------------

def glue_data(d: Path) -> Path:
    """Tiny RTE and STS-B files (train 40 rows, dev 16) cut from the packed ones."""
    d.mkdir(parents=True, exist_ok=True)
    import gzip

    for name in ("RTE", "STS-B"):
        for split, n in (("train", 40), ("dev", 16)):
            with gzip.open(ROOT / "data" / "glue" / f"{name}.{split}.tsv.gz", "rt") as f:
                lines = [next(f) for _ in range(n + 1)]
            (d / f"{name}.{split}.tsv").write_text("".join(lines))
    return d


def tiny_recipe(tmp_path: Path, teacher: Path, extra: str = "") -> Path:
    return write(tmp_path / "glue.yaml", f"""
run_dir: {tmp_path / 'run'}
train: {{checkpoint_every: 2, log_every: 1}}
prune: {{teacher: {teacher}, levels: [50, 20], score_objective: relation, score_queries: 8, batch_size: 4}}
distill: {{enabled: true, steps: 2, batch_size: 4, max_length: 32, relation_heads: 4, pair_fraction: 1.0}}
glue: {{tasks: [RTE, STS-B], data_dir: {glue_data(tmp_path / 'glue')}, teacher_epochs: 0.2, epochs: 0.2,
        batch_size: 8, eval_batch_size: 8}}
{extra}""")


def test_bad_teacher_fails_before_any_training(tmp_path, tiny_dir, hf_classifier):
    from training.glue import run

    cfg = load_config(tiny_recipe(tmp_path, tiny_dir))
    cfg.glue.teachers = {"STS-B": str(hf_classifier[0])}
    with pytest.raises(ValueError, match="the checkpoint has 2 labels, task STS-B needs 1"):
        run(cfg)
    assert not (tmp_path / "run" / "pruned").exists()
    cfg.glue.teachers = {}
    bad = tmp_path / "glue" / "RTE.dev.tsv"
    bad.write_text(bad.read_text().replace("\t1\t", "\tmaybe\t", 1))
    with pytest.raises(ValueError, match="RTE.dev.tsv: line .*: unknown label 'maybe' for RTE"):
        run(cfg)
    assert not (tmp_path / "run" / "pruned").exists()


def test_recipe_end_to_end_and_resume(tmp_path, tiny_dir, capsys):
    from benchmarks.glue import evaluate, glue_scores, markdown, targets
    from training.glue import run

    cfg = load_config(tiny_recipe(tmp_path, tiny_dir))
    cfg.glue.pooling = "mean"
    run(cfg)
    r = tmp_path / "run"
    for d in ("pruned", "distilled", "static/50/distilled", "static/20/distilled", "glue/RTE/teacher",
              "glue/RTE/elastic", "glue/RTE/static/50", "glue/STS-B/static/20"):
        assert (r / d / "model.safetensors").exists(), d
    for d in ("teacher", "elastic", "static/20"):  # students pool as their teacher does
        assert json.loads((r / "glue" / "STS-B" / d / "config.json").read_text())["classifier_pooling"] == "mean"
    assert not (r / "glue" / "RTE" / "checkpoints" / "elastic" / "checkpoint.pt").exists()  # dropped when done
    assert GlueModel(r / "glue" / "RTE" / "elastic", TASKS["RTE"]).levels == [50, 20]
    capsys.readouterr()
    run(cfg)  # everything done: nothing trains again
    assert capsys.readouterr().out.count("done before") == 2 * (1 + 1 + 2)
    teacher_bytes = (r / "glue" / "RTE" / "teacher" / "model.safetensors").read_bytes()
    cfg.glue.epochs, cfg.glue.kd_weight = 0.4, 0.3  # the students' budget and loss only
    run(cfg)
    out = capsys.readouterr().out
    assert out.count("done before") == 2  # the two teachers; every student trains again
    assert "RTE elastic] step" in out and "STS-B static 20%] step" in out and "teacher] step" not in out
    assert (r / "glue" / "RTE" / "teacher" / "model.safetensors").read_bytes() == teacher_bytes
    key = json.loads((r / "glue" / "RTE" / "elastic" / "stage.json").read_text())["key"]
    assert "level_weight_power" not in key["glue"]  # at 0, runs written before the field keep their key
    cfg.glue.level_weight_power = 0.5  # weighs the elastic run's levels; a static run has one level, weight 1
    run(cfg)
    out = capsys.readouterr().out
    assert out.count("done before") == 2 + 2 * 2  # the teachers and every static level
    assert "RTE elastic] step" in out and "STS-B elastic] step" in out and "STS-B static 20%] step" not in out
    key = json.loads((r / "glue" / "RTE" / "elastic" / "stage.json").read_text())["key"]
    assert key["glue"]["level_weight_power"] == 0.5
    log = [json.loads(x) for x in (r / "glue" / "RTE" / "elastic" / "train_log.jsonl").read_text().splitlines()]
    assert all(set(x["loss_per_level"]) == {"50", "20"} for x in log)
    rows, extra = evaluate(cfg)
    assert all(set(row) == {"task", "system", "level", "metric", "score", "gflops"} for row in rows)
    assert {(row["task"], row["system"], row["level"]) for row in rows} == {
        (t, s, lv) for t in ("RTE", "STS-B") for s, lv in
        (("teacher", None), ("elastic", 50), ("elastic", 20), ("static", 50), ("static", 20))}
    assert all(0 <= row["score"] <= 100 for row in rows if row["metric"] == "accuracy")
    gf = {(row["system"], row["level"]): row["gflops"] for row in rows}
    assert gf[("teacher", None)] > gf[("elastic", 50)] > gf[("elastic", 20)] == gf[("static", 20)]
    g = glue_scores(rows, ["RTE", "STS-B"])
    assert set(g) == {("teacher", None), ("elastic", 50), ("elastic", 20), ("static", 50), ("static", 20)}
    assert len(targets(rows, ["RTE", "STS-B"])) == 3  # the 50 % ratio line and two elastic-vs-static lines
    md = markdown(rows, extra, cfg, ["RTE", "STS-B"], "cmd", 1.0)
    assert "| static (w/o elasticity) | 20 % |" in md and "GLUE score" in md
    # a second held-out file: rows among the training texts are dropped; the recipe's models and the same
    # teacher and static models as the recipe's own dev scoring
    import sys

    from benchmarks import glue_heldout

    train_lines = (tmp_path / "glue" / "RTE.train.tsv").read_text().splitlines(keepends=True)
    dev_lines = (tmp_path / "glue" / "RTE.dev.tsv").read_text().splitlines(keepends=True)
    held = write(tmp_path / "held.tsv", "".join(dev_lines + train_lines[1:4]))  # 16 dev rows + 3 training rows
    sys.argv = ["glue_heldout", "--task", "RTE", "--file", str(held), "--config", str(tmp_path / "glue.yaml"),
                "--out", str(tmp_path / "held.json")]
    glue_heldout.main()
    res = json.loads((tmp_path / "held.json").read_text())
    assert res["n"] == 16 and [(r["system"], r["level"]) for r in res["rows"]] == [
        ("teacher", None), ("elastic", 50), ("elastic", 20), ("static", 50), ("static", 20)]
    dev_acc = {(r["system"], r["level"]): r["score"] for r in rows if r["task"] == "RTE"}
    assert all(r["accuracy"] == dev_acc[(r["system"], r["level"])] for r in res["rows"])  # the dev rows, scored alike


# --- serving: the same elastic schedule, a classification task ------------------------------------

def test_classifier_server_answers_like_the_model(glue_elastic):
    from elastic.service import ElasticClassifierServer, HandlerSettings, server_for

    server = server_for(glue_elastic, HandlerSettings(latency_constraint_ms=1000.0, pin_level=30, calibration_repeats=2),
                        max_batch=4)
    assert isinstance(server, ElasticClassifierServer) and server.describe()["task"] == "glue:RTE"
    long = "word " * 300
    bodies = [{"text": PAIRS[0][0], "text_pair": PAIRS[1][0]}, {"text": "only one"}, b"not json",
              {"text": long, "text_pair": "short."}]
    out = server.handle_batch(bodies)
    assert [r.status for r in out] == [200, 400, 400, 200]
    assert out[1].payload == {"error": '"text_pair" must be a non-empty string'}
    assert "JSON object" in out[2].payload["error"]
    first = out[0].payload
    assert first["level"] == 30 and first["truncated"] is False and out[3].payload["truncated"] is True
    probs = torch.softmax(GlueModel(glue_elastic, TASKS["RTE"]).predict_logits([PAIRS[0][0]], [PAIRS[1][0]], 30), -1)[0]
    assert first["probabilities"]["entailment"] == pytest.approx(float(probs[0]), abs=1e-5)
    assert first["label"] == ("entailment" if probs[0] > probs[1] else "not_entailment")
    assert out[0].headers["Server-Timing"].startswith("wait;dur=")


def test_server_for_refuses_a_plain_checkpoint(tiny_dir):
    from elastic.service import HandlerSettings, server_for

    with pytest.raises(ValueError, match="neither a retrieval model"):
        server_for(tiny_dir, HandlerSettings(latency_constraint_ms=50.0))


def test_handler_serves_a_glue_model_over_mock_context(glue_elastic):
    from handler.elastic_handler import ElasticDenserHandler
    from test_service import MockContext

    ctx = MockContext(glue_elastic, {"batchSize": 2, "handler": {"latency_constraint_ms": 500, "calibration_repeats": 2,
                                                                 "management_address": "http://127.0.0.1:9"}})
    h = ElasticDenserHandler()
    h.initialize(ctx)
    try:
        out = h.handle([{"body": {"text": "A dog runs.", "text_pair": "An animal moves."}}, {"body": {"text": ""}}], ctx)
        assert out[0]["level"] == 50 and set(out[0]["probabilities"]) == {"entailment", "not_entailment"}
        assert ctx.statuses == {1: (400, '"text" must be a non-empty string')}
    finally:
        h.poller.stop()


def test_relation_scores_rank_every_layer_and_zero_a_unit_without_effect(tiny_dir):
    """Task-agnostic expressive scores (|∂L_ALN/∂gate|): a head or neuron that writes nothing
    scores 0, the others > 0, in every layer, including the last (the relation loss reads the
    last layer's output through the additional MHA block)."""
    from elastic.encoder import ElasticEncoder
    from training.importance import relation_scores

    enc = ElasticEncoder(tiny_dir)
    d_head = enc.dims.hidden_size // enc.dims.num_attention_heads
    with torch.no_grad():  # head 1 of layer 1 and neuron 7 of layer 0 write nothing
        enc.model.encoder.layer[1].attention.output.dense.weight[:, d_head:2 * d_head] = 0
        enc.model.encoder.layer[0].output.dense.weight[:, 7] = 0
    texts = [["the cat sat on the mat", "a bank is a financial institution"], ["rivers flow to the sea"]]
    hs, ns = relation_scores(enc, texts, 32, 4)
    assert hs.shape == (2, 4) and ns.shape == (2, 37)
    assert torch.allclose(hs.norm(dim=1), torch.ones(2)) and torch.allclose(ns.norm(dim=1), torch.ones(2))
    assert hs[1, 1] == 0 and ns[0, 7] == 0
    assert (hs[:, [0, 2, 3]] > 0).all() and (ns[1] > 0).all()
    with pytest.raises(ValueError, match="at least one batch"):
        relation_scores(enc, [], 32, 4)
    # the same texts as (A, B) pairs: segment ids 1 on B, other relations, so other scores
    pairs = [[("the cat sat", "on the mat"), ("a bank is", "a financial institution")], [("rivers flow", "to the sea")]]
    tok = enc.tokenize(pairs[0], 32)
    assert tok["token_type_ids"][0].tolist().count(1) == len(enc.tokenizer("on the mat", add_special_tokens=False)
                                                             ["input_ids"]) + 1  # B and its [SEP]
    hp, npair = relation_scores(enc, pairs, 32, 4)
    assert hp[1, 1] == 0 and npair[0, 7] == 0
    assert not torch.allclose(hp, hs, atol=1e-3)


def test_unlabeled_batches_mix_text_pairs_as_bert_pretraining_input():
    import random

    from training.distill import unlabeled_batch

    texts = [f"w{i}a w{i}b w{i}c w{i}d" for i in range(300)] + ["single"]
    assert unlabeled_batch(random.Random(3), texts, 8, 0.0) == random.Random(3).sample(texts, 8)
    batch = unlabeled_batch(random.Random(3), texts, 200, 1.0)
    assert all(isinstance(x, tuple) and len(x) == 2 for x in batch)
    first_halves = {" ".join(t.split()[:max(1, len(t.split()) // 2)]) for t in texts}
    assert all(a in first_halves for a, _ in batch)
    same = sum(a.split()[0][:-1] == b.split()[0][:-1] for a, b in batch)  # B from A's own text
    assert 60 < same < 140  # half of the pairs, the rest from another text
    assert unlabeled_batch(random.Random(0), ["single"], 1, 1.0) == [("single", "single")]
    kinds = [isinstance(unlabeled_batch(random.Random(s), texts, 2, 0.3)[0], tuple) for s in range(400)]
    assert 80 < sum(kinds) < 160  # a 0.3 share of the batches are pairs


def test_classifier_scores_zero_a_unit_without_effect_and_follow_the_task_loss(hf_classifier):
    """GLUE task-loss expressive scores (|∂L_task/∂gate|): a head or neuron that writes nothing
    scores 0, every row has norm 1 (eq. 5), and other labels (another loss) give other scores."""
    from training.importance import classifier_scores

    m = GlueModel(hf_classifier[0], TASKS["RTE"])
    d_head = m.dims.hidden_size // m.dims.num_attention_heads
    with torch.no_grad():  # head 3 of layer 0 and neuron 11 of layer 1 write nothing
        m.model.bert.encoder.layer[0].attention.output.dense.weight[:, 3 * d_head:4 * d_head] = 0
        m.model.bert.encoder.layer[1].output.dense.weight[:, 11] = 0
    m.model.eval()
    enc = m.tokenize(*PAIRS)
    batch = m.collate(enc, [0, 1])
    hs, ns = classifier_scores(m.model, [{**batch, "labels": torch.tensor([0, 1])}])
    assert hs.shape == (2, 4) and ns.shape == (2, 37)
    assert torch.allclose(hs.norm(dim=1), torch.ones(2)) and torch.allclose(ns.norm(dim=1), torch.ones(2))
    assert hs[0, 3] == 0 and ns[1, 11] == 0 and (hs[0, :3] > 0).all() and (ns[1, :11] > 0).all()
    other, _ = classifier_scores(m.model, [{**batch, "labels": torch.tensor([1, 0])}])
    assert not torch.allclose(hs, other, atol=1e-3)
    with pytest.raises(ValueError, match="at least one batch"):
        classifier_scores(m.model, [])


def test_glue_task_structure_comes_from_the_task_teachers_and_a_change_reprunes(tmp_path, tiny_dir, capsys):
    """prune.score_objective glue_task: the teachers are fine-tuned first and their summed task
    scores order the units; prune.json records it; switching the objective prunes again and
    retrains what follows, switching back to the same key keeps the stage."""
    from training.glue import run
    from training.prune import run as prune_run

    cfg = load_config(tiny_recipe(tmp_path, tiny_dir))
    cfg.prune.score_objective = "glue_task"
    cfg.static.enabled = False
    run(cfg)
    r = tmp_path / "run"
    made = json.loads((r / "pruned" / "prune.json").read_text())
    assert made["score_objective"] == "glue_task" and set(made["task_teachers"]) == {"RTE", "STS-B"}
    scores = torch.load(r / "pruned" / "scores.pt")
    assert torch.allclose(scores["head_scores"].norm(dim=1), torch.ones(2))
    fp = (r / "distilled" / "model.safetensors").read_bytes()
    capsys.readouterr()
    run(cfg)
    assert "pruned by" not in capsys.readouterr().out  # same key: not pruned again
    cfg.prune.score_objective = "relation"
    run(cfg)
    out = capsys.readouterr().out
    assert "pruned by relation expressive scores" in out
    assert json.loads((r / "pruned" / "prune.json").read_text())["score_objective"] == "relation"
    assert (r / "distilled" / "model.safetensors").read_bytes() != fp  # distilled again from the new structure
    cfg.prune.score_objective = "glue_task"
    with pytest.raises(ValueError, match="'glue_task' ranks units by the GLUE teachers' task losses"):
        prune_run(cfg)


def test_archive_packs_only_serve_levels_and_refuses_what_it_cannot_keep(glue_elastic, tmp_path):
    """serve.levels: the archive's submap.json holds only the chosen levels, the weights are the
    model's own, and the server built from the archive schedules among those levels only."""
    from archive.build_mar import build_mar
    from elastic.service import HandlerSettings, server_for

    cfg = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 2, "responseTimeout": 120,
           "handler": {"latency_constraint_ms": 1000.0}}
    out = build_mar(glue_elastic, None, tmp_path / "store", cfg, name="rte", archive_format="no-archive",
                    levels=[50, 30])
    assert json.loads((out / "submap.json").read_text())["levels"].keys() == {"50", "30"}
    assert (out / "model.safetensors").read_bytes() == (glue_elastic / "model.safetensors").read_bytes()
    server = server_for(out, HandlerSettings(latency_constraint_ms=1000.0, calibration_repeats=2), max_batch=2)
    assert server.levels == [50, 30]
    with pytest.raises(ValueError, match=r"config serve.levels: \[20\] are not levels of the model's submap.json"):
        build_mar(glue_elastic, None, tmp_path / "store", cfg, name="rte2", archive_format="no-archive",
                  levels=[50, 20])
    with pytest.raises(ValueError, match="config serve.levels: must keep the largest level, 50"):
        build_mar(glue_elastic, None, tmp_path / "store", cfg, name="rte3", archive_format="no-archive", levels=[30])
    bad = RecipeConfig()
    bad.serve.levels = [40, 5]
    with pytest.raises(ValueError, match=r"config serve.levels: \[40, 5\] must be levels of prune.levels .* keep the "
                                         r"largest, 50"):
        validate(bad)
