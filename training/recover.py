"""Quick elastic recovery (paper Algorithm 1, with an embedding-alignment loss).

    python -m training.recover --config configs/demo.yaml

Every optimizer step traverses every SubLM: forward the batch's queries through SubLM k, loss_k /
K, backward (gradients accumulate in the shared weights), then one clipped AdamW step. loss_k
aligns SubLM k's query embeddings to the teacher's: 1 - cos, plus a KL over the teacher's
similarities to the batch's teacher passages. The largest SubLM also aligns its passage
embeddings to the teacher's, since it encodes the index (paper §4.4). Reads run_dir/pruned,
writes run_dir/elastic (same files).
"""

from __future__ import annotations

import random
import time

import torch
from tqdm import tqdm

from elastic.encoder import ElasticEncoder
from training.config import RecipeConfig, config_cli, teacher_path
from training.losses import cosine_alignment, similarity_kl
from training.teacher import teacher_side


def recover(enc: ElasticEncoder, teacher: ElasticEncoder, queries: list[str], positives: list[int],
            passage_texts: list[str], passage_emb: torch.Tensor, cfg: RecipeConfig) -> list[float]:
    """Train ``enc.model`` in place; returns the mean loss over SubLMs of every step.

    Args:
        queries: training query texts; positives: per query, a row of ``passage_emb``.
        passage_texts: the collection's texts, aligned with ``passage_emb`` (N, d), the
            teacher's passage embeddings.
    """
    rc = cfg.recover
    rng = random.Random(rc.seed)
    torch.manual_seed(rc.seed)
    model = enc.model
    model.train()  # the encoder has no dropout; train() only marks intent
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)
    levels = enc.levels
    history = []
    for _ in tqdm(range(rc.steps), desc="elastic recovery", unit="step"):
        idx = rng.sample(range(len(queries)), rc.batch_size)
        qb = enc.tokenize([queries[i] for i in idx], cfg.encode.query_max_length)
        with torch.no_grad():
            q_t = teacher.embed(qb, 100)  # (B, d) same tokenizer family: same ids
        pos = [positives[i] for i in idx]
        P = passage_emb[pos]  # (B, d) teacher passages: in-batch similarity targets
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for level in levels:  # Algorithm 1: traverse every SubLM, accumulate gradients
            q_s = enc.embed(qb, level)
            loss = cosine_alignment(q_s, q_t) + similarity_kl(q_s, q_t, P, rc.similarity_scale, rc.kd_temperature)
            (loss / len(levels)).backward()
            step_loss += loss.item() / len(levels)
        if rc.passage_weight > 0:
            pp = pos[: rc.passage_batch_size]
            pb = enc.tokenize([passage_texts[i] for i in pp], cfg.encode.passage_max_length)
            (rc.passage_weight * cosine_alignment(enc.embed(pb, levels[0]), passage_emb[pp])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), rc.max_grad_norm)
        opt.step()
        history.append(step_loss)
    model.eval()
    return history


def run(cfg: RecipeConfig) -> None:
    t0 = time.time()
    enc = ElasticEncoder(cfg.run / "pruned")
    teacher = ElasticEncoder(teacher_path(cfg))
    side = teacher_side(cfg, teacher)
    hist = recover(enc, teacher, side.train_queries, side.positives, side.texts, side.passages, cfg)
    out = cfg.run / "elastic"
    enc.save(out)
    k = max(1, len(hist) // 10)
    print(f"[recover] mean loss over SubLMs: first {k} steps {sum(hist[:k]) / k:.4f}, "
          f"last {k} steps {sum(hist[-k:]) / k:.4f}; wrote {out} in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("Quick elastic recovery over all SubLMs (Algorithm 1).", run)


if __name__ == "__main__":
    main()
