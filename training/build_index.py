"""Encode the collection once with the largest SubLM into a FAISS index (paper §4.4).

    python -m training.build_index --config configs/demo.yaml

Reads run_dir/elastic, writes run_dir/index/index.faiss (inner product over the SubLM's
normalized embeddings = cosine) and run_dir/index/pids.txt (one pid per index row).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from elastic.data import read_tsv
from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, config_cli


def build_index(enc: ElasticEncoder, collection: dict[str, str], out: Path, max_length: int, batch_size: int) -> None:
    """Write ``index.faiss`` (IndexFlatIP over the largest SubLM's passage embeddings) and
    ``pids.txt`` into ``out``."""
    import faiss

    emb = enc.encode(list(collection.values()), enc.levels[0], max_length, batch_size, progress=True)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb.numpy(), dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "pids.txt").write_text("\n".join(collection) + "\n")


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    enc = ElasticEncoder(cfg.run / "elastic")
    out = cfg.run / "index"
    build_index(enc, read_tsv(cfg.data.collection), out, cfg.encode.passage_max_length, cfg.encode.batch_size)
    print(f"[index] level {enc.levels[0]}% encoded the collection into {out} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Encode the collection with the largest SubLM into FAISS.", run)


if __name__ == "__main__":
    main()
