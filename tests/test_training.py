"""Pruning: gate gradients are the loss sensitivities (eq. 3-5), levels are nested and preserve
the asked fraction, the exported largest SubLM equals the reordered teacher's prefix; config and
submap errors name the field."""

import json

import pytest
import torch

from elastic.encoder import ElasticEncoder
from elastic.structure import mha_ffn_params
from elastic.submap import Submap
from training.config import load_config
from training.importance import contrastive_loss, expressive_scores, level_widths
from training.prune import build_submap, export_pruned

Q = ["what is a bank", "who wrote hamlet", "how tall is everest", "boiling point of water"]
P = ["a bank is a financial institution", "hamlet is a tragedy by shakespeare",
     "mount everest is 8849 metres high", "water boils at 100 degrees celsius"]


def test_gate_gradient_equals_finite_difference(tiny_dir):
    enc = ElasticEncoder(tiny_dir)

    def loss_with(xi, nu):
        def emb(t):
            b = enc.tokenize(t, 32)
            from elastic.structure import pool
            h = enc.model(b["input_ids"], b["attention_mask"], head_gates=xi, neuron_gates=nu)
            return pool(h, b["attention_mask"], enc.submap.pooling, enc.submap.normalize)
        return contrastive_loss(emb(Q), emb(P), 0.05)

    ones = lambda: ([torch.ones(4, dtype=torch.float64) for _ in range(2)], [torch.ones(37, dtype=torch.float64) for _ in range(2)])
    enc.model.double()
    xi, nu = ones()
    for t in xi + nu:
        t.requires_grad_(True)
    grads = torch.autograd.grad(loss_with(xi, nu), xi + nu)
    eps = 1e-5
    for layer, head in [(0, 1), (1, 3)]:
        up, dn = ones(), ones()
        up[0][layer][head] += eps
        dn[0][layer][head] -= eps
        with torch.no_grad():
            fd = (loss_with(*up) - loss_with(*dn)) / (2 * eps)
        assert torch.isclose(grads[layer][head], fd, rtol=1e-4, atol=1e-8)
    hs, ns = expressive_scores(ElasticEncoder(tiny_dir), [(Q, P)], lambda q, p: contrastive_loss(q, p, 0.05), 32, 32)
    assert hs.shape == (2, 4) and ns.shape == (2, 37)
    assert torch.allclose(hs.norm(dim=1), torch.ones(2)) and torch.allclose(ns.norm(dim=1), torch.ones(2))
    # up to the per-layer normalization, the scores are |gradient| of the same loss
    g0 = grads[0].abs().float()
    assert torch.allclose(hs[0], g0 / g0.norm(), atol=1e-4)


def test_levels_nested_and_preserve_the_fraction(tiny_dir):
    enc = ElasticEncoder(tiny_dir)
    g = torch.Generator().manual_seed(3)
    hs, ns = torch.rand(2, 4, generator=g), torch.rand(2, 37, generator=g)
    sm = build_submap(hs, ns, [50, 40, 30, 20, 15, 10, 5], "mean", True)
    levels = list(sm.levels.values())
    assert all(b.within(a) for a, b in zip(levels, levels[1:]))
    full = mha_ffn_params(enc.dims, enc.dims.full())
    for p, s in sm.levels.items():
        assert abs(mha_ffn_params(enc.dims, s) / full - p / 100) < 0.05
    # ranked across layers: a layer whose scores are all higher keeps more units
    assert level_widths(torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 3.0]]), 0.5) == [3, 0]


def test_export_keeps_the_reordered_prefix(tiny_dir, tmp_path):
    enc = ElasticEncoder(tiny_dir)
    g = torch.Generator().manual_seed(5)
    hs, ns = torch.rand(2, 4, generator=g), torch.rand(2, 37, generator=g)
    sm = export_pruned(enc, hs, ns, [50, 20], tmp_path / "out")
    out = ElasticEncoder(tmp_path / "out")
    assert out.levels == [50, 20] and out.model.layout == sm.levels[50]
    # the kept heads of layer 0 are the top-scored ones, in score order
    top = hs[0].argsort(descending=True)[: sm.levels[50].heads[0]]
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in top.tolist()])
    assert torch.equal(out.model.encoder.layer[0].attention.self.query.weight,
                       enc.model.encoder.layer[0].attention.self.query.weight[rows])
    written = json.loads((tmp_path / "out" / "submap.json").read_text())
    assert written["levels"]["50"]["heads"] == list(sm.levels[50].heads)
    assert written["levels"]["50"]["gflops"] > written["levels"]["20"]["gflops"] > 0


def test_submap_errors_name_the_field(tiny_dir, tmp_path):
    dims = ElasticEncoder(tiny_dir).dims
    p = tmp_path / "submap.json"
    base = {"format": "elasticlm-submap/1", "levels": {"50": {"heads": [2, 2], "neurons": [18, 19]},
                                                       "30": {"heads": [3, 1], "neurons": [10, 10]}}}
    p.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"levels\['30'\] is not nested in levels\['50'\]"):
        Submap.load(p, dims)
    base["levels"]["30"] = {"heads": [1, 1, 1], "neurons": [10, 10]}
    p.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"levels\['30'\]\.heads has 3 layers, config.json has 2"):
        Submap.load(p, dims)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Submap.load(p, dims)


CONFIG_ERRORS = [
    ("serve:\n  latency_constraint_ms: -3\n", "serve.latency_constraint_ms: must be a positive number"),
    ("serve:\n  schedule: greedy\n", "serve.schedule: expected one of \\['deadline', 'paper'\\], got 'greedy'"),
    ("serve:\n  late_requests: drop\n", "serve.late_requests: expected one of \\['shed', 'serve'\\]"),
    ("serve:\n  worker_nice: -30\n", "serve.worker_nice: must be in \\[-20, 19\\], got -30"),
    ("serve:\n  max_batch_delay_ms: -1\n", "serve.max_batch_delay_ms: must be >= 0"),
    ("distill:\n  stepz: 3\n", "config distill.stepz: unknown field"),
    ("finetune:\n  steps: many\n", "config finetune.steps: expected int, got 'many'"),
    ("finetune:\n  passage_side: smallest\n", "config finetune.passage_side: expected 'teacher' or 'largest'"),
    ("static:\n  levels: [50, 33]\n", r"config static.levels: \[50, 33\] are not all in prune.levels"),
    ("train:\n  device: tpu\n", "config train.device: expected auto, cpu or cuda"),
    ("task_stage: rerank\n", "config task_stage: expected 'query_distill' or 'finetune', got 'rerank'"),
    ("prune:\n  score_objective: magnitude\n",
     "config prune.score_objective: expected 'query_distill', 'contrastive', 'relation' or 'glue_task', "
     "got 'magnitude'"),
    ("query_distill:\n  cos_weight: 0\n  kd_weight: 0\n", "config query_distill.cos_weight / kd_weight: must be >= 0 and not both 0"),
    ("query_distill:\n  length_window: -2\n", "config query_distill.length_window: must be >= 0"),
    ("query_distill:\n  candidates: 0\n", "config query_distill.candidates: must be >= 1"),
    ("data:\n  train_queries: data/one.tsv\n", "config data.train_queries: expected list, got 'data/one.tsv'"),
    ("data:\n  train_queries: []\n", "config data.train_queries: expected a non-empty list of file paths"),
]


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    for text, message in CONFIG_ERRORS:
        p.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(p)
    p.write_text("serve:\n  latency_constraint_ms: 40\n")
    assert load_config(p).serve.latency_constraint_ms == 40.0


def test_training_stages_run_cpu_matrix_products_in_the_library_the_recipe_names(tmp_path):
    from training.loop import configure_torch

    p = tmp_path / "c.yaml"
    was = (torch.backends.mkldnn.enabled, torch.get_num_threads())
    try:
        p.write_text("train:\n  threads: 1\n")
        configure_torch(load_config(p).train)
        assert (torch.backends.mkldnn.enabled, torch.get_num_threads()) == (False, 1)  # default: MKL, as served
        p.write_text("train:\n  onednn: true\n")
        configure_torch(load_config(p).train)
        assert torch.backends.mkldnn.enabled is True and torch.get_num_threads() == 1  # threads 0: left as it was
        p.write_text("train:\n  onednn: 'yes'\n")
        with pytest.raises(ValueError, match=r"config train.onednn: expected bool, got 'yes'"):
            load_config(p)
    finally:
        torch.backends.mkldnn.enabled = was[0]
        torch.set_num_threads(was[1])


def test_every_committed_recipe_loads_and_validates():
    """A recipe in configs/ that a field rename or a new check broke fails here, not an hour into a run."""
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    recipes = sorted(configs.glob("**/*.yaml"))
    assert len(recipes) >= 10, recipes
    for f in recipes:
        cfg = load_config(f)
        assert cfg.run_dir.startswith("runs/"), f"{f}: run_dir {cfg.run_dir!r} is outside runs/ (git-ignored)"
    # the GPU recipe is the full one with 3x the steps (benchmarks/results/gpu/README.md)
    full, gpu = load_config(configs / "full.yaml"), load_config(configs / "full_gpu.yaml")
    assert gpu.query_distill.steps == 3 * full.query_distill.steps
    assert (gpu.query_distill.batch_size, gpu.query_distill.lr) == (full.query_distill.batch_size, full.query_distill.lr)
