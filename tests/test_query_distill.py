"""Query-side distillation: the loss, the objective-derived expressive scores, length-windowed
batches, the query readers (MS MARCO and DPR formats) and the held-out check; nDCG@10 on graded
qrels."""

import gzip
import random

import pytest
import torch
import torch.nn.functional as F

from elastic.data import check_disjoint, read_queries, read_query_files
from elastic.encoder import ElasticEncoder
from tests.test_training import P, Q
from training.importance import distill_scores
from training.query_distill import batch_sampler, query_distill_loss


def _unit(x):
    return F.normalize(x, dim=-1)


def test_loss_is_zero_at_the_teacher_and_grows_away_from_it():
    g = torch.Generator().manual_seed(0)
    t, Pc = _unit(torch.randn(5, 16, generator=g)), _unit(torch.randn(40, 16, generator=g))
    tl = t @ Pc.T / 0.05
    assert query_distill_loss(t.clone(), t, tl, Pc, 0.05, 1.0, 1.0, 1.0).abs() < 1e-5
    s = _unit(t + 0.3 * torch.randn(5, 16, generator=g))
    cos_only = query_distill_loss(s, t, tl, Pc, 0.05, 1.0, 0.0, 1.0)
    assert torch.isclose(cos_only, (1 - (s * t).sum(-1)).mean(), atol=1e-6)
    kl_only = query_distill_loss(s, t, tl, Pc, 0.05, 0.0, 1.0, 1.0)
    ref = F.kl_div(F.log_softmax(s @ Pc.T / 0.05, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean")
    assert kl_only > 0 and torch.isclose(kl_only, ref)
    # the KL at temperature 2 is multiplied by 4 (T² keeps gradient sizes comparable)
    kl2 = F.kl_div(F.log_softmax(s @ Pc.T / 0.05 / 2, -1), F.log_softmax(tl / 2, -1), log_target=True,
                   reduction="batchmean")
    assert torch.isclose(query_distill_loss(s, t, tl, Pc, 0.05, 0.0, 1.0, 2.0), 4 * kl2)


def test_token_loss_averages_real_tokens_only_and_checks_shapes():
    from training.token_loss import token_cosine_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert token_cosine_loss(t * 3.0, t, mask).abs() < 1e-6  # a scaled copy is at distance 0
    s = t.clone()
    s[0, 3:] = -t[0, 3:]  # padding positions turned around: not counted
    assert token_cosine_loss(s, t, mask).abs() < 1e-6
    s[1, 0] = -t[1, 0]  # one of the 8 real tokens turned around: 1 - cos = 2 on it
    assert torch.isclose(token_cosine_loss(s, t, mask), torch.tensor(2 / 8), atol=1e-6)
    with pytest.raises(ValueError, match=r"student \(2, 5, 6\), teacher \(2, 5, 7\)"):
        token_cosine_loss(s[..., :6], t, mask)
    with pytest.raises(ValueError, match="holds no token"):
        token_cosine_loss(s, t, torch.zeros(2, 5))


def test_distill_scores_are_zero_for_a_unit_without_effect(tiny_dir):
    enc = ElasticEncoder(tiny_dir)
    d_head = enc.dims.hidden_size // enc.dims.num_attention_heads
    with torch.no_grad():  # head 2 of layer 0 and neuron 5 of layer 1 write nothing
        enc.model.encoder.layer[0].attention.output.dense.weight[:, 2 * d_head:3 * d_head] = 0
        enc.model.encoder.layer[1].output.dense.weight[:, 5] = 0
    g = torch.Generator().manual_seed(1)
    passages = _unit(torch.randn(20, enc.dims.hidden_size, generator=g))
    top = torch.stack([torch.randperm(20, generator=g)[:6] for _ in Q])
    hs, ns = distill_scores(enc, [(Q, top), (P, top)], passages, 32, 0.05, 1.0, 1.0, 1.0, seed=0)
    assert hs.shape == (2, 4) and ns.shape == (2, 37)
    assert torch.allclose(hs.norm(dim=1), torch.ones(2)) and torch.allclose(ns.norm(dim=1), torch.ones(2))
    assert hs[0, 2] == 0 and ns[1, 5] == 0
    assert (hs[0, [0, 1, 3]] > 0).all() and (ns[1, :5] > 0).all()
    again = distill_scores(enc, [(Q, top), (P, top)], passages, 32, 0.05, 1.0, 1.0, 1.0, seed=0)
    assert torch.equal(hs, again[0]) and torch.equal(ns, again[1])
    with pytest.raises(ValueError, match="at least one batch"):
        distill_scores(enc, [], passages, 32, 0.05, 1.0, 1.0, 1.0)


def test_length_window_batches_hold_similar_lengths():
    lengths = [random.Random(i).randint(3, 30) for i in range(1000)]
    sample = batch_sampler(lengths, 16, 2)
    order = sorted(range(1000), key=lengths.__getitem__)
    rank = {q: r for r, q in enumerate(order)}
    for step in range(20):
        b = sample(random.Random(step))
        assert len(set(b)) == 16 and max(rank[q] for q in b) - min(rank[q] for q in b) < 32
    assert sample(random.Random(3)) == sample(random.Random(3))  # seeded: a resumed run sees the same batch
    uniform = batch_sampler(lengths, 16, 0)(random.Random(0))
    assert max(rank[q] for q in uniform) - min(rank[q] for q in uniform) > 100
    with pytest.raises(ValueError, match="batch_size: 16 is more than the 10 training queries"):
        batch_sampler(lengths[:10], 16, 2)
    with pytest.raises(ValueError, match="length_window: must be >= 0"):
        batch_sampler(lengths, 16, -1)


def test_query_readers_and_the_held_out_check(tmp_path):
    marco = tmp_path / "m.tsv"
    marco.write_text("1\twhat is a bank\n2\twho wrote hamlet\n")
    dpr = tmp_path / "nq.tsv.gz"
    with gzip.open(dpr, "wt") as f:  # DPR: question<TAB>answers, CSV-quoted when an answer holds quotes, CRLF
        f.write("who wrote hamlet\t['Shakespeare']\r\nwhere was the mona lisa kept\t\"['Amboise', \"\"Ch'teau\"\"]\"\r\n")
    assert read_queries(marco) == ["what is a bank", "who wrote hamlet"]
    assert read_queries(dpr) == ["who wrote hamlet", "where was the mona lisa kept"]
    assert read_query_files([marco, dpr]) == ["what is a bank", "who wrote hamlet", "where was the mona lisa kept"]
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("q one\t['a']\n7\tq two\n")
    with pytest.raises(ValueError, match=r"mixed.tsv:2: mixes formats"):
        read_queries(mixed)
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.tsv: no rows"):
        read_queries(empty)
    dev = tmp_path / "dev.tsv"
    dev.write_text("42\tWho  wrote Hamlet\n")
    with pytest.raises(ValueError, match=r"nq.tsv.gz: holds 1 queries of the evaluation set .*qid 42"):
        read_query_files([dpr], held_out=dev)
    with pytest.raises(ValueError, match=r"m.tsv: holds 1 queries"):
        check_disjoint({str(marco): read_queries(marco)}, dev)
    with pytest.raises(FileNotFoundError, match="absent.tsv: no such file"):
        read_query_files([tmp_path / "absent.tsv"])


def test_packed_training_queries_are_disjoint_from_dev500():
    from training.config import RecipeConfig

    cfg = RecipeConfig()
    queries = read_query_files(cfg.data.train_queries, held_out=cfg.data.dev_queries)
    assert len(queries) > 38000  # MS MARCO + NQ + TriviaQA questions, deduplicated


def test_ndcg_at_10_uses_graded_gains():
    from elastic.metrics import retrieval_metrics

    qrels = {"q": {"a": 1, "b": 3, "c": 0}}
    run = {"q": {"a": 2.0, "b": 1.0, "c": 0.5}}
    m = retrieval_metrics(qrels, run)
    dcg = 1 / 1 + 3 / torch.log2(torch.tensor(3.0))
    idcg = 3 / 1 + 1 / torch.log2(torch.tensor(3.0))
    assert abs(m["ndcg_at_10"] - float(dcg / idcg)) < 1e-4
    assert m["mrr_at_10"] == 1.0


def test_pseudo_queries_are_seeded_distinct_spans_that_skip_excluded_texts():
    from elastic.data import normalize_query
    from training.pseudo_queries import cut_pseudo_queries

    paragraphs = ["the quick brown fox jumps over the lazy dog near the river bank", "too short", "a b c d e f g"]
    out = cut_pseudo_queries(paragraphs, 30, 2, 5, seed=1)
    assert out == cut_pseudo_queries(paragraphs, 30, 2, 5, seed=1) != cut_pseudo_queries(paragraphs, 30, 2, 5, seed=2)
    assert len({normalize_query(q) for q in out}) == 30 and all(2 <= len(q.split()) <= 5 for q in out)
    joined = [" " + p + " " for p in paragraphs]
    assert all(any(f" {q} " in p for p in joined) for q in out)  # consecutive words of one paragraph
    exclude = {normalize_query(q) for q in out[:10]}
    assert not exclude & {normalize_query(q) for q in cut_pseudo_queries(paragraphs, 20, 2, 5, seed=1, exclude=exclude)}
    assert cut_pseudo_queries(["<unk> , ( a ) b - <unk> c"], 1, 3, 3, seed=0) == ["a b c"]  # words only
    with pytest.raises(ValueError, match="cut_pseudo_queries: found 6 distinct spans of 7 wanted"):
        cut_pseudo_queries(["a b c"], 7, 1, 3, seed=0)  # 3 + 2 + 1 spans exist
    with pytest.raises(ValueError, match="cut_pseudo_queries: no paragraph of at least 4 words"):
        cut_pseudo_queries(["a b c"], 1, 4, 6, seed=0)
    with pytest.raises(ValueError, match=r"need 1 <= min_words <= max_words, got 5, 4"):
        cut_pseudo_queries(paragraphs, 1, 5, 4, seed=0)
