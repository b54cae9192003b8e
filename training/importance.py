"""Expressive scores of heads and FFN neurons (paper eq. 3-5, Molchanov et al. 2019).

Gates ξ (one per head) and ν (one per neuron) are held at 1 and multiply each head's output and
each GELU output; |∂L/∂gate| accumulated over batches is the first-order Taylor estimate of the
loss change when that unit is removed (eq. 6). Scores are ℓ2-normalized per layer so that
layers compare; heads and neurons are ranked separately (their scores are not comparable).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from elastic.encoder import ElasticEncoder


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch negative log-likelihood (eq. 9 with in-batch negatives): query i's positive is
    passage i. q, p: (B, d). The teacher (all-MiniLM-L6-v2) was trained with this loss at scale
    20, i.e. temperature 0.05, on cosine similarities."""
    logits = q @ p.T / temperature  # (B, B)
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))


def expressive_scores(
    enc: ElasticEncoder,
    batches: Iterable[tuple[list[str], list[str]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    query_max_length: int,
    passage_max_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate |∂L/∂ξ| and |∂L/∂ν| over (queries, positive passages) batches.

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).
    """
    layout = enc.model.layout
    if layout != enc.dims.full():
        raise ValueError("expressive scores are computed on the unpruned teacher")
    L = enc.dims.num_hidden_layers
    xi = [torch.ones(h, requires_grad=True) for h in layout.heads]
    nu = [torch.ones(n, requires_grad=True) for n in layout.neurons]
    hs = torch.zeros(L, enc.dims.num_attention_heads)
    ns = torch.zeros(L, enc.dims.intermediate_size)

    def emb(texts, max_len):
        return enc.embed(enc.tokenize(texts, max_len), enc.levels[0], head_gates=xi, neuron_gates=nu)

    n_batches = 0
    for queries, passages in batches:
        loss = loss_fn(emb(queries, query_max_length), emb(passages, passage_max_length))
        gx = torch.autograd.grad(loss, xi + nu)  # gradients w.r.t. the gates only
        hs += torch.stack([g.abs() for g in gx[:L]])
        ns += torch.stack([g.abs() for g in gx[L:]])
        n_batches += 1
    if n_batches == 0:
        raise ValueError("expressive scores need at least one batch")
    hs = hs / hs.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ns = ns / ns.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return hs, ns


def level_widths(scores: torch.Tensor, fraction: float) -> list[int]:
    """Per-layer counts of the units kept when the top ``fraction`` of all units, ranked
    across layers by score, are preserved. scores: (L, U). Nested in ``fraction`` by
    construction (a larger fraction keeps a superset)."""
    L, U = scores.shape
    k = int(round(fraction * L * U))
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order[:k]] = True
    return kept.view(L, U).sum(1).tolist()
