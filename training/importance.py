"""Expressive scores of heads and FFN neurons (paper eq. 3-5, Molchanov et al. 2019).

Gates ξ (one per head) and ν (one per neuron) are held at 1 and multiply each head's output and
each GELU output. Two scores for ElasticDenser, chosen by ``prune.score_objective``, two for
ElasticLM on GLUE (``relation``, :func:`relation_scores`, task-agnostic; ``glue_task`` below), and
one for ElasticRanker:

- ``contrastive`` (the paper's eq. 3-6): |∂L/∂gate| of the in-batch contrastive loss on (query,
  pseudo-positive) pairs, accumulated over batches: the first-order Taylor estimate of the loss
  change when that unit is removed.
- ``query_distill`` (:func:`distill_scores`): the objective that query distillation optimises
  (training/query_distill.py) is zero, with zero gradient, at the teacher itself, so its first
  order says nothing. Its second order does: removing a unit (Δgate = -1) changes the loss by
  about ½·H_uu. Both terms' Hessians at the optimum have a squared-gradient form, estimated
  without a Hessian:
  - the listwise KL: its Hessian is the Fisher information of the teacher's candidate
    distribution, E_{c~p}[(∂ log p(c|q)/∂gate)²] (Kwon et al. 2022 prune Transformers with the
    same diagonal Fisher of mask variables); one c is sampled per query;
  - 1 - cos(s, t): near s = t its Hessian with respect to the unit-norm embedding is the
    projector I - t tᵀ, so ½·H_uu = ½·E_r[(rᵀ ∂s/∂gate)²] with r ~ N(0, I - t tᵀ).
  One backward pass per batch of ``√w_cos · rᵀs + √w_kd · τ_kd · log p(c|q)`` summed over queries:
  every cross term (between the two parts and between queries) has zero mean (r is zero-mean;
  the score function has zero mean under p), so the squared gate gradients estimate the
  weighted sum of both diagonals.

- ``glue_task`` (:func:`classifier_scores`, ElasticLM on GLUE, training/glue.py): |∂L_task/∂gate|
  of each GLUE task's fine-tuned teacher (cross-entropy, MSE for STS-B) over that task's training
  examples; the per-task scores, each ℓ2-normalized per layer, are summed over the tasks, so one
  structure serves them all.

- ``lce`` (:func:`lce_scores`, ElasticRanker, training/ranker.py): |∂L/∂gate| of LCE (eq. 9 with
  eq. 11) over the cross-encoder teacher's groups of one pseudo-positive and its localized
  negatives; :func:`gate_scores` runs any model around an ElasticBert with the gates.

Scores are ℓ2-normalized per layer so that layers compare; heads and neurons are ranked
separately (their scores are not comparable).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from elastic.encoder import ElasticEncoder
from elastic.structure import ElasticBert


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch negative log-likelihood (eq. 9 with in-batch negatives): query i's positive is
    passage i. q, p: (B, d). The teacher (all-MiniLM-L6-v2) was trained with this loss at scale
    20, i.e. temperature 0.05, on cosine similarities."""
    logits = q @ p.T / temperature  # (B, B)
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))


def gate_scores(
    bert: ElasticBert,
    batches: Iterable,
    objective: Callable[[object, list[torch.Tensor], list[torch.Tensor]], torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over batches of transform(∂objective/∂gate) for every head gate ξ and neuron gate ν of
    ``bert``, ℓ2-normalized per layer (eq. 5). ``objective(batch, xi, nu)`` runs the model with
    ``head_gates=xi, neuron_gates=nu`` (per layer a (h_l,) / (n_l,) tensor held at 1) and returns
    a scalar; any model around an ElasticBert (bi-encoder, cross-encoder) scores this way.

    Returns:
        head_scores (L, A) and neuron_scores (L, I).

    Raises:
        ValueError: ``bert`` is already pruned, or ``batches`` is empty.
    """
    dims, layout = bert.dims, bert.layout
    if layout != dims.full():
        raise ValueError("expressive scores are computed on the unpruned teacher")
    L = dims.num_hidden_layers
    xi = [torch.ones(h, requires_grad=True) for h in layout.heads]
    nu = [torch.ones(n, requires_grad=True) for n in layout.neurons]
    hs = torch.zeros(L, dims.num_attention_heads)
    ns = torch.zeros(L, dims.intermediate_size)
    n_batches = 0
    for batch in batches:
        gx = torch.autograd.grad(objective(batch, xi, nu), xi + nu)  # gradients w.r.t. the gates only
        hs += torch.stack([transform(g) for g in gx[:L]])
        ns += torch.stack([transform(g) for g in gx[L:]])
        n_batches += 1
    if n_batches == 0:
        raise ValueError("expressive scores need at least one batch")
    hs = hs / hs.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ns = ns / ns.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return hs, ns


def _gate_scores(
    enc: ElasticEncoder,
    batches: Iterable,
    objective: Callable[[object, Callable[[list[str], int], torch.Tensor]], torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_scores`` for a bi-encoder: ``objective(batch, emb)`` gets ``emb(texts, max_length)``,
    the (B, d) embeddings of the gated teacher (and ``emb.hidden(texts, max_length)``: the
    tokenized batch and its (B, T, d) last hidden states), and returns a scalar."""

    def bound(batch, xi, nu):
        def emb(texts: list[str], max_len: int) -> torch.Tensor:
            return enc.embed(enc.tokenize(texts, max_len), enc.levels[0], head_gates=xi, neuron_gates=nu)

        def hidden(texts: list[str], max_len: int) -> tuple[dict, torch.Tensor]:  # tokenized batch, (B, T, d)
            tok = enc.tokenize(texts, max_len)
            return tok, enc.hidden(tok, enc.levels[0], head_gates=xi, neuron_gates=nu)

        emb.hidden = hidden  # objectives that read hidden states rather than embeddings (relation_scores)
        return objective(batch, emb)

    return gate_scores(enc.model, batches, bound, transform)


def lce_scores(model, batches: Iterable[dict[str, torch.Tensor]], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ElasticRanker's expressive scores: eq. 5 with the LCE loss (eq. 9 with eq. 11) in place of
    the contrastive one, E|∂L^LCE/∂ξ| and E|∂L^LCE/∂ν| of the unpruned cross-encoder teacher over
    groups of (query, passage) pairs, each group's pseudo-positive first (training/ranker.py).

    LCE is not zero at the teacher (its groups' pseudo-positives are not all ranked first with
    certainty), so, as in the paper, its first order ranks the units.

    Args:
        model: an unpruned ``elastic.ranker.CrossEncoder``.
        batches: tokenized pairs, (B·m, T) tensors, query-major in groups of ``group_size``.

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).

    Raises:
        ValueError: the model is already pruned, or ``batches`` is empty.
    """
    from training.lce_loss import lce_loss

    def objective(batch, xi, nu):
        logits = model.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), head_gates=xi,
                             neuron_gates=nu)  # (B·m, 1)
        return lce_loss(logits[:, 0].view(-1, group_size))

    return gate_scores(model.model.bert, batches, objective, torch.abs)


def classifier_scores(model, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 with a GLUE task's loss: E|∂L_task/∂ξ| and E|∂L_task/∂ν| of an unpruned fine-tuned
    classifier (``elastic.classifier.ElasticClassifier``, in eval mode) over labeled batches.

    A fine-tuned teacher does not fit its training examples exactly, so the first order of its
    task loss ranks the units (as the paper's eq. 3-5 do with MLM).

    Args:
        batches: dicts of (B, T) ``input_ids`` / ``attention_mask`` / ``token_type_ids`` and (B,)
            ``labels`` (class ids, or float scores for a regression task).

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).

    Raises:
        ValueError: the model is already pruned, or ``batches`` is empty.
    """
    from training.glue_loss import task_loss

    def objective(batch, xi, nu):
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), head_gates=xi,
                       neuron_gates=nu)  # (B, num_labels)
        return task_loss(logits, batch["labels"])

    return gate_scores(model.bert, batches, objective, torch.abs)


def expressive_scores(
    enc: ElasticEncoder,
    batches: Iterable[tuple[list[str], list[str]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    query_max_length: int,
    passage_max_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate |∂L/∂ξ| and |∂L/∂ν| over (queries, positive passages) batches (eq. 3-6).

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).

    Raises:
        ValueError: ``enc`` is already pruned, or ``batches`` is empty.
    """
    def objective(batch, emb):
        queries, passages = batch
        return loss_fn(emb(queries, query_max_length), emb(passages, passage_max_length))

    return _gate_scores(enc, batches, objective, torch.abs)


def distill_scores(
    enc: ElasticEncoder,
    batches: Iterable[tuple[list[str], torch.Tensor]],
    passages: torch.Tensor,
    query_max_length: int,
    temperature: float,
    cos_weight: float,
    kd_weight: float,
    kd_temperature: float,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order expressive scores of the query-distillation objective (module docstring).

    Args:
        enc: the unpruned teacher (its own outputs are the distillation targets).
        batches: (query texts, (B, k) int64 rows of ``passages``: each query's teacher top-k).
        passages: (N, d) the fixed index's passage embeddings.
        temperature, cos_weight, kd_weight, kd_temperature: as in ``config.QueryDistillConfig``.
        seed: of the random directions r and the sampled candidates c.

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).

    Raises:
        ValueError: ``enc`` is already pruned, or ``batches`` is empty.
    """
    g = torch.Generator().manual_seed(seed)

    def objective(batch, emb):
        queries, top = batch
        s = emb(queries, query_max_length)  # (B, d)
        t_unit = torch.nn.functional.normalize(s.detach(), dim=-1)
        r = torch.randn(s.shape, generator=g)
        r = r - (r * t_unit).sum(-1, keepdim=True) * t_unit  # (B, d) ~ N(0, I - t tᵀ)
        P = passages[top]  # (B, k, d)
        logp = torch.log_softmax(torch.einsum("bd,bkd->bk", s, P) / temperature / kd_temperature, dim=-1)  # (B, k)
        c = torch.multinomial(logp.detach().exp(), 1, generator=g)  # (B, 1) sampled from the teacher's p
        return cos_weight**0.5 * (r * s).sum() + kd_weight**0.5 * kd_temperature * logp.gather(1, c).sum()

    return _gate_scores(enc, batches, objective, torch.square)


def relation_scores(
    enc: ElasticEncoder,
    batches: Iterable[list[str] | list[tuple[str, str]]],
    max_length: int,
    relation_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-agnostic expressive scores: eq. 5 with the relation-distillation loss L^ALN (eq. 7)
    in place of L^MLM, i.e. E|∂L^ALN/∂ξ| and E|∂L^ALN/∂ν| over unlabeled text.

    The paper scores units by the teacher's pretraining loss (MLM); the bundled teacher ships no
    MLM head, so the scores come from the loss the task-agnostic stage optimises, taken where
    that stage starts: the gated teacher's last hidden states through the additional MHA block
    (initialised from the teacher's last Q/K/V, training/relations.py), against the teacher's
    own last-layer relations. That loss is not zero at the start (the block reads the last
    layer's output, the teacher's relations its input), so its first order ranks units, and
    every layer's units get a gradient.

    Args:
        enc: the unpruned teacher; batches: lists of unlabeled texts or of (A, B) text pairs;
        max_length: tokens kept; relation_heads: R (must divide the hidden size).

    Returns:
        head_scores (L, A) and neuron_scores (L, I), each row ℓ2-normalized (eq. 5).

    Raises:
        ValueError: ``enc`` is already pruned, ``batches`` is empty, or R does not divide the
            hidden size.
    """
    from training.relations import RelationHead, relation_kl, teacher_relations

    head = RelationHead(enc.dims.hidden_size, enc.model.encoder.layer[-1].attention.self).requires_grad_(False)

    def objective(texts, emb):
        tok, h = emb.hidden(texts, max_length)  # (B, T, d) gated last hidden states
        target = teacher_relations(enc.model, tok, relation_heads)  # {kind: (B, R, T, T)}, no grad
        return relation_kl(target, head(h, tok["attention_mask"], relation_heads), tok["attention_mask"])

    return _gate_scores(enc, batches, objective, torch.abs)


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
