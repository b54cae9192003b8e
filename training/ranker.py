"""ElasticRanker (paper §4.4, eq. 9-11, with the elastic structure of §4.1 and Algorithm 1 of §4.2).

    python -m training.ranker --config configs/ranker.yaml [--device cuda]

1. Teacher: the cross-encoder of training/ranker_teacher.py (trained here, or ``ranker.teacher``).
2. Structure: the teacher's heads and FFN neurons ranked by LCE expressive scores
   (training/importance.lce_scores: E|∂L^LCE/∂gate| over ``elastic_ranker.score_queries`` training
   queries' groups), reordered so that every preserving level of ``prune.levels`` is a per-layer
   prefix, and cut to the largest level -> run_dir/ranker/pruned (scores.pt beside it).
3. Elastic: every SubLM at every step (Algorithm 1) on groups of one pseudo-positive and m - 1
   localized negatives (the teacher's training data, ``ranker``):

       L_k = lce_weight · LCE(s_k)                                   (eq. 9 with eq. 11)
           + kd_weight · τ² · KL(softmax(t / τ) || softmax(s_k / τ))   (the teacher's group scores t)
           + relation_weight · Σ_{Q,K,V} KL(teacher relations || SubLM relations)   (eq. 7)

   (the relations of the first ``relation_pairs`` pairs of each group, the pseudo-positive first:
   relations of every pair cost four times the SubLM's own step on this CPU)

   LCE alone would teach each SubLM the pseudo-labels, which are often wrong (P@1 0.372 on dev500,
   benchmarks/results/rerank_labels.json); the teacher's scores say how much each negative is
   worse, and the relations carry its attention structure (MiniLMv2, through an additional MHA
   block on each SubLM, thrown away afterwards) -> run_dir/ranker/elastic.
4. Static baselines ("w/o elasticity", §5.2): each level of ``static.levels`` (default every
   level) cut physically out of the pruned model and trained alone with the same loss, data and
   number of steps -> run_dir/ranker/static/<p>.

Every stage resumes from its checkpoint (training/loop.py) and leaves ``stage.json`` (what
produced it) beside its weights; a rerun with the same inputs skips it. Bad input (a teacher
with more than one output, a malformed data file, an evaluation query among the training
queries, a bad config field) fails before the first step. ``python -m benchmarks.rerank``
evaluates the result.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from elastic.ranker import CrossEncoder
from elastic.submap import Submap
from elastic.structure import permute, prune
from training.config import RecipeConfig, config_cli
from training.distill import fingerprint
from training.importance import lce_scores
from training.lce_loss import lce_loss
from training.loop import LoopConfig, configure_torch, level_weights, resolve_device, train_elastic
from training.prune import build_submap
from training.rank_kd_loss import listwise_kd
from training.ranker_teacher import RankerData, group_sampler, ranker_data, train_teacher
from training.relations import RelationHead, last_layer_relations, relation_kl
from training.static import static_levels


class ElasticRankerObjective:
    """Algorithm 1's loss for ElasticRanker (module docstring, step 3).

    ``prepare`` runs the teacher once per step (no grad): its group scores (B, m) and, when
    ``relation_weight`` > 0, its last-layer relations; ``loss`` runs one SubLM.
    """

    def __init__(self, student: CrossEncoder, teacher: CrossEncoder, relation_head: RelationHead | None,
                 group_size: int, lce_weight: float, kd_weight: float, kd_temperature: float,
                 relation_weight: float, relation_heads: int, relation_pairs: int = 1):
        self.student, self.teacher, self.head, self.m = student, teacher, relation_head, group_size
        self.lce_weight, self.kd_weight, self.kd_temperature = lce_weight, kd_weight, kd_temperature
        self.relation_weight, self.R, self.relation_pairs = relation_weight, relation_heads, relation_pairs
        if relation_weight and relation_head is None:
            raise ValueError("ElasticRankerObjective: relation_weight > 0 needs a relation head")

    def _related(self, n_pairs: int) -> torch.Tensor:
        """(B·relation_pairs,) rows of the batch whose relations are distilled: the first
        ``relation_pairs`` of each group of m (the pseudo-positive first)."""
        groups = torch.arange(0, n_pairs, self.m)
        return (groups[:, None] + torch.arange(self.relation_pairs)).reshape(-1)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        t = self.teacher.model
        states = t.bert(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                        all_hidden_states=True)  # L + 1 of (B·m, T, d)
        out = {"scores": t.head(states[-1])[:, 0].view(-1, self.m)}  # (B, m)
        if self.relation_weight:
            rows = self._related(len(batch["input_ids"])).to(states[-2].device)
            out["rows"] = rows
            out["relations"] = last_layer_relations(t.bert, states[-2][rows], batch["attention_mask"][rows], self.R)
        return out

    def loss(self, batch: dict, prep: dict, level: int) -> torch.Tensor:
        s = self.student.model
        h = s.bert(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   sublm=self.student.sublm(level))  # (B·m, T, d)
        scores = s.head(h)[:, 0].view(-1, self.m)  # (B, m), pseudo-positive first
        loss = scores.new_zeros(())
        if self.lce_weight:
            loss = loss + self.lce_weight * lce_loss(scores)
        if self.kd_weight:
            loss = loss + self.kd_weight * listwise_kd(scores, prep["scores"], self.kd_temperature)
        if self.relation_weight:
            rows = prep["rows"]
            rel = self.head(h[rows], batch["attention_mask"][rows], self.R)
            loss = loss + self.relation_weight * relation_kl(prep["relations"], rel, batch["attention_mask"][rows])
        return loss

    def finish(self, prep: dict) -> None:
        pass


def export_pruned(teacher: CrossEncoder, head_scores: torch.Tensor, neuron_scores: torch.Tensor, levels: list[int],
                  out: Path) -> Submap:
    """The teacher's heads and neurons reordered by expressive score (most expressive first),
    cut to the largest level, written with its submap (levels ``levels``) to ``out``.

    Args:
        head_scores: (L, A); neuron_scores: (L, I); higher = more expressive.
    """
    submap = build_submap(head_scores, neuron_scores, levels, "cls", False)
    ordered = permute(teacher.model.bert, [r.argsort(descending=True, stable=True) for r in head_scores],
                      [r.argsort(descending=True, stable=True) for r in neuron_scores])
    teacher.save_encoder(prune(ordered, submap.levels[submap.largest]), submap, out)
    torch.save({"head_scores": head_scores, "neuron_scores": neuron_scores}, out / "scores.pt")
    return submap


def prune_ranker(cfg: RecipeConfig, teacher: CrossEncoder, data: RankerData, out: Path) -> Submap:
    """Step 2 of the module docstring; skipped when ``out`` holds a structure of the same inputs."""
    e = cfg.elastic_ranker
    key = {"stage": "ranker_prune", "teacher": fingerprint(teacher.model_dir), "levels": cfg.prune.levels,
           "score_queries": e.score_queries, "score_batch_queries": e.score_batch_queries, "group_size": e.group_size,
           "seed": e.seed, "queries": len(data.queries)}
    done = out / "stage.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        print(f"[ranker] pruned before: {out}", flush=True)
        return Submap.load(out / "submap.json", teacher.dims)
    t0 = time.time()
    sample = group_sampler(data, teacher, e.score_batch_queries, e.group_size, torch.device("cpu"))
    n_batches = -(-min(e.score_queries, len(data.queries)) // e.score_batch_queries)
    batches = (sample(random.Random(e.seed * 7919 + i)) for i in range(n_batches))
    teacher.model.eval()  # no dropout on the pooled output while scoring
    hs, ns = lce_scores(teacher, batches, e.group_size)
    submap = export_pruned(teacher, hs, ns, cfg.prune.levels, out)
    done.write_text(json.dumps({"key": key, "wall_s": round(time.time() - t0, 1)}, indent=1) + "\n")
    for p, s in submap.levels.items():
        print(f"[ranker] level {p:>3}%: heads/layer {list(s.heads)} neurons/layer {list(s.neurons)}", flush=True)
    print(f"[ranker] LCE expressive scores over {n_batches} batches; wrote {out} in {time.time() - t0:.0f} s", flush=True)
    return submap


def train_ranker(cfg: RecipeConfig, init: Path, teacher: CrossEncoder, data: RankerData, levels: list[int] | None,
                 out: Path, workdir: Path, desc: str) -> Path:
    """Train the SubLMs ``levels`` (None: every level of ``init``) of the cross-encoder ``init``
    together, every one at every step, with ElasticRankerObjective; write the model directory
    ``out``. Skipped when ``out/stage.json`` holds the same key."""
    e, r = cfg.elastic_ranker, cfg.ranker
    student = CrossEncoder(init, r.max_length, e.dropout, e.seed)
    levels = levels or student.levels
    settings = asdict(e)
    if len(levels) == 1:  # one SubLM's weight is 1 whatever the power: a static baseline keeps its key
        settings["level_weight_power"] = 0.0
    key = {"stage": "elastic_ranker", "elastic_ranker": settings, "init": fingerprint(init),
           "teacher": fingerprint(teacher.model_dir), "levels": levels,
           "relation_heads": cfg.distill.relation_heads,
           "data": {k: getattr(r, k) for k in ("train_queries", "depth", "rrf_k", "positive", "max_length", "seed")}}
    done = out / "stage.json"
    if done.exists() and json.loads(done.read_text()).get("key") == json.loads(json.dumps(key)):
        print(f"[{desc}] done before: {out}", flush=True)
        return out
    device = resolve_device(cfg.train.device)
    torch.manual_seed(e.seed)
    rel = (RelationHead(student.dims.hidden_size, teacher.model.bert.encoder.layer[-1].attention.self)
           if e.relation_weight else None)
    trained = nn.ModuleDict({"model": student.model, **({"relation_head": rel} if rel is not None else {})}).to(device)
    student.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # as the teacher's recipe
    teacher.model.to(device).eval()
    objective = ElasticRankerObjective(student, teacher, rel, e.group_size, e.lce_weight, e.kd_weight,
                                       e.kd_temperature, e.relation_weight, cfg.distill.relation_heads,
                                       e.relation_pairs)
    base = group_sampler(data, student, e.batch_queries, e.group_size, device)

    def sample(rng: random.Random) -> dict:
        batch = base(rng)
        batch.pop("teacher")  # the dense teacher's scores: this stage distils the cross-encoder instead
        return batch

    lc = LoopConfig(e.steps, e.lr, e.weight_decay, e.warmup, e.max_grad_norm, e.seed, cfg.train.checkpoint_every,
                    cfg.train.log_every)
    t0 = time.time()
    weights = level_weights(levels, e.level_weight_power)  # all 1 (power 0, or one level): the loop's uniform run
    records = train_elastic(trained, levels, sample, objective, lc, workdir, key, device, desc, weights)
    student.model.to("cpu")
    teacher.model.to("cpu")
    student.save(out)
    done.write_text(json.dumps({"key": key, "steps": e.steps, "wall_s": round(time.time() - t0, 1),
                                "last": records[-1] if records else None}, indent=1) + "\n")
    shutil.copy(workdir / "train_log.jsonl", out / "train_log.jsonl")
    (workdir / "checkpoint.pt").unlink(missing_ok=True)  # weights + AdamW moments; the output holds the result
    return out


def run(cfg: RecipeConfig) -> None:
    """The whole recipe (module docstring); finished stages are skipped, unfinished ones resume."""
    t0 = time.time()
    configure_torch(cfg.train)
    data = ranker_data(cfg)  # fails on bad data before any training
    teacher = CrossEncoder(train_teacher(cfg), cfg.ranker.max_length)
    root = cfg.run / "ranker"
    prune_ranker(cfg, teacher, data, root / "pruned")
    train_ranker(cfg, root / "pruned", teacher, data, None, root / "elastic", root / "checkpoints" / "elastic",
                 "ranker elastic")
    if cfg.static.enabled:
        pruned = CrossEncoder(root / "pruned", cfg.ranker.max_length)
        for level in static_levels(cfg):
            sroot = root / "static" / str(level)
            if not (sroot / "pruned" / "submap.json").exists():
                pruned.cut(level, sroot / "pruned")
            train_ranker(cfg, sroot / "pruned", teacher, data, [level], sroot / "model",
                         root / "checkpoints" / "static" / str(level), f"ranker static {level}%")
    print(f"[ranker] every stage done in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("ElasticRanker: LCE expressive scores, elastic distillation + LCE of every SubLM, static baselines.",
               run)


if __name__ == "__main__":
    main()
