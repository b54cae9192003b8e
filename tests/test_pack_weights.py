"""scripts/pack_weights.py: weights trained on a lent GPU come back in chunks under the device
tool's file limits (16 MiB each), fp16, without the frozen word-embedding table, and are put back
together here."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pack_weights.py"


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_pack_then_unpack_gives_the_model_back_to_fp16_rounding(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "run" / "model", seed=2, num_labels=1)
    ref = load_file(str(model / "model.safetensors"))
    word = next(k for k in ref if k.endswith("word_embeddings.weight"))
    emb = tmp_path / "emb.safetensors"  # the table as the GPU machine held it
    save_file({word: ref[word].half().float()}, str(emb))
    out = tmp_path / "out"
    r = _run("pack", out, "run/model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    chunks = load_file(str(out / "weights-0.safetensors"))
    assert all(k.startswith("run/model|") and t.dtype == torch.float16 for k, t in chunks.items())
    assert not any(k.endswith("word_embeddings.weight") for k in chunks)  # frozen: it does not travel
    (model / "model.safetensors").unlink()
    r = _run("unpack", out, emb, ".", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_file(str(model / "model.safetensors"))
    assert set(back) == set(ref)
    for k in ref:
        assert back[k].dtype == ref[k].dtype
        assert torch.equal(back[k], ref[k].half().to(ref[k].dtype)), k


def test_unpack_names_what_is_missing(tmp_path):
    r = _run("unpack", tmp_path, tmp_path / "emb.safetensors", ".", cwd=tmp_path)
    assert r.returncode != 0 and "no weights-*.safetensors" in r.stderr
    r = _run("frobnicate", cwd=tmp_path)
    assert r.returncode != 0 and "pack OUT_DIR MODEL_DIR" in r.stderr
