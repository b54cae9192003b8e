"""Bring trained weights back from a lent GPU machine within what its calls return (files of at most
16 MiB, 64 MiB in all): fp16, the frozen word-embedding table left out, split into chunks.

    python3 scripts/pack_weights.py pack OUT_DIR MODEL_DIR...            # on the GPU machine, from the repo root
    python scripts/pack_weights.py unpack CHUNK_DIR EMBEDDINGS.safetensors ROOT  # here (ROOT: the repo root, .)

Every recipe stage freezes ``bert.embeddings.word_embeddings.weight`` (training/ranker_teacher.py,
training/ranker.py), so it equals the teacher's as the GPU machine loaded it: the bundled teacher
rounded to fp16 (scripts/device_run.sh). ``unpack`` puts that table back from EMBEDDINGS (the same
fp16-rounded file) and the other tensors back in fp32, so a model here differs from the GPU's only
by fp16 rounding of its trained weights (about 1e-3 relative). Each model directory's other files
(config, tokenizer, submap.json, stage.json) come back in run.tgz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORD = "word_embeddings.weight"
CHUNK_BYTES = 15 * 2**20


def pack(out: Path, run: Path, subdirs: list[str]) -> None:
    """fp16 tensors of ``run/<subdir>/model.safetensors`` (word embeddings left out), keyed
    ``<subdir>|<name>``, in chunks ``weights-<n>.safetensors`` of at most CHUNK_BYTES."""
    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for sub in subdirs:
        for name, t in load_file(str(run / sub / "model.safetensors")).items():
            if name.endswith(WORD):
                continue
            t = t.half().contiguous() if t.is_floating_point() else t.contiguous()
            n = t.numel() * t.element_size()
            if size + n > CHUNK_BYTES and chunks[-1]:
                chunks.append({})
                size = 0
            chunks[-1][f"{sub}|{name}"] = t
            size += n
    out.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(chunks):
        save_file(c, str(out / f"weights-{i}.safetensors"))
    print(f"packed {sum(map(len, chunks))} tensors of {subdirs} into {len(chunks)} chunks", flush=True)


def unpack(chunk_dir: Path, embeddings: Path, run: Path) -> None:
    """Write ``run/<subdir>/model.safetensors`` for every subdir in the chunks, fp32, with the
    word-embedding table taken from ``embeddings``.

    Raises:
        FileNotFoundError: no chunk in ``chunk_dir``, or a subdir whose other files are missing.
        KeyError: ``embeddings`` holds no word-embedding table.
    """
    files = sorted(chunk_dir.glob("weights-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{chunk_dir}: no weights-*.safetensors")
    emb = load_file(str(embeddings))
    word = next((v for k, v in emb.items() if k.endswith(WORD)), None)
    if word is None:
        raise KeyError(f"{embeddings}: no tensor named *{WORD}")
    models: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        for key, t in load_file(str(f)).items():
            sub, name = key.split("|", 1)
            models.setdefault(sub, {})[name] = t.float() if t.is_floating_point() else t
    for sub, sd in models.items():
        if not (run / sub / "config.json").exists():
            raise FileNotFoundError(f"{run / sub}: no config.json (extract run.tgz first)")
        prefix = next(k for k in sd if "embeddings." in k).split("embeddings.")[0]
        sd[f"{prefix}embeddings.{WORD}"] = word.float().clone()
        save_file(sd, str(run / sub / "model.safetensors"))
        print(f"unpacked {run / sub}: {len(sd)} tensors", flush=True)


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), Path("."), sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "unpack":
        unpack(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
