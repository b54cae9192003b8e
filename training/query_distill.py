"""Query-side elastic distillation to the fixed passage index (paper §4.2 Algorithm 1, §4.4).

    python -m training.query_distill --config configs/full.yaml [--device cuda]

Reads ``cfg.task_init()`` (run_dir/pruned, or run_dir/distilled after relation distillation),
writes run_dir/elastic (the model the archive packs) with ``finetune.json`` saying that the index
holds the teacher's passage embeddings.

Serving retrieves with a SubLM's query embedding from an index that one encoder filled once.
When that encoder is the teacher, the best a SubLM can do is to put its query where the
teacher's query is. So every SubLM k learns, on label-free queries (every file of
``data.train_queries``, plus ``pseudo_queries`` spans of WikiText when asked for), two things
against the fixed teacher index P (N, d):

- where: ``cos_weight · (1 - cos(s_k(q), t(q)))``, the teacher's query embedding t(q) as the
  target (label-free embedding matching: Wang & Lyu 2023; EmbedDistill, Kim et al. 2023);
- how it ranks: ``kd_weight · τ_kd² · KL(p_t || p_k)`` over candidates C, the union of the
  teacher's top-``candidates`` passages of every query of the batch (each query's own hard
  candidates, and the others' as sampled negatives), with p(c | q) = softmax(score(q, P_c) / τ
  / τ_kd). τ (``temperature``, 0.05) is the similarity scale the teacher was trained at; τ_kd
  softens both distributions, and the τ_kd² factor keeps the gradient's size as τ_kd changes
  (Hinton et al. 2015; sentence-transformers' DistillKLDivLoss).
- optionally, token by token: ``token_weight · L_tok``, each query token's last hidden state
  toward the teacher's (training/token_loss.py); it costs one teacher forward per step.

Every SubLM trains at every step (Algorithm 1, training/loop.py), its loss weighted by
``level_weight_power`` (0: alike; > 0: the small SubLMs more, training/loop.level_weights).
Nothing is encoded on the passage side during training: the teacher's passage and query
embeddings are computed once per run (training/teacher.py), so a step costs K forward/backward
passes of short queries only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, config_cli, teacher_path
from training.distill import check_pair, fingerprint
from training.loop import LoopConfig, configure_torch, level_weights, resolve_device, train_elastic
from training.teacher import TeacherSide, teacher_side
from training.token_loss import token_cosine_loss


def query_distill_loss(s: torch.Tensor, t: torch.Tensor, t_logits: torch.Tensor, P: torch.Tensor, temperature: float,
                       cos_weight: float, kd_weight: float, kd_temperature: float) -> torch.Tensor:
    """The loss of one SubLM (see the module docstring).

    Args:
        s: (B, d) the SubLM's query embeddings (with grad).
        t: (B, d) the teacher's query embeddings.
        t_logits: (B, C) the teacher's scores of the candidates divided by ``temperature``.
        P: (C, d) the candidates' passage embeddings in the fixed index.
        temperature: τ, the similarity scale: logits = score / τ.
        kd_temperature: τ_kd; the KL is multiplied by τ_kd² (see the module docstring).

    Returns:
        a scalar: mean over the batch.
    """
    loss = s.new_zeros(())
    if cos_weight > 0:
        loss = loss + cos_weight * (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kd_weight > 0:
        student = F.log_softmax(s @ P.T / temperature / kd_temperature, dim=-1)  # (B, C)
        teacher = F.log_softmax(t_logits / kd_temperature, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        loss = loss + kd_weight * kd_temperature**2 * kl
    return loss


def batch_sampler(lengths: list[int], batch_size: int, window: int, section: str = "query_distill",
                  unit: str = "queries"):
    """A function ``rng -> batch_size`` distinct query indices.

    ``window`` = 0: uniform over all queries. ``window`` = w >= 1: the queries are ordered by
    token length and a batch is drawn uniformly from a random run of w·batch_size neighbours in
    that order, so that a batch pads to little more than its own queries' length (on this CPU
    about twice the queries per second at batch 128: benchmarks/results/train_throughput.md).

    Raises:
        ValueError: fewer queries than ``batch_size``, or a negative ``window`` (the message
            names ``section``'s field: query_distill for queries, glue for GLUE examples).
    """
    n = len(lengths)
    if n < batch_size:
        raise ValueError(f"config {section}.batch_size: {batch_size} is more than the {n} training {unit}")
    if window < 0:
        raise ValueError(f"config {section}.length_window: must be >= 0 (0 = uniform sampling)")
    if window == 0:
        return lambda rng: rng.sample(range(n), batch_size)
    order = sorted(range(n), key=lengths.__getitem__)
    span = min(n, window * batch_size)

    def sample(rng) -> list[int]:
        start = rng.randrange(0, n - span + 1)
        return rng.sample(order[start:start + span], batch_size)

    return sample


def teacher_candidates(side: TeacherSide, k: int, cache: Path) -> torch.Tensor:
    """(Q, k) int64: each training query's top-k passages (rows of the index) by the teacher's
    score, cached in ``cache`` under the shapes of its inputs."""
    key = [tuple(side.queries.shape), tuple(side.passages.shape), k, float(side.queries[:8].sum()),
           float(side.passages[:8].sum())]
    if cache.exists():
        obj = torch.load(cache)
        if obj["key"] == key:
            return obj["value"]
    k = min(k, len(side.passages))
    top = torch.cat([(q @ side.passages.T).topk(k, dim=1).indices for q in side.queries.split(2048)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "value": top}, cache)
    return top


class QueryDistillObjective:
    """Algorithm 1 for query-side distillation: teacher targets once per step, then every SubLM."""

    def __init__(self, student: ElasticEncoder, side: TeacherSide, top: torch.Tensor, cfg: RecipeConfig,
                 device: torch.device, teacher: ElasticEncoder | None = None):
        self.s, self.cfg, self.dev, self.teacher = student, cfg, device, teacher
        if cfg.query_distill.token_weight > 0 and teacher is None:
            raise ValueError("config query_distill.token_weight > 0 needs the teacher model (its hidden states)")
        self.texts, self.top = side.train_queries, top
        self.T, self.P = side.queries.to(device), side.passages.to(device)

    def prepare(self, batch: list[int]) -> dict:
        qd = self.cfg.query_distill
        qb = {k: v.to(self.dev) for k, v in self.s.tokenize([self.texts[i] for i in batch],
                                                             self.cfg.encode.query_max_length).items()}
        idx = torch.tensor(batch)
        t = self.T[idx.to(self.dev)]  # (B, d)
        cand = self.top[idx].flatten().unique().to(self.dev)  # (C,) rows of the index
        P = self.P[cand]  # (C, d)
        prep = {"qb": qb, "t": t, "P": P, "t_logits": t @ P.T / qd.temperature}
        if qd.token_weight > 0:
            with torch.no_grad():
                prep["t_hidden"] = self.teacher.hidden(qb, self.teacher.levels[0])  # (B, T, d)
        return prep

    def loss(self, batch, prep: dict, level: int) -> torch.Tensor:
        qd, qb = self.cfg.query_distill, prep["qb"]
        h = self.s.hidden(qb, level)  # (B, T, d) SubLM k's last hidden states
        s = self.s.pool(h, qb["attention_mask"])  # (B, d) its query side
        loss = query_distill_loss(s, prep["t"], prep["t_logits"], prep["P"], qd.temperature, qd.cos_weight,
                                  qd.kd_weight, qd.kd_temperature)
        if qd.token_weight > 0:
            loss = loss + qd.token_weight * token_cosine_loss(h, prep["t_hidden"], qb["attention_mask"])
        return loss

    def finish(self, prep: dict) -> None:
        pass


def query_distill(cfg: RecipeConfig, src: Path, out: Path, workdir: Path, desc: str = "query-distill") -> list[dict]:
    """Distil every SubLM of ``src`` toward the teacher's queries and rankings into ``out``.

    Returns:
        the training log records.

    Raises (before the first step):
        FileNotFoundError / ValueError: a missing or mismatched model directory (student and
            teacher must share hidden size and tokenizer), a missing, empty or malformed query
            file, an evaluation query among the training queries, or a checkpoint of another run.
    """
    qd = cfg.query_distill
    student = ElasticEncoder(src)
    teacher = ElasticEncoder(teacher_path(cfg))
    check_pair(student, teacher, same_hidden=True)
    side = teacher_side(cfg, teacher, pseudo=True)
    top = teacher_candidates(side, qd.candidates, cfg.run / "teacher" / f"top{qd.candidates}.pt")
    device = resolve_device(cfg.train.device)
    if qd.token_weight > 0:
        teacher.model.to(device).requires_grad_(False)
    else:
        teacher = None
    configure_torch(cfg.train)
    student.model.to(device)
    student.model.embeddings.word_embeddings.weight.requires_grad_(not qd.freeze_word_embeddings)
    n = len(side.train_queries)
    lengths = [len(x) for x in student.tokenizer(side.train_queries, truncation=True,
                                                 max_length=cfg.encode.query_max_length)["input_ids"]]
    sample = batch_sampler(lengths, qd.batch_size, qd.length_window)

    lc = LoopConfig(qd.steps, qd.lr, qd.weight_decay, qd.warmup, qd.max_grad_norm, qd.seed,
                    cfg.train.checkpoint_every, cfg.train.log_every)
    qkey = asdict(qd)
    if qkey["token_weight"] == 0:  # added later; at its default, stages finished before it are still done
        del qkey["token_weight"]
    if qkey["pseudo_queries"] == 0:  # likewise
        for k in ("pseudo_queries", "pseudo_query_min_words", "pseudo_query_max_words"):
            del qkey[k]
    weights = level_weights(student.levels, qkey.pop("level_weight_power"))  # likewise: the loop keys non-uniform ones
    key = {"stage": "query_distill", "query_distill": qkey, "src": fingerprint(src),
           "teacher": str(teacher_path(cfg)), "data": [cfg.data.collection, *cfg.data.train_queries],
           "encode": asdict(cfg.encode)}
    if qd.pseudo_queries:
        key["pseudo_text"] = list(cfg.distill.text)
    objective = QueryDistillObjective(student, side, top, cfg, device, teacher)
    records = train_elastic(student.model, student.levels, sample, objective, lc, workdir, key, device, desc, weights)
    student.model.to("cpu")
    student.save(out)
    (out / "finetune.json").write_text(json.dumps(
        {"passage_side": "teacher", "stage": "query_distill", "teacher": str(teacher_path(cfg)),
         "steps": qd.steps, "queries": n}, indent=1) + "\n")
    return records


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    out = cfg.run / "elastic"
    query_distill(cfg, cfg.task_init(), out, cfg.run / "checkpoints" / "query_distill")
    print(f"[query-distill] wrote {out} (index: the teacher's passage embeddings) in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Query-side elastic distillation to the teacher's fixed passage index.", run)


if __name__ == "__main__":
    main()
