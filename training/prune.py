"""Prune the teacher into nested SubLMs (paper §4.1).

    python -m training.prune --config configs/demo.yaml

Writes run_dir/pruned/: model.safetensors (the largest SubLM, heads and neurons reordered by
expressive score), submap.json, config.json, tokenizer files, and scores.pt (the raw scores).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from elastic.encoder import ElasticEncoder
from elastic.structure import SubLM, permute, prune
from elastic.submap import Submap
from training.config import RecipeConfig, config_cli, teacher_path
from training.importance import contrastive_loss, distill_scores, expressive_scores, level_widths, relation_scores
from training.query_distill import teacher_candidates
from training.teacher import teacher_side


def build_submap(head_scores: torch.Tensor, neuron_scores: torch.Tensor, levels: list[int], pooling: str,
                 normalize: bool) -> Submap:
    """Preserving level p keeps the top p% of heads (ranked across layers) and the top p% of
    neurons (ranked across layers): p% of the MHA+FFN parameters, since each kind's parameter
    count is proportional to its unit count."""
    return Submap(
        {p: SubLM(level_widths(head_scores, p / 100), level_widths(neuron_scores, p / 100)) for p in levels},
        pooling,
        normalize,
    )


def export_pruned(teacher: ElasticEncoder, head_scores: torch.Tensor, neuron_scores: torch.Tensor, levels: list[int],
                  out: Path) -> Submap:
    """Reorder the teacher's heads and neurons by expressive score, keep the largest level's
    prefix, and write the model directory ``out`` (weights, submap.json, config, tokenizer).

    Args:
        head_scores: (L, A); neuron_scores: (L, I), higher = more expressive.
    """
    submap = build_submap(head_scores, neuron_scores, levels, teacher.submap.pooling, teacher.submap.normalize)
    ordered = permute(teacher.model, [r.argsort(descending=True, stable=True) for r in head_scores],
                      [r.argsort(descending=True, stable=True) for r in neuron_scores])
    teacher.save(out, prune(ordered, submap.levels[submap.largest]), submap)
    torch.save({"head_scores": head_scores, "neuron_scores": neuron_scores}, out / "scores.pt")
    return submap


def prune_task_agnostic(cfg: RecipeConfig, out: Path) -> Submap:
    """Prune the teacher by task-agnostic expressive scores (``relation_scores``) over
    ``prune.score_queries`` texts sampled (seeded) from the unlabeled distillation text,
    ``distill.max_length`` tokens each, a ``distill.pair_fraction`` share of the batches as text
    pairs (training/distill.unlabeled_batch); write the model directory ``out``. ElasticLM's GLUE
    structure (training/glue.py) comes from here."""
    from training.distill import unlabeled_batch, unlabeled_text

    teacher = ElasticEncoder(teacher_path(cfg))
    texts = unlabeled_text(cfg)
    rng = random.Random(cfg.prune.seed)
    bs = cfg.prune.batch_size
    if cfg.distill.pair_fraction > 0:  # batches as distillation draws them, pairs included
        n = max(1, min(cfg.prune.score_queries, len(texts)) // bs)
        batches = [unlabeled_batch(rng, texts, min(bs, len(texts)), cfg.distill.pair_fraction) for _ in range(n)]
    else:
        pick = rng.sample(texts, min(cfg.prune.score_queries, len(texts)))
        batches = [pick[s:s + bs] for s in range(0, len(pick), bs)]
    hs, ns = relation_scores(teacher, batches, cfg.distill.max_length, cfg.distill.relation_heads)
    return export_pruned(teacher, hs, ns, cfg.prune.levels, out)


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    if cfg.prune.score_objective == "glue_task":
        raise ValueError("config prune.score_objective: 'glue_task' ranks units by the GLUE teachers' task losses, "
                         "which training.glue fine-tunes first: run python -m training.glue --config ...")
    if cfg.prune.score_objective == "relation":
        submap = prune_task_agnostic(cfg, cfg.run / "pruned")
        print(f"[prune] relation scores; levels {list(submap.levels)}; wrote {cfg.run / 'pruned'} in "
              f"{time.time() - t0:.0f} s", flush=True)
        return
    teacher = ElasticEncoder(teacher_path(cfg))
    side = teacher_side(cfg, teacher)
    print(f"[prune] teacher side ready ({len(side.pids)} passages) in {time.time() - t0:.0f} s", flush=True)
    rng = random.Random(cfg.prune.seed)
    idx = rng.sample(range(len(side.train_queries)), min(cfg.prune.score_queries, len(side.train_queries)))
    bs = cfg.prune.batch_size
    if cfg.prune.score_objective == "contrastive":
        batches = [
            ([side.train_queries[i] for i in idx[s:s + bs]], [side.texts[side.positives[i]] for i in idx[s:s + bs]])
            for s in range(0, len(idx), bs)
        ]
        hs, ns = expressive_scores(
            teacher, batches, lambda q, p: contrastive_loss(q, p, cfg.prune.temperature),
            cfg.encode.query_max_length, cfg.encode.passage_max_length,
        )
    else:
        qd = cfg.query_distill
        top = teacher_candidates(side, qd.candidates, cfg.run / "teacher" / f"top{qd.candidates}.pt")
        batches = [([side.train_queries[i] for i in idx[s:s + bs]], top[idx[s:s + bs]]) for s in range(0, len(idx), bs)]
        hs, ns = distill_scores(teacher, batches, side.passages, cfg.encode.query_max_length, qd.temperature,
                                qd.cos_weight, qd.kd_weight, qd.kd_temperature, cfg.prune.seed)
    out = cfg.run / "pruned"
    submap = export_pruned(teacher, hs, ns, cfg.prune.levels, out)
    for p, s in submap.levels.items():
        print(f"[prune] level {p:>3}%: heads/layer {list(s.heads)} neurons/layer {list(s.neurons)}")
    print(f"[prune] expressive scores: {cfg.prune.score_objective} objective over {len(idx)} queries")
    print(f"[prune] wrote {out} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Prune the teacher into nested SubLMs (expressive scores).", run)


if __name__ == "__main__":
    main()
