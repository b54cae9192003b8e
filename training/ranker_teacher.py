"""ElasticRanker's teacher: a cross-encoder trained here with LCE (paper §4.4, eq. 9 with eq. 11).

    python -m training.ranker_teacher --config RECIPE [--device cuda]

No package reachable here ships a cross-encoder, so the ranker's teacher is made here, unless
``ranker.teacher`` names a cross-encoder directory (one-label BertForSequenceClassification); that
one is loaded, checked, and used as it is.

1. Training queries: a seeded sample of ``ranker.train_queries`` of ``data.train_queries`` (the
   dense teacher's cached embeddings, training/teacher.py, which refuses any evaluation query).
2. Candidates per query: BM25's top ``ranker.depth`` (bm25s) and the dense teacher's top
   ``ranker.depth`` in the collection.
3. Pseudo-positive (``ranker.positive``): the dense teacher's top-1 (default), or the first
   passage of the reciprocal rank fusion of both lists (elastic/ranker.py). The training queries
   have no qrels and none are used; ``python -m benchmarks.rerank`` measures how often each signal
   puts a judged passage first on the evaluation queries, the check to make before trusting it.
   It chose the default: P@1 0.372 for the dense teacher against 0.286 for the fusion on dev500.
4. Localized negatives: m - 1 passages drawn per step from the rest of the fused list, i.e. from
   the top ranks of the two first-stage retrievers (LCE's "localized").
5. The cross-encoder starts from ``prune.teacher`` with a new one-output head and trains with
   LCE (training/lce_loss.py) plus ``ranker.kd_weight`` x the listwise KL to the dense teacher's
   scores of the same group (training/rank_kd_loss.py: soft targets, since a pseudo-positive is
   often wrong and a negative often relevant), through the shared loop (training/loop.py:
   checkpoints, resume; the checkpoint is dropped once the stage is done).
   The word-embedding table stays as pretrained (half of MiniLM-L6's weights, the optimizer's
   largest update per step). Written to run_dir/ranker/teacher with ``stage.json``; a rerun
   with the same inputs skips it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from elastic.ranker import CrossEncoder, reciprocal_rank_fusion
from training.config import RecipeConfig, config_cli, teacher_path
from training.distill import fingerprint
from training.lce_loss import lce_loss
from training.rank_kd_loss import listwise_kd
from training.loop import LoopConfig, configure_torch, resolve_device, train_elastic
from training.negatives import bm25_index, bm25_search
from training.teacher import TeacherSide, teacher_side


@dataclass
class RankerData:
    """LCE training data: per query, its text and candidate rows in ``texts`` (the
    pseudo-positive first, then the fused list), and the dense teacher's embeddings."""

    queries: list[str]
    fused: list[list[int]]  # rows of ``texts``; fused[i][0] is query i's pseudo-positive
    texts: list[str]  # passage texts in collection order
    query_emb: torch.Tensor  # (n, d) the dense teacher's query embeddings, aligned with ``queries``
    passage_emb: torch.Tensor  # (N, d) its passage embeddings, aligned with ``texts``


def ranker_data(cfg: RecipeConfig, side: TeacherSide | None = None) -> RankerData:
    """The sampled training queries with their RRF-fused BM25 and dense-teacher candidates.

    Raises:
        ValueError: a query whose fused list leaves fewer than ``group_size - 1`` negatives
            (a collection too small for the group).
    """
    r = cfg.ranker
    side = side or teacher_side(cfg)
    n = min(r.train_queries, len(side.train_queries))
    idx = sorted(random.Random(r.seed).sample(range(len(side.train_queries)), n))
    queries = [side.train_queries[i] for i in idx]
    Q = side.queries[idx]  # (n, d)
    depth = min(r.depth, len(side.texts))
    dense = torch.cat([(q @ side.passages.T).topk(depth, dim=1).indices for q in Q.split(1024)]).tolist()
    bm25_rows, _ = bm25_search(bm25_index(side.texts), queries, depth)
    fused = reciprocal_rank_fusion([bm25_rows.tolist(), dense], r.rrf_k)
    if r.positive == "dense":  # the dense teacher's top-1 first, the rest in fused order
        fused = [[d[0]] + [j for j in f if j != d[0]] for d, f in zip(dense, fused)]
    short = [i for i, f in enumerate(fused) if len(f) < r.group_size]
    if short:
        raise ValueError(f"ranker.group_size {r.group_size}: training query {short[0]} has only "
                         f"{len(fused[short[0]])} fused candidates (collection or ranker.depth too small)")
    return RankerData(queries, fused, side.texts, Q, side.passages)


class LceObjective:
    """Algorithm 1's loss for the ranker: per SubLM, LCE over each query's group (eq. 9, 11),
    plus ``kd_weight`` x the listwise KL to the batch's "teacher" scores (0 = LCE alone)."""

    def __init__(self, model: CrossEncoder, group_size: int, kd_weight: float = 0.0, kd_temperature: float = 1.0):
        self.model, self.m, self.kd_weight, self.kd_temperature = model, group_size, kd_weight, kd_temperature

    def prepare(self, batch: dict) -> None:
        return None

    def loss(self, batch: dict, prep: None, level: int) -> torch.Tensor:
        scores = self.model.scores(batch, level).view(-1, self.m)  # (B, m), positive first
        loss = lce_loss(scores)
        if self.kd_weight:
            loss = loss + self.kd_weight * listwise_kd(scores, batch["teacher"], self.kd_temperature)
        return loss

    def finish(self, prep: None) -> None:
        pass


def group_sampler(data: RankerData, model: CrossEncoder, batch_queries: int, group_size: int, device: torch.device,
                  dense_temperature: float = 0.05):
    """A ``sample(rng)`` for the loop: ``batch_queries`` queries, each with its pseudo-positive
    and ``group_size - 1`` negatives drawn from the rest of its fused list, tokenized as
    (batch_queries x group_size) pairs, query-major; "teacher": (batch_queries, group_size) dense
    teacher scores, q·p / ``dense_temperature`` (0.05: the scale the teacher was trained at)."""
    def sample(rng: random.Random) -> dict:
        qs, ps, teacher = [], [], []
        for i in rng.sample(range(len(data.queries)), min(batch_queries, len(data.queries))):
            group = [data.fused[i][0], *rng.sample(data.fused[i][1:], group_size - 1)]
            qs += [data.queries[i]] * group_size
            ps += [data.texts[j] for j in group]
            teacher.append(data.passage_emb[group] @ data.query_emb[i] / dense_temperature)  # (m,)
        batch = model.pairs(qs, ps)
        batch["teacher"] = torch.stack(teacher)
        return {k: v.to(device) for k, v in batch.items()}
    return sample


def train_teacher(cfg: RecipeConfig) -> Path:
    """The ranker's teacher directory, trained here unless ``ranker.teacher`` names one.

    Raises (before the first step):
        FileNotFoundError / ValueError: a given teacher that is missing or has more than one
            output, a missing or malformed data file, an evaluation query among the training
            queries, or a checkpoint of another run.
    """
    r = cfg.ranker
    if r.teacher:
        CrossEncoder(r.teacher, r.max_length)  # raises on a missing directory or a head of another size
        print(f"[ranker-teacher] using the given cross-encoder {r.teacher}", flush=True)
        return Path(r.teacher)
    out = cfg.ranker_teacher_dir()
    src = teacher_path(cfg)
    key = {"stage": "ranker_teacher", "ranker": {k: v for k, v in asdict(r).items()
                                                 if k not in ("eval_depth", "eval_batch_size")},
           "init": fingerprint(src), "data": [cfg.data.collection, *cfg.data.train_queries],
           "encode": asdict(cfg.encode), "dense_temperature": cfg.query_distill.temperature}
    if (out / "stage.json").exists() and json.loads((out / "stage.json").read_text()).get("key") == key:
        print(f"[ranker-teacher] {out} is up to date", flush=True)
        return out
    model = CrossEncoder(src, r.max_length, seed=r.seed)
    data = ranker_data(cfg)
    device = resolve_device(cfg.train.device)
    configure_torch(cfg.train)
    model.model.to(device)
    model.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    lc = LoopConfig(r.steps, r.lr, r.weight_decay, r.warmup, r.max_grad_norm, r.seed, cfg.train.checkpoint_every,
                    cfg.train.log_every)
    t0 = time.time()
    sample = group_sampler(data, model, r.batch_queries, r.group_size, device, cfg.query_distill.temperature)
    records = train_elastic(model.model, [100], sample, LceObjective(model, r.group_size, r.kd_weight, r.kd_temperature),
                            lc, cfg.run / "checkpoints" / "ranker_teacher", key, device, "ranker-teacher")
    model.model.to("cpu")
    model.save(out)
    (cfg.run / "checkpoints" / "ranker_teacher" / "checkpoint.pt").unlink(missing_ok=True)  # done: stage.json says so
    (out / "stage.json").write_text(json.dumps({"key": key, "queries": len(data.queries),
                                                "train_s": round(time.time() - t0, 1),
                                                "final_loss": records[-1]["loss"] if records else None}, indent=1) + "\n")
    return out


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    out = train_teacher(cfg)
    print(f"[ranker-teacher] {out} ready in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Train ElasticRanker's cross-encoder teacher with LCE on RRF pseudo-positives.", run)


if __name__ == "__main__":
    main()
