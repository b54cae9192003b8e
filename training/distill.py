"""Task-agnostic elastic distillation (paper §4.2, eq. 7-8, Algorithm 1).

    python -m training.distill --config configs/full.yaml [--device cuda]

Reads run_dir/pruned (the nested SubLMs cut from the teacher), distils every SubLM at every step
from the teacher's last-layer Q-Q, K-K and V-V relations (MiniLMv2, training/relations.py) over
unlabeled text: WikiText paragraphs, the passage collection and the training queries, a share of
the batches as text pairs (``distill.pair_fraction``, ``unlabeled_batch``). Writes
run_dir/distilled (same files as pruned; the additional MHA block is training-only and stays in
the checkpoint run_dir/checkpoints/distill/).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from elastic.data import read_query_files, read_tsv, read_wikitext
from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, config_cli, teacher_path
from training.loop import LoopConfig, configure_torch, resolve_device, train_elastic
from training.relations import RelationHead, relation_kl, teacher_relations


def fingerprint(model_dir: Path) -> str:
    """sha256 of a model directory's weights and submap: what a checkpoint was trained from."""
    h = hashlib.sha256()
    for f in ("model.safetensors", "submap.json"):
        p = Path(model_dir) / f
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def unlabeled_text(cfg: RecipeConfig) -> list[str]:
    """WikiText paragraphs + (optionally) collection passages + training queries.

    Raises:
        FileNotFoundError / ValueError: a missing, empty or malformed file (named).
    """
    dc = cfg.distill
    texts = [p for f in dc.text for p in read_wikitext(f)]
    if dc.use_collection:
        texts += list(read_tsv(cfg.data.collection).values())
    if dc.use_train_queries:
        texts += read_query_files(cfg.data.train_queries, held_out=cfg.data.dev_queries)
    if not texts:
        raise ValueError("config distill.text: no unlabeled text (empty list and collection/queries off)")
    return texts


def unlabeled_batch(rng: random.Random, texts: list[str], batch_size: int,
                    pair_fraction: float) -> list[str] | list[tuple[str, str]]:
    """One batch of unlabeled examples: ``batch_size`` texts, or, with probability
    ``pair_fraction``, ``batch_size`` (A, B) pairs built as BERT's pretraining input (Devlin et al.
    2019, next-sentence prediction): a text cut in two halves at its middle word, B being that
    text's second half for half the pairs and the second half of another random text for the rest.

    Why pairs: half of GLUE's tasks (MRPC, STS-B, RTE, QNLI) read ``[CLS] A [SEP] B [SEP]``, and a
    head that compares the two segments may do little on single texts, so scores and relations on
    single texts alone could rank it low. Measured on STS-B (benchmarks/results/glue_probes/
    stsb_pair_scores, pair_fraction 0.5): no gain; 10 % still collapses (Spearman 12.5 against
    15.2 on single texts). A text of one word is its own A and B.
    """
    picked = rng.sample(texts, batch_size)
    if rng.random() >= pair_fraction:
        return picked

    def halves(t: str) -> tuple[str, str]:
        w = t.split()
        m = max(1, len(w) // 2)
        return " ".join(w[:m]), " ".join(w[m:]) or " ".join(w[:m])

    out = []
    for t in picked:
        a, b = halves(t)
        if rng.random() < 0.5:
            b = halves(rng.choice(texts))[1]
        out.append((a, b))
    return out


def check_pair(student: ElasticEncoder, teacher: ElasticEncoder, relation_heads: int | None = None,
               same_hidden: bool = False) -> None:
    """Fail before training when student and teacher cannot be distilled into each other.

    Raises:
        ValueError: different vocabularies (the token ids must be shared), hidden sizes not
            divisible by ``relation_heads`` R, or (``same_hidden``) different hidden sizes.
    """
    s, t = student.dims, teacher.dims
    if s.vocab_size != t.vocab_size or len(student.tokenizer) != len(teacher.tokenizer):
        raise ValueError(f"{student.model_dir}: vocabulary ({s.vocab_size}) differs from the teacher's "
                         f"{teacher.model_dir} ({t.vocab_size}); student and teacher must share the tokenizer")
    if relation_heads is not None:
        for name, d in (("student", s), ("teacher", t)):
            if d.hidden_size % relation_heads:
                raise ValueError(f"config distill.relation_heads: {relation_heads} does not divide the {name}'s "
                                 f"hidden size {d.hidden_size}")
    if same_hidden and s.hidden_size != t.hidden_size:
        raise ValueError(f"{student.model_dir}: hidden size {s.hidden_size} differs from the teacher's {t.hidden_size}; "
                         "its queries cannot be scored against teacher passages")


class _Student(nn.Module):
    """The parameters one distillation run updates: the elastic encoder and the relation head."""

    def __init__(self, encoder: nn.Module, head: RelationHead):
        super().__init__()
        self.encoder, self.head = encoder, head


class RelationObjective:
    """Algorithm 1's loss: teacher relations once per step, each SubLM's relations through the
    shared additional MHA block, KL summed over Q/K/V (eq. 7)."""

    def __init__(self, student: ElasticEncoder, teacher: ElasticEncoder, head: RelationHead, relation_heads: int):
        self.student, self.teacher, self.head, self.R = student, teacher, head, relation_heads

    def prepare(self, batch: dict) -> dict:
        return teacher_relations(self.teacher.model, batch, self.R)  # no grad to the teacher

    def loss(self, batch: dict, prep: dict, level: int) -> torch.Tensor:
        h = self.student.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                               sublm=self.student.sublm(level))  # (B, T, d) hiddens of SubLM k
        return relation_kl(prep, self.head(h, batch["attention_mask"], self.R), batch["attention_mask"])

    def finish(self, prep: dict) -> None:
        pass


def distill(cfg: RecipeConfig, src: Path, out: Path, workdir: Path, desc: str = "distill") -> list[dict]:
    """Distil every SubLM of the model directory ``src`` into ``out``; returns the log records.

    Everything that can fail on bad input (model directories, text files, tokenizer and size
    compatibility, a checkpoint from another run) fails before the first step.
    """
    dc = cfg.distill
    texts = unlabeled_text(cfg)
    student = ElasticEncoder(src)
    teacher = ElasticEncoder(teacher_path(cfg))
    check_pair(student, teacher, dc.relation_heads)
    device = resolve_device(cfg.train.device)
    configure_torch(cfg.train)
    torch.manual_seed(dc.seed)
    head = RelationHead(student.dims.hidden_size,
                        teacher.model.encoder.layer[-1].attention.self if teacher.dims.hidden_size == student.dims.hidden_size
                        else None)
    trainable = _Student(student.model, head).to(device)
    teacher.model.to(device).requires_grad_(False)

    def sample(rng):
        b = student.tokenize(unlabeled_batch(rng, texts, dc.batch_size, dc.pair_fraction), dc.max_length)
        return {k: v.to(device) for k, v in b.items()}

    lc = LoopConfig(dc.steps, dc.lr, dc.weight_decay, dc.warmup, dc.max_grad_norm, dc.seed, cfg.train.checkpoint_every,
                    cfg.train.log_every)
    settings = asdict(dc)
    if settings["pair_fraction"] == 0:  # added later; at its default, checkpoints from before it still resume
        del settings["pair_fraction"]
    key = {"stage": "distill", "distill": settings, "src": fingerprint(src), "teacher": str(teacher_path(cfg)),
           "data": [cfg.data.collection, cfg.data.train_queries]}
    records = train_elastic(trainable, student.levels, sample, RelationObjective(student, teacher, head, dc.relation_heads),
                            lc, workdir, key, device, desc)
    student.model.to("cpu")
    student.save(out)
    return records


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    out = cfg.run / "distilled"
    distill(cfg, cfg.run / "pruned", out, cfg.run / "checkpoints" / "distill")
    print(f"[distill] wrote {out} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Task-agnostic elastic distillation: MiniLMv2 relations over every SubLM.", run)


if __name__ == "__main__":
    main()
