"""The FAISS index of the collection, encoded once by the passage side of the fine-tuned model.

    python -m training.build_index --config configs/demo.yaml

Reads run_dir/elastic and its finetune.json: passage side ``largest`` encodes the collection with
the largest SubLM (paper §4.4); ``teacher`` takes the teacher's passage embeddings (computed once
per run, training/teacher.py), the index the SubLM query encoders were aligned to. Writes
run_dir/index/index.faiss (inner product over normalized embeddings = cosine), pids.txt (one pid
per index row) and index.json (which encoder filled it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import torch

from elastic.data import read_tsv
from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, config_cli
from training.finetune import passage_side_of
from training.teacher import teacher_side


def build_index(enc: ElasticEncoder, collection: dict[str, str], out: Path, max_length: int, batch_size: int) -> None:
    """Write ``index.faiss`` (IndexFlatIP over the largest SubLM's passage embeddings) and
    ``pids.txt`` into ``out``."""
    emb = enc.encode(list(collection.values()), enc.levels[0], max_length, batch_size, progress=True)
    write_index(emb, list(collection), out)


def write_index(emb: torch.Tensor, pids: list[str], out: Path) -> None:
    """(N, d) passage embeddings in ``pids`` order -> ``out``/index.faiss + pids.txt."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb.numpy(), dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "pids.txt").write_text("\n".join(pids) + "\n")


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    model_dir, out = cfg.run / "elastic", cfg.run / "index"
    enc = ElasticEncoder(model_dir)
    if passage_side_of(model_dir) == "teacher":
        side = teacher_side(cfg)
        write_index(side.passages, side.pids, out)
        who = "the teacher's passage embeddings"
    else:
        build_index(enc, read_tsv(cfg.data.collection), out, cfg.encode.passage_max_length, cfg.encode.batch_size)
        who = f"level {enc.levels[0]}% (the largest SubLM)"
    (out / "index.json").write_text(json.dumps({"passage_encoder": who, "collection": cfg.data.collection}) + "\n")
    print(f"[index] {who} -> {out} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Encode the collection with the largest SubLM into FAISS.", run)


if __name__ == "__main__":
    main()
