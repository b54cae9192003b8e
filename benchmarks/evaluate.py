"""Offline evaluation: quality, size and speed of BM25, the teacher, every ElasticDenser level and
every static baseline, on one query set, qrels and collection.

    python -m benchmarks.evaluate --config configs/full.yaml \\
        [--queries qid<TAB>query file] [--qrels TREC qrels] [--collection pid<TAB>passage file] [--out DIR] \\
        [--query-heads off]

Defaults: the recipe's dev queries, qrels and collection (dev500 and the embedded sample).
Rows: bm25, teacher, elastic (run_dir/elastic, each level), static (run_dir/static/<p>/elastic,
when the recipe trains them). Columns: MRR@10, R@20, R@100 (ir-measures over each system's
top 100), nDCG@10 (graded gains when the qrels are graded, TREC DL style), the mean cosine
between the row's query embedding and the teacher's (same hidden size only), encoder parameters, GFLOPs of one 128-token sequence, and the median latency of one
query (batch 1, 16 tokens) and of one batch (32 x 128 tokens) of the encoder on this machine
with ``serve.torch_threads`` threads and the worker's matrix-product library (``handler.onednn``),
as the TorchServe worker runs. BM25's latency is bm25s
retrieving one query (``latency_b_ms``: 32 queries). Each system's passages are encoded by its
passage side (finetune.json): the teacher's embeddings, or its own largest level, cached under
run_dir/eval/cache/. A model with query heads (elastic/query_head.py) is scored through them, as it
is served, and its ``params`` count them (d² + d per level); ``--query-heads off`` scores the
same weights without them.

Writes DIR (default run_dir/eval)/offline.json (one object per row; keys system, level,
COLUMNS), offline.md and
offline.png (quality against preserving level, elastic beside static: the paper's Fig. 8).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elastic.data import read_qrels, read_tsv
from elastic.encoder import ElasticEncoder
from elastic.metrics import retrieval_metrics
from elastic.query_head import QueryHeads
from elastic.service import HandlerSettings
from elastic.structure import gflops, total_params
from training.config import RecipeConfig, load_config, teacher_path
from training.distill import fingerprint
from training.finetune import passage_side_of
from training.loop import matrix_products
from training.negatives import bm25_index, bm25_search
from training.static import static_levels

DEPTH = 100  # passages retrieved per query (R@100)
COLUMNS = ["system", "level", "mrr_at_10", "ndcg_at_10", "r_at_20", "r_at_100", "cos_to_teacher", "params", "gflops",
           "latency_q_ms", "latency_b_ms"]


@dataclass
class EvalData:
    """Queries, qrels and collection of one evaluation, validated together."""

    qids: list[str]
    qtexts: list[str]
    qrels: dict[str, dict[str, int]]
    pids: list[str]
    ptexts: list[str]
    collection: str
    teacher_queries: torch.Tensor | None = None  # (Q, d) the teacher's embeddings of qtexts, filled once

    def teacher_query_embeddings(self, cfg: RecipeConfig, teacher: ElasticEncoder) -> torch.Tensor:
        """(Q, d) the teacher's embeddings of the queries, encoded on first use and kept."""
        if self.teacher_queries is None:
            self.teacher_queries = teacher.encode(self.qtexts, 100, cfg.encode.query_max_length, 128)
        return self.teacher_queries

    @classmethod
    def load(cls, cfg: RecipeConfig, queries: str, qrels: str, collection: str) -> "EvalData":
        """Raises FileNotFoundError / ValueError naming a missing, empty or malformed file, or
        qrels that share no qid with the queries."""
        q, rel, col = read_tsv(queries), read_qrels(qrels), read_tsv(collection)
        if not set(rel) & set(q):
            raise ValueError(f"{qrels}: no qid in common with {queries}")
        return cls(list(q), list(q.values()), {k: v for k, v in rel.items() if k in q}, list(col), list(col.values()),
                   str(collection))


def flat_index(P: torch.Tensor):
    """FAISS IndexFlatIP (exact inner product, as served) over (N, d) passage embeddings."""
    import faiss

    index = faiss.IndexFlatIP(P.shape[1])
    index.add(np.ascontiguousarray(P.numpy(), dtype=np.float32))
    return index


def dense_run(q: torch.Tensor, index, pids: list[str], qids: list[str], k: int = DEPTH) -> dict:
    """Exact top-k of a :func:`flat_index` -> {qid: {pid: score}}."""
    scores, idx = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), min(k, len(pids)))
    return {qid: {pids[j]: float(s) for j, s in zip(ri, rs)} for qid, ri, rs in zip(qids, idx, scores)}


def passage_embeddings(cfg: RecipeConfig, data: EvalData, enc: ElasticEncoder, level: int) -> torch.Tensor:
    """(N, d) embeddings of the collection by ``enc`` at ``level``, cached per model and collection."""
    if enc.model_dir.resolve() == teacher_path(cfg).resolve() and data.collection == cfg.data.collection:
        from training.teacher import teacher_side

        return teacher_side(cfg, enc).passages
    h = hashlib.sha256(f"{fingerprint(enc.model_dir)} {level} {Path(data.collection).resolve()} {len(data.pids)} "
                       f"{cfg.encode.passage_max_length}".encode()).hexdigest()[:16]
    cache = cfg.run / "eval" / "cache" / f"passages-{h}.pt"
    if cache.exists():
        return torch.load(cache)
    P = enc.encode(data.ptexts, level, cfg.encode.passage_max_length, cfg.encode.batch_size, progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(P, cache)
    return P


@torch.inference_mode()
def encoder_latency_ms(enc: ElasticEncoder, level: int, batch: int, tokens: int, repeats: int = 20,
                       query: bool = False) -> float:
    """Median wall time in milliseconds of one forward + pooling (+ the level's query head with
    ``query``) of a (batch, tokens) input, with the matrix products in the library that the
    TorchServe worker uses (``handler.onednn``, default off: MKL; elastic/service.py)."""
    g = torch.Generator().manual_seed(0)
    b = {"input_ids": torch.randint(1000, enc.dims.vocab_size, (batch, tokens), generator=g),
         "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
    with matrix_products(HandlerSettings.onednn):  # the default, as the worker sets it at load
        enc.embed(b, level, query)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            enc.embed(b, level, query)
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def score_system(cfg: RecipeConfig, data: EvalData, model_dir: Path, system: str, latency: bool = True,
                 passage_side: str | None = None, query_heads: bool = True) -> list[dict]:
    """One row per level of the model directory (the teacher: one row, level None).

    ``passage_side`` ('teacher' or 'largest') overrides the model's own (finetune.json): which
    encoder fills the index its levels are scored against. ``query_heads``: score through the
    model's query heads when it has them (they map into the teacher's space, so only against the
    teacher's index)."""
    enc = ElasticEncoder(model_dir, query_heads=query_heads)
    teacher = system == "teacher"
    side = passage_side or passage_side_of(model_dir)
    t_enc = enc if teacher else ElasticEncoder(teacher_path(cfg))
    if teacher or side == "largest":
        P = passage_embeddings(cfg, data, enc, enc.levels[0])
    else:
        P = passage_embeddings(cfg, data, t_enc, 100)
    index = flat_index(P)
    same_space = t_enc.dims.hidden_size == enc.dims.hidden_size
    tq = data.teacher_query_embeddings(cfg, t_enc) if same_space else None
    heads = enc.query_heads is not None and side == "teacher"
    rows = []
    for level in enc.levels:
        sub = enc.sublm(level)
        q = enc.encode(data.qtexts, level, cfg.encode.query_max_length, 128, query=heads)
        row = {"system": system, "level": None if teacher else level,
               **retrieval_metrics(data.qrels, dense_run(q, index, data.pids, data.qids)),
               "cos_to_teacher": round(float(torch.nn.functional.cosine_similarity(q, tq, dim=-1).mean()), 4)
               if same_space else None,
               "params": total_params(enc.dims, sub) + (QueryHeads.params(enc.dims.hidden_size) if heads else 0),
               "gflops": round(gflops(enc.dims, sub), 4)}
        if latency:
            row["latency_q_ms"] = encoder_latency_ms(enc, level, 1, 16, query=heads)
            row["latency_b_ms"] = encoder_latency_ms(enc, level, 32, 128, repeats=5)
        rows.append(row)
    return rows


def bm25_row(data: EvalData) -> dict:
    retriever = bm25_index(data.ptexts)
    rows, scores = bm25_search(retriever, data.qtexts, DEPTH)
    run = {qid: {data.pids[j]: float(s) for j, s in zip(r, sc)} for qid, r, sc in zip(data.qids, rows, scores)}

    def timed(qs: list[str], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            bm25_search(retriever, qs, 10)
            times.append((time.perf_counter() - t) * 1000)
        return round(statistics.median(times), 3)

    return {"system": "bm25", "level": None, **retrieval_metrics(data.qrels, run), "params": None, "gflops": None,
            "latency_q_ms": timed(data.qtexts[:1], 20), "latency_b_ms": timed(data.qtexts[:32], 5)}


def evaluate(cfg: RecipeConfig, data: EvalData, query_heads: bool = True) -> list[dict]:
    """Every row of offline.json, in table order (``query_heads``: see :func:`score_system`).

    Raises:
        FileNotFoundError: run_dir/elastic or a static baseline the recipe asks for is missing.
    """
    torch.set_num_threads(cfg.serve.torch_threads)
    systems = [(teacher_path(cfg), "teacher"), (cfg.run / "elastic", "elastic")]
    if cfg.static.enabled:
        systems += [(cfg.run / "static" / str(p) / "elastic", "static") for p in static_levels(cfg)]
    for d, _ in systems:  # fail before any encoding
        if not (d / "model.safetensors").exists():
            raise FileNotFoundError(f"{d}: no trained model; run the training steps first (training.finetune / "
                                    "training.static, or set static.enabled: false)")
    rows = [bm25_row(data)]
    for d, system in systems:
        rows += score_system(cfg, data, d, system, query_heads=query_heads)
    return [{c: r.get(c) for c in COLUMNS} for r in rows]


def to_markdown(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """A markdown table: metrics with 4 decimals, latencies with 2, parameters with separators."""
    def fmt(c: str, v) -> str:
        if v is None:
            return "-"
        if c in ("mrr_at_10", "ndcg_at_10", "r_at_20", "r_at_100", "cos_to_teacher", "gflops"):
            return f"{v:.4f}"
        if c.startswith("latency"):
            return f"{v:,.2f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Quality against preserving level, elastic beside static, teacher and BM25 as lines (Fig. 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "mrr_at_10", "MRR@10"), (axes[1], "r_at_100", "R@100")):
        for system, style in (("elastic", "o-"), ("static", "s--")):
            pts = sorted((r["level"], r[metric]) for r in rows if r["system"] == system)
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], style, label=f"ElasticDenser ({system})"
                        if system == "elastic" else "w/o elasticity (static)")
        for system, color in (("teacher", "k"), ("bm25", "gray")):
            for r in rows:
                if r["system"] == system:
                    ax.axhline(r[metric], color=color, ls=":", label=system)
        ax.set_xlabel("preserving level (%)")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: RecipeConfig, queries: str | None = None, qrels: str | None = None, collection: str | None = None,
        out: Path | None = None, query_heads: bool = True) -> list[dict]:
    """Evaluate, write offline.json / offline.md / offline.png into ``out``, print the table."""
    t0 = time.time()
    data = EvalData.load(cfg, queries or cfg.data.dev_queries, qrels or cfg.data.qrels, collection or cfg.data.collection)
    rows = evaluate(cfg, data, query_heads)
    out = out or cfg.run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = (f"Queries {queries or cfg.data.dev_queries} ({len(data.qids)}), collection {data.collection} "
          f"({len(data.pids):,} passages); latency: median ms, {cfg.serve.torch_threads} torch thread(s)"
          f"{'' if query_heads else '; query heads off'}.\n\n"
          + to_markdown(rows))
    (out / "offline.md").write_text(md)
    plot(rows, out / "offline.png")
    print(f"[evaluate] {time.time() - t0:.0f} s, wrote {out}/offline.{{json,md,png}}:\n{md}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="Offline quality / size / latency of BM25, teacher, elastic and static.")
    ap.add_argument("--config", help="recipe YAML (default: built-in defaults)")
    ap.add_argument("--queries", help="qid<TAB>query file (default: data.dev_queries)")
    ap.add_argument("--qrels", help="TREC qrels (default: data.qrels)")
    ap.add_argument("--collection", help="pid<TAB>passage file (default: data.collection)")
    ap.add_argument("--out", type=Path, help="output directory (default: run_dir/eval)")
    ap.add_argument("--query-heads", choices=("on", "off"), default="on",
                    help="score models with query heads through them (on, as served) or without (off)")
    a = ap.parse_args()
    run(load_config(a.config), a.queries, a.qrels, a.collection, a.out, a.query_heads == "on")


if __name__ == "__main__":
    main()
