"""Elastic optimization: MiniLMv2 relations (eq. 7-8), the retrieval loss (eq. 9), Algorithm 1's
per-SubLM accumulation, checkpoints and resumption, static baselines, and bad input failing
before any training step."""

import json
import math

import pytest
import torch

from elastic.encoder import ElasticEncoder
from tests.test_training import P, Q
from training.config import RecipeConfig, validate
from training.distill import RelationObjective, _Student, check_pair, distill
from training.finetune import RetrievalObjective, retrieval_loss
from training.loop import LoopConfig, level_weights, train_elastic
from training.relations import RelationHead, log_relations, relation_kl, teacher_relations
from training.static import cut_level


def test_log_relations_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rel = log_relations(x, mask, 3)  # R = 3, d_r = 4
    assert rel.shape == (2, 3, 5, 5)
    for b in range(2):
        n = int(mask[b].sum())
        for j in range(3):
            xj = x[b, :, 4 * j:4 * j + 4]
            want = torch.softmax(xj @ xj[:n].T / math.sqrt(4), dim=-1)  # (T, n): keys are the real tokens only
            assert torch.allclose(rel[b, j, :, :n].exp(), want, atol=1e-6)
            assert torch.all(rel[b, j, :, n:].exp() == 0)
    with pytest.raises(ValueError, match="hidden size 12 is not divisible by R = 5"):
        log_relations(x, mask, 5)


def test_relation_head_from_teacher_reproduces_teacher_relations(tiny_dir):
    """Fed the input of the teacher's last layer, a relation head initialised from that layer
    gives the teacher's relations: KL 0. Other inputs give a positive KL."""
    teacher = ElasticEncoder(tiny_dir)
    b = teacher.tokenize(Q + P, 32)
    t = teacher_relations(teacher.model, b, 4)
    head = RelationHead(32, teacher.model.encoder.layer[-1].attention.self)
    states = teacher.model(b["input_ids"], b["attention_mask"], all_hidden_states=True)
    with torch.no_grad():
        assert relation_kl(t, head(states[-2], b["attention_mask"], 4), b["attention_mask"]).abs() < 1e-5
        other = torch.randn(states[-2].shape, generator=torch.Generator().manual_seed(0)) * 3
        assert relation_kl(t, head(other, b["attention_mask"], 4), b["attention_mask"]) > 1e-2


def _distill_cfg(tmp_path) -> RecipeConfig:
    cfg = RecipeConfig(run_dir=str(tmp_path))
    cfg.distill.steps, cfg.distill.batch_size, cfg.distill.max_length, cfg.distill.lr = 6, 4, 32, 3e-4
    cfg.distill.relation_heads = 4
    cfg.train.checkpoint_every, cfg.train.log_every, cfg.train.device = 3, 1, "cpu"
    return cfg


def _relation_losses(student, teacher, head, batch, R=4):
    obj = RelationObjective(student, teacher, head, R)
    with torch.no_grad():
        prep = obj.prepare(batch)
        return {lv: obj.loss(batch, prep, lv).item() for lv in student.levels}


def test_elastic_distillation_lowers_every_sublm_loss(tiny_dir, tiny_elastic, tmp_path):
    student, teacher = ElasticEncoder(tiny_elastic), ElasticEncoder(tiny_dir)
    head = RelationHead(32, teacher.model.encoder.layer[-1].attention.self)
    batch = student.tokenize(Q + P, 32)
    before = _relation_losses(student, teacher, head, batch)
    lc = LoopConfig(15, 3e-4, 0.0, 0.0, 5.0, 0, 15, 5)
    recs = train_elastic(_Student(student.model, head), student.levels, lambda rng: batch,
                         RelationObjective(student, teacher, head, 4), lc, tmp_path / "w", {"t": 1}, torch.device("cpu"),
                         "test")
    after = _relation_losses(student, teacher, head, batch)
    assert [r["step"] for r in recs] == [5, 10, 15]
    assert set(recs[0]["loss_per_level"]) == {"50", "30", "10"} and recs[-1]["peak_mem_mib"] > 0
    assert all(after[lv] < before[lv] for lv in student.levels), (before, after)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_dir, tiny_elastic, tmp_path):
    texts = Q + P + ["the cat sat on the mat", "paris is the capital of france"]

    def train(workdir, stop_at=None):
        student, teacher = ElasticEncoder(tiny_elastic), ElasticEncoder(tiny_dir)
        head = RelationHead(32, teacher.model.encoder.layer[-1].attention.self)
        seen = []

        def sample(rng):
            if stop_at is not None and len(seen) == stop_at:
                raise _Interrupt
            seen.append(1)
            return student.tokenize(rng.sample(texts, 3), 32)

        lc = LoopConfig(6, 3e-4, 0.01, 0.2, 1.0, 7, 2, 1)
        train_elastic(_Student(student.model, head), student.levels, sample, RelationObjective(student, teacher, head, 4),
                      lc, workdir, {"t": 1}, torch.device("cpu"), "test")
        return student.model.state_dict(), head.state_dict()

    straight = train(tmp_path / "a")
    with pytest.raises(_Interrupt):
        train(tmp_path / "b", stop_at=3)  # dies during step 4; the checkpoint holds step 2
    resumed = train(tmp_path / "b")
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lines = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) >= 6


class _DropoutObjective:
    """A stage whose loss draws dropout masks from torch's RNG, as the ranker and GLUE heads do."""

    def __init__(self, net):
        self.net = net

    def prepare(self, batch):
        return None

    def loss(self, batch, prep, level):
        return (torch.nn.functional.dropout(self.net(batch), 0.5, training=True) ** 2).mean()

    def finish(self, prep):
        pass


def test_resume_with_dropout_equals_an_uninterrupted_run(tmp_path):
    """The checkpoint holds torch's RNG state: after a resume, dropout draws the masks the
    uninterrupted run drew (without it the weights differ from the step after the resume on)."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))

    def train(workdir, stop_at=None):
        torch.manual_seed(0)  # as a stage seeds itself when it starts, resumed or not
        net = torch.nn.Linear(6, 5)
        calls = []

        def sample(rng):
            if stop_at is not None and len(calls) == stop_at:
                raise _Interrupt
            calls.append(1)
            return x

        lc = LoopConfig(6, 1e-2, 0.0, 0.0, 1.0, 0, 2, 1)
        train_elastic(net, [100], sample, _DropoutObjective(net), lc, workdir, {"t": 1}, torch.device("cpu"), "t")
        return net.state_dict()

    straight = train(tmp_path / "a")
    with pytest.raises(_Interrupt):
        train(tmp_path / "b", stop_at=3)  # dies in step 4; the checkpoint holds step 2
    resumed = train(tmp_path / "b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the log holds each step once (step 3, logged before the crash, is not repeated) and the same losses
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss_per_level"] for r in logs[1]] == [r["loss_per_level"] for r in logs[0]]


def test_checkpoint_of_another_run_is_refused(tiny_elastic, tiny_dir, tmp_path):
    student, teacher = ElasticEncoder(tiny_elastic), ElasticEncoder(tiny_dir)
    head = RelationHead(32)
    batch = student.tokenize(Q, 32)
    obj = RelationObjective(student, teacher, head, 4)
    lc = LoopConfig(2, 1e-4, 0.0, 0.0, 1.0, 0, 1, 1)
    train_elastic(_Student(student.model, head), student.levels, lambda r: batch, obj, lc, tmp_path, {"src": "a"},
                  torch.device("cpu"), "t")
    with pytest.raises(ValueError, match=r"checkpoint.pt: written by a different run \(differs in \['src'\]\)"):
        train_elastic(_Student(student.model, head), student.levels, lambda r: batch, obj, lc, tmp_path, {"src": "b"},
                      torch.device("cpu"), "t")


def test_level_weights_grow_toward_the_small_sublms_and_average_one():
    assert level_weights([50, 10, 5], 0.0) == {50: 1.0, 10: 1.0, 5: 1.0}
    w = level_weights([50, 40, 30, 20, 15, 10, 5], 0.5)
    assert sum(w.values()) / 7 == pytest.approx(1.0)
    assert w[5] / w[50] == pytest.approx(10 ** 0.5) and w[10] / w[50] == pytest.approx(5 ** 0.5)
    assert list(w.values()) == sorted(w.values())  # largest level first, smallest weight first
    assert level_weights([10], 0.5) == {10: 1.0}  # a static baseline is unchanged
    with pytest.raises(ValueError, match=r"level_weights: power must be >= 0, got -1"):
        level_weights([50, 10], -1)
    with pytest.raises(ValueError, match=r"level_weights: levels must be percentages in \(0, 100\], got \[0\]"):
        level_weights([0], 0.5)


def test_level_weights_scale_each_sublm_gradient(tiny_dir, tiny_elastic, tmp_path):
    """Weights (1.5, 1.5, 0) over levels (50, 30, 10) give the gradient (L_50 + L_30) / 2: the same
    weights as uniform training of 50 and 30 alone. A checkpoint of the unweighted run is refused."""
    teacher = ElasticEncoder(tiny_dir)

    def train(levels, weights, workdir):
        student = ElasticEncoder(tiny_elastic)
        head = RelationHead(32, teacher.model.encoder.layer[-1].attention.self)
        batch = student.tokenize(Q + P, 32)
        lc = LoopConfig(3, 3e-4, 0.0, 0.0, 5.0, 0, 3, 1)
        recs = train_elastic(_Student(student.model, head), levels, lambda rng: batch,
                             RelationObjective(student, teacher, head, 4), lc, workdir, {"t": 1},
                             torch.device("cpu"), "test", weights)
        return student.model.state_dict(), recs

    weighted, recs = train([50, 30, 10], {50: 1.5, 30: 1.5, 10: 0.0}, tmp_path / "a")
    alone, _ = train([50, 30], None, tmp_path / "b")
    assert all(torch.allclose(weighted[k], alone[k], atol=1e-6) for k in weighted)
    assert recs[0]["loss_per_level"]["10"] > 0  # the log keeps the unweighted loss of every level
    uniform, _ = train([50, 30, 10], None, tmp_path / "c")
    assert not all(torch.allclose(weighted[k], uniform[k], atol=1e-6) for k in weighted)
    with pytest.raises(ValueError, match=r"differs in \['level_weights'\]"):
        train([50, 30, 10], {50: 1.5, 30: 1.5, 10: 0.0}, tmp_path / "c")
    with pytest.raises(ValueError, match=r"train_elastic: no weight for levels \[10\]"):
        train([50, 30, 10], {50: 1.0, 30: 1.0}, tmp_path / "d")


def test_retrieval_loss_masks_repeated_positives_and_kd_vanishes_on_equal_logits():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    P_ = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 4] = True  # candidate 4 is the same passage as query 0's positive
    loss = retrieval_loss(q, P_, mask, 0.5, None, 0.0, 1.0)
    logits = q @ P_.T / 0.5
    want = sum(-(logits[i, i] - torch.logsumexp(logits[i, [c for c in range(5) if not mask[i, c]]], 0))
               for i in range(3)) / 3
    assert torch.isclose(loss, want, atol=1e-5)
    same = retrieval_loss(q, P_, mask, 0.5, logits.clone(), 1.0, 2.0)
    assert torch.isclose(same, loss, atol=1e-5)  # KL(p || p) = 0
    assert retrieval_loss(q, P_, mask, 0.5, -logits, 1.0, 2.0) > loss + 0.1


def test_passage_side_gradient_is_accumulated_like_per_sublm_backward(tiny_dir, tiny_elastic):
    """Passages encoded once, every SubLM's gradient accumulated on them, one backward through
    the passage encoder == a backward per SubLM through its own passage graph (Algorithm 1)."""
    cfg = RecipeConfig()
    cfg.finetune.passage_side, cfg.encode.query_max_length, cfg.encode.passage_max_length = "largest", 16, 32
    teacher = ElasticEncoder(tiny_dir)
    TP = teacher.encode(P, 100, 32)
    batch = (Q[:2], [0, 1, 2, 3])

    def grads(mode):
        s = ElasticEncoder(tiny_elastic)
        obj = RetrievalObjective(s, teacher, TP, P, cfg, torch.device("cpu"))
        if mode == "loop":
            prep = obj.prepare(batch)
            for lv in s.levels:
                (obj.loss(batch, prep, lv) / len(s.levels)).backward()
            obj.finish(prep)
        else:
            for lv in s.levels:
                prep = obj.prepare(batch)
                prep["P"] = prep["graph"]  # no detach: straight through the passage encoder
                (obj.loss(batch, prep, lv) / len(s.levels)).backward()
        return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}

    a, b = grads("loop"), grads("direct")
    assert a.keys() == b.keys() and len(a) > 10
    bad = {n: (a[n] - b[n]).abs().max().item() for n in a if not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-4)}  # float32 sums in another order
    assert not bad, bad
    assert a["encoder.layer.0.intermediate.dense.weight"].abs().sum() > 0


def test_static_level_equals_that_sublm_of_the_elastic_model(tiny_elastic, tmp_path):
    cut_level(tiny_elastic, 30, tmp_path / "s30")
    el, st = ElasticEncoder(tiny_elastic), ElasticEncoder(tmp_path / "s30")
    assert st.levels == [30] and st.model.layout == el.sublm(30)
    b = el.tokenize(Q, 32)
    assert torch.allclose(el.embed(b, 30), st.embed(b, 30), atol=1e-6)
    with pytest.raises(ValueError, match=r"level 20 is not in submap.json \(levels: \[50, 30, 10\]\)"):
        cut_level(tiny_elastic, 20, tmp_path / "s20")


def test_bad_input_fails_before_training(tiny_dir, tiny_elastic, tmp_path):
    cfg = _distill_cfg(tmp_path)
    cfg.prune.teacher = str(tiny_dir)
    empty = tmp_path / "empty.tokens"
    empty.write_text("\n = Title = \n\n")
    cfg.distill.text = [str(empty)]
    with pytest.raises(ValueError, match="empty.tokens: no paragraph of at least 8 words"):
        distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    bad = tmp_path / "col.tsv"
    bad.write_text("1\tok passage\n2 no tab here\n")
    cfg.distill.text, cfg.data.collection = ["data/text/wikitext-2.valid.tokens.gz"], str(bad)
    with pytest.raises(ValueError, match="col.tsv:2: expected 'id<TAB>text', found no tab"):
        distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    cfg.data.collection = "data/msmarco/collection.dev500.tsv.gz"
    with pytest.raises(FileNotFoundError, match="nowhere: config.json is missing"):
        distill(cfg, tmp_path / "nowhere", tmp_path / "out", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()  # nothing was trained


def test_teacher_and_student_must_share_vocabulary_and_width(tiny_dir, tmp_path):
    from tests.conftest import make_tiny_checkpoint

    wide = ElasticEncoder(make_tiny_checkpoint(tmp_path / "wide", hidden=48, heads=4))
    small = ElasticEncoder(tiny_dir)
    with pytest.raises(ValueError, match="hidden size 48 differs from the teacher's 32"):
        check_pair(wide, small, same_hidden=True)
    with pytest.raises(ValueError, match="relation_heads: 5 does not divide the student's hidden size 48"):
        check_pair(wide, small, 5)
    check_pair(wide, small, 4)  # relations do not need equal widths


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_one_fails_with_the_field():
    from training.loop import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="config train.device: 'cuda' asked for, but torch sees no CUDA device"):
        resolve_device("cuda")


def test_query_distillation_bad_input_fails_before_training(tiny_dir, tiny_elastic, tmp_path):
    from tests.conftest import make_tiny_checkpoint
    from training.query_distill import query_distill

    cfg = RecipeConfig(run_dir=str(tmp_path / "run"))
    cfg.prune.teacher, cfg.train.device = str(tiny_dir), "cpu"
    cfg.data.collection = str(tmp_path / "col.tsv")
    (tmp_path / "col.tsv").write_text("p1\ta bank is a financial institution\np2\thamlet is a tragedy\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("7\twho wrote hamlet\n")
    cfg.data.dev_queries = str(dev)
    leak = tmp_path / "train.tsv"
    leak.write_text("1\twhat is a bank\n2\tWho wrote Hamlet\n")
    cfg.data.train_queries = [str(leak)]
    with pytest.raises(ValueError, match=r"train.tsv: holds 1 queries of the evaluation set .*qid 7"):
        query_distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    empty = tmp_path / "none.tsv"
    empty.write_text("")
    cfg.data.train_queries = [str(empty)]
    with pytest.raises(ValueError, match="none.tsv: no rows"):
        query_distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    cfg.data.train_queries = [str(leak.with_name("ok.tsv"))]
    leak.with_name("ok.tsv").write_text("1\twhat is a bank\n")
    with pytest.raises(ValueError, match="batch_size: 64 is more than the 1 training queries"):
        query_distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    wide = make_tiny_checkpoint(tmp_path / "wide", hidden=48, heads=4)
    with pytest.raises(ValueError, match="hidden size 48 differs from the teacher's 32"):
        query_distill(cfg, wide, tmp_path / "out", tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="nowhere: config.json is missing"):
        query_distill(cfg, tmp_path / "nowhere", tmp_path / "out", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()  # nothing was trained


def test_query_distillation_lowers_every_sublm_loss(tiny_dir, tiny_elastic, tmp_path):
    import json

    from elastic.data import read_tsv
    from tests.conftest import tiny_collection
    from training.query_distill import query_distill

    cfg = RecipeConfig(run_dir=str(tmp_path / "run"))
    cfg.prune.teacher, cfg.train.device = str(tiny_dir), "cpu"
    (tmp_path / "col.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in tiny_collection(200).items()))
    cfg.data.collection = str(tmp_path / "col.tsv")
    train = list(read_tsv("data/train-queries/msmarco.train.tsv.gz").items())[:64]
    (tmp_path / "train.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in train))
    cfg.data.train_queries = [str(tmp_path / "train.tsv")]
    qd = cfg.query_distill
    qd.steps, qd.batch_size, qd.lr, qd.candidates, qd.warmup = 30, 16, 1e-3, 8, 0.0
    cfg.train.checkpoint_every, cfg.train.log_every = 15, 5
    query_distill(cfg, tiny_elastic, tmp_path / "out", tmp_path / "ck")
    log = [json.loads(x) for x in (tmp_path / "ck" / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss_per_level"], log[-1]["loss_per_level"]
    assert set(first) == {"50", "30", "10"} and all(last[k] < first[k] for k in first), (first, last)
    meta = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert meta["passage_side"] == "teacher" and meta["queries"] == 64
    assert ElasticEncoder(tmp_path / "out").levels == [50, 30, 10]
    # with the token-level term: its own stage key (not "done before"), and every SubLM still learns
    qd.token_weight = 1.0
    query_distill(cfg, tiny_elastic, tmp_path / "out_tok", tmp_path / "ck_tok")
    log = [json.loads(x) for x in (tmp_path / "ck_tok" / "train_log.jsonl").read_text().splitlines()]
    first_tok, last_tok = log[0]["loss_per_level"], log[-1]["loss_per_level"]
    assert all(last_tok[k] < first_tok[k] for k in first_tok), (first_tok, last_tok)
    assert all(first_tok[k] > first[k] for k in first)  # the same first batch, one more term
    qd.token_weight = -1.0
    with pytest.raises(ValueError, match="config query_distill.token_weight: must be >= 0"):
        validate(cfg)
    # per-level loss weights: a run of its own (the uniform checkpoint is refused, not resumed) whose
    # weights reach the loop (test_level_weights_scale_each_sublm_gradient: they scale each SubLM's gradient)
    qd.token_weight, qd.level_weight_power = 0.0, 0.5
    with pytest.raises(ValueError, match=r"ck.checkpoint.pt: written by a different run \(differs in \['level_weights'\]\)"):
        query_distill(cfg, tiny_elastic, tmp_path / "out_lw", tmp_path / "ck")
    query_distill(cfg, tiny_elastic, tmp_path / "out_lw", tmp_path / "ck_lw")
    ck = torch.load(tmp_path / "ck_lw" / "checkpoint.pt", weights_only=False)
    assert ck["key"]["level_weights"] == {"50": 0.662681, "30": 0.855518, "10": 1.481801}
    last_lw = json.loads((tmp_path / "ck_lw" / "train_log.jsonl").read_text().splitlines()[-1])["loss_per_level"]
    assert last_lw != last
    qd.level_weight_power = -0.5
    with pytest.raises(ValueError, match=r"config query_distill.level_weight_power: must be >= 0 \(0 = uniform\), got -0.5"):
        validate(cfg)
    # pseudo-queries: WikiText spans after the real queries, in a run of its own; pruning's side keeps the real ones
    from training.teacher import teacher_side

    qd.level_weight_power, qd.pseudo_queries = 0.0, 40
    with pytest.raises(ValueError, match=r"ck.checkpoint.pt: written by a different run \(differs in \['pseudo_text', 'query_distill'\]\)"):
        query_distill(cfg, tiny_elastic, tmp_path / "out_pq", tmp_path / "ck")
    query_distill(cfg, tiny_elastic, tmp_path / "out_pq", tmp_path / "ck_pq")
    assert json.loads((tmp_path / "out_pq" / "finetune.json").read_text())["queries"] == 64 + 40
    real, side = teacher_side(cfg), teacher_side(cfg, pseudo=True)
    assert side.train_queries[:64] == real.train_queries and len(side.train_queries) == len(side.queries) == 104
    assert torch.equal(side.queries[:64], real.queries) and len(side.positives) == 104
    assert all(3 <= len(q.split()) <= 10 for q in side.train_queries[64:])
    last_pq = json.loads((tmp_path / "ck_pq" / "train_log.jsonl").read_text().splitlines()[-1])["loss_per_level"]
    assert last_pq != last
    qd.pseudo_query_min_words = 12
    with pytest.raises(ValueError, match=r"config query_distill.pseudo_query_min_words / pseudo_query_max_words: "
                                         r"need 1 <= min <= max, got 12, 10"):
        validate(cfg)
