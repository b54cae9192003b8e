"""ElasticRanker's model (paper §4.4, eq. 11): a cross-encoder over concat(query, passage).

    sim(q, p) = w^T a_k(concat(q, p))_[CLS]                                   (paper eq. 11)

As in transformers' ``BertForSequenceClassification`` with one label (how sentence-transformers'
``CrossEncoder`` and the ms-marco-MiniLM rerankers are saved), w reads BERT's pooled [CLS]
(dense + tanh), so a model directory of this kind, a user's reranker included, loads here as a
teacher unchanged. Only the encoder is elastic; pooler and w are shared by every SubLM
(elastic/classifier.py). The pair is tokenized as BERT's ``[CLS] q [SEP] p [SEP]`` with segment
ids 0 / 1, cut to ``max_length`` tokens from the passage's end.

Also here: reciprocal rank fusion, the relevance signal the ranker's teacher trains on when no
qrels may be used (training/ranker_teacher.py), and that the rerank benchmark checks against
the qrels.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from elastic.classifier import GlueModel
from elastic.glue import GlueTask

#: A cross-encoder's head, described as the one-output sequence-pair task that
#: ``GlueModel`` loads and saves (num_labels 1, no classes).
RERANK = GlueTask("rerank", "query", "passage", "score", None, ("score",), "mrr_at_10", 160)


class CrossEncoder(GlueModel):
    """Tokenizer + elastic cross-encoder + Submap of one model directory.

    Args:
        model_dir: a BERT-family checkpoint directory (config.json, model.safetensors,
            tokenizer): a one-label ``BertForSequenceClassification`` (a cross-encoder), or a
            plain BERT (it gets a new head, initialised from ``seed``); optionally submap.json.
        max_length: tokens per (query, passage) pair (> 8).
        dropout, seed: see GlueModel.

    Raises:
        FileNotFoundError: config.json or model.safetensors is missing.
        ValueError: the checkpoint has a classifier with more than one output (message names the
            directory and both numbers), weights that do not fit submap.json, or max_length <= 8.
    """

    TRUNCATION = "longest_first"
    """How a (query, passage) pair is cut to max_length tokens, offline and served alike: the
    longer side first, so mostly the passage; a query longer than the pair on its own (NQ and
    TriviaQA training questions can be) is cut too rather than refused, as "only_second" would."""

    def __init__(self, model_dir: str | Path, max_length: int = RERANK.max_length, dropout: float = 0.1,
                 seed: int = 0):
        if max_length <= 8:
            raise ValueError(f"cross-encoder max_length must be > 8 tokens, got {max_length}")
        super().__init__(model_dir, replace(RERANK, max_length=max_length), dropout, seed)

    def pairs(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """(B, T) padded input_ids, attention_mask and token_type_ids of the pairs
        (queries[i], passages[i]), cut to max_length as ``TRUNCATION`` says."""
        enc = self.tokenizer(list(queries), list(passages), truncation=self.TRUNCATION,
                             max_length=self.task.max_length, padding=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def scores(self, batch: dict[str, torch.Tensor], level: int) -> torch.Tensor:
        """(B,) eq. 11 scores of tokenized pairs at ``level`` (grad follows torch's grad mode)."""
        return self.logits(batch, level)[:, 0]

    @torch.inference_mode()
    def score(self, queries: Sequence[str], passages: Sequence[str], level: int, batch_size: int = 32) -> torch.Tensor:
        """(N,) scores of the pairs (queries[i], passages[i]) at ``level``, in input order.

        Raises:
            ValueError: the two lists differ in length, or ``level`` is not one of ``levels``.
        """
        if len(queries) != len(passages):
            raise ValueError(f"score: {len(queries)} queries but {len(passages)} passages")
        if level not in self.submap.levels:
            raise ValueError(f"score: level {level} is not one of {self.levels}")
        self.model.eval()
        device = next(self.model.parameters()).device
        out = torch.empty(len(queries))
        for s in range(0, len(queries), batch_size):
            batch = {k: v.to(device) for k, v in self.pairs(queries[s:s + batch_size],
                                                            passages[s:s + batch_size]).items()}
            out[s:s + batch_size] = self.scores(batch, level).float().cpu()
        return out


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Sequence[int]]], k: float = 60.0,
                           depth: int | None = None) -> list[list[int]]:
    """Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009) of several retrievers.

    Each item's fused score is sum over retrievers of 1 / (k + rank), rank 1-based, an item
    missing from a retriever's list adding nothing; ties keep the order of first appearance.

    Args:
        rankings: per retriever, per query, item ids best first (the retrievers' query order
            must agree).
        k: RRF's constant (> 0; 60 in the paper).
        depth: items kept per query (None: all that appear).

    Returns:
        Per query, item ids best first.

    Raises:
        ValueError: no retriever, retrievers with different numbers of queries, or k <= 0.
    """
    if not rankings:
        raise ValueError("reciprocal_rank_fusion: no rankings")
    if len({len(r) for r in rankings}) != 1:
        raise ValueError(f"reciprocal_rank_fusion: rankings cover {[len(r) for r in rankings]} queries")
    if not k > 0:
        raise ValueError(f"reciprocal_rank_fusion: k must be > 0, got {k}")
    fused = []
    for per_query in zip(*rankings):
        score: dict[int, float] = {}
        for ranked in per_query:
            for rank, item in enumerate(ranked, start=1):
                score[int(item)] = score.get(int(item), 0.0) + 1.0 / (k + rank)
        order = sorted(score, key=lambda i: -score[i])  # stable: first appearance breaks ties
        fused.append(order[:depth] if depth is not None else order)
    return fused
