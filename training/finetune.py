"""Task-specific fine-tuning of ElasticDenser for dense retrieval (paper §4.4, eq. 9-10, Fig. 6).

    python -m training.finetune --config configs/full.yaml [--device cuda]

Reads run_dir/distilled (run_dir/pruned when ``distill.enabled`` is false), writes run_dir/elastic (the model the archive packs) with
``finetune.json`` saying which encoder the index must use for passages.

Data: the unlabeled training queries. Pseudo-label: each query's positive is the teacher's top-1
passage in the collection (training/teacher.py); its hard negatives are drawn from its BM25
top-``bm25_depth`` without that passage (bm25s). Loss of SubLM k (eq. 9): in-batch negative
log-likelihood over every candidate of the batch (B positives + B·m hard negatives), logits
sim(q, p) / temperature with sim the cosine of the pooled embeddings (the teacher's own
similarity: mean pooling + normalization, instead of the paper's [CLS] dot product). Optionally
plus kd_weight · τ² · KL(teacher || SubLM k) over the same candidates, the teacher's
distribution coming from its own query and passage embeddings.

Passage side (``finetune.passage_side``):
- ``largest``: the paper's choice (Fig. 6): the largest SubLM encodes passages, trained with the
  queries; its embeddings are computed once per step and the gradients every SubLM's loss sends
  to them are accumulated and pushed through the passage encoder once (same result as one
  backward per SubLM, Algorithm 1).
- ``teacher``: the frozen teacher's cached passage embeddings; only the query side trains, so
  the index is the teacher's and every SubLM is aligned to it.
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
from training.loop import LoopConfig, configure_torch, resolve_device, train_elastic
from training.negatives import hard_negative_pools
from training.teacher import teacher_side


def retrieval_loss(q: torch.Tensor, P: torch.Tensor, mask: torch.Tensor, temperature: float,
                   teacher_logits: torch.Tensor | None, kd_weight: float, kd_temperature: float) -> torch.Tensor:
    """Eq. 9 (+ optional distillation) for one SubLM.

    Args:
        q: (B, d) normalized query embeddings; query i's positive is candidate i.
        P: (C, d) normalized candidate passage embeddings, C >= B.
        mask: (B, C) True where a candidate must not count as a negative of that query (the
            same passage as its positive, appearing again in the batch).
        temperature: logits = cos / temperature.
        teacher_logits: (B, C) the teacher's cos / temperature over the same candidates, or None.
        kd_temperature: τ of the KL; the KL is multiplied by τ² so that its gradients keep
            their size as τ changes (Hinton et al. 2015; sentence-transformers' DistillKLDivLoss).
    """
    # masked candidates get a large finite negative logit (not -inf: no inf - inf in the KL)
    logits = (q @ P.T / temperature).masked_fill(mask, -1e4)  # (B, C)
    loss = F.cross_entropy(logits, torch.arange(len(q), device=q.device))
    if teacher_logits is not None and kd_weight > 0:
        t = F.log_softmax(teacher_logits.masked_fill(mask, -1e4) / kd_temperature, dim=-1)  # (B, C)
        s = F.log_softmax(logits / kd_temperature, dim=-1)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
        loss = loss + kd_weight * kd_temperature**2 * kl
    return loss


class RetrievalObjective:
    """Algorithm 1 for eq. 9-10: passage side once per step, the query side per SubLM."""

    def __init__(self, student: ElasticEncoder, teacher: ElasticEncoder, teacher_passages: torch.Tensor,
                 passage_texts: list[str], cfg: RecipeConfig, device: torch.device):
        self.s, self.t, self.TP, self.texts, self.cfg, self.dev = student, teacher, teacher_passages, passage_texts, cfg, device

    def _tok(self, texts: list[str], n: int) -> dict:
        return {k: v.to(self.dev) for k, v in self.s.tokenize(texts, n).items()}

    def prepare(self, batch: tuple[list[str], list[int]]) -> dict:
        queries, cands = batch
        ft, B = self.cfg.finetune, len(queries)
        qb = self._tok(queries, self.cfg.encode.query_max_length)
        cand = torch.tensor(cands, device=self.dev)
        mask = cand[None, :] == cand[:B, None]  # (B, C) same passage as query i's positive
        mask[torch.arange(B), torch.arange(B)] = False  # ...except its own target column
        prep = {"qb": qb, "mask": mask, "teacher_logits": None, "graph": None}
        if ft.kd_weight > 0:
            with torch.no_grad():
                prep["teacher_logits"] = self.t.embed(qb, self.t.levels[0]) @ self.TP[cand].T / ft.temperature
        if ft.passage_side == "teacher":
            prep["P"] = self.TP[cand]
        else:
            g = self.s.embed(self._tok([self.texts[c] for c in cands], self.cfg.encode.passage_max_length), self.s.levels[0])
            prep["graph"], prep["P"] = g, g.detach().requires_grad_(True)
        return prep

    def loss(self, batch, prep: dict, level: int) -> torch.Tensor:
        ft = self.cfg.finetune
        q = self.s.embed(prep["qb"], level)  # (B, d) query side: SubLM k
        return retrieval_loss(q, prep["P"], prep["mask"], ft.temperature, prep["teacher_logits"], ft.kd_weight,
                              ft.kd_temperature)

    def finish(self, prep: dict) -> None:
        if prep["graph"] is not None:  # passage side: every SubLM's accumulated gradient at once
            prep["graph"].backward(prep["P"].grad)


def finetune(cfg: RecipeConfig, src: Path, out: Path, workdir: Path, desc: str = "finetune") -> list[dict]:
    """Fine-tune every SubLM of ``src`` for retrieval into ``out``; returns the log records.

    Raises (before the first step): FileNotFoundError / ValueError for a missing or mismatched
    model directory, malformed data files, or a checkpoint of another run.
    """
    ft = cfg.finetune
    student = ElasticEncoder(src)
    teacher = ElasticEncoder(teacher_path(cfg))
    check_pair(student, teacher, same_hidden=ft.passage_side == "teacher")
    side = teacher_side(cfg, teacher)
    pools = hard_negative_pools(side.texts, side.train_queries, side.positives, ft.bm25_depth,
                                cfg.run / "teacher" / f"bm25_top{ft.bm25_depth}.pt")
    device = resolve_device(cfg.train.device)
    configure_torch(cfg.train)
    student.model.to(device)
    teacher.model.to(device).requires_grad_(False)
    TP = side.passages.to(device)

    def sample(rng):
        qi = rng.sample(range(len(side.train_queries)), ft.batch_size)
        cands = [side.positives[i] for i in qi] + [n for i in qi for n in rng.sample(pools[i], ft.hard_negatives)]
        return [side.train_queries[i] for i in qi], cands

    lc = LoopConfig(ft.steps, ft.lr, ft.weight_decay, ft.warmup, ft.max_grad_norm, ft.seed, cfg.train.checkpoint_every,
                    cfg.train.log_every)
    key = {"stage": "finetune", "finetune": asdict(ft), "src": fingerprint(src), "teacher": str(teacher_path(cfg)),
           "data": [cfg.data.collection, cfg.data.train_queries], "encode": asdict(cfg.encode)}
    records = train_elastic(student.model, student.levels, sample,
                            RetrievalObjective(student, teacher, TP, side.texts, cfg, device), lc, workdir, key, device, desc)
    student.model.to("cpu")
    student.save(out)
    (out / "finetune.json").write_text(json.dumps(
        {"passage_side": ft.passage_side, "teacher": str(teacher_path(cfg)), "kd_weight": ft.kd_weight,
         "steps": ft.steps}, indent=1) + "\n")
    return records


def passage_side_of(model_dir: Path) -> str:
    """'teacher' or 'largest': which encoder built (or must build) the index of ``model_dir``.
    A directory without finetune.json (pruned or distilled only) encodes its own passages."""
    f = Path(model_dir) / "finetune.json"
    return json.loads(f.read_text())["passage_side"] if f.exists() else "largest"


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    out = cfg.run / "elastic"
    finetune(cfg, cfg.task_init(), out, cfg.run / "checkpoints" / "finetune")
    print(f"[finetune] wrote {out} (passage side: {cfg.finetune.passage_side}) in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Fine-tune ElasticDenser for dense retrieval (BM25 hard negatives, optional teacher KL).", run)


if __name__ == "__main__":
    main()
