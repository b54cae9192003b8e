"""Query heads fitted in closed form after query distillation (elastic/query_head.py).

    python -m training.align --config configs/full.yaml

For the elastic model (run_dir/elastic) and every static baseline trained so far
(run_dir/static/<p>/elastic): encode the task stage's training queries with every level
(pooled, no head), and fit for each level k the affine map h_k(s) = W_k s + b_k that minimizes

    Σ_q ||W_k s_k(q) + b_k − t(q)||² + α_k ||W_k||²_F

over the training queries, t(q) the teacher's query embedding (the target the task stage
trained toward, in the space of the teacher's index), on a seeded sample of ``align.max_queries``
of them. scikit-learn's RidgeCV solves it and picks
α_k from ``align.alphas`` by efficient leave-one-out error. ``align.holdout`` of the queries stay
out of the fit; ``align.json`` reports, per level, the mean cosine to the teacher's query on them
without and with the head, and α_k. Only a model whose index is the teacher's (finetune.json
passage_side ``teacher``) gets heads: they map into that space.

The stage runs inside ``training.train`` / ``training.static`` after the task stage when
``align.enabled``; this driver fits models trained before it. A model whose heads were fitted
to its current weights with the same settings is skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elastic.encoder import ElasticEncoder
from elastic.query_head import FILE as QUERY_HEADS, QueryHeads, file_sha256, read_metadata
from training.config import RecipeConfig, config_cli, teacher_path
from training.finetune import passage_side_of
from training.teacher import teacher_side


def fit_heads(S: dict[int, torch.Tensor], T: torch.Tensor, alphas: list[float], holdout: float,
              seed: int) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, dict]]:
    """Ridge-fit one affine head per level (see the module docstring).

    Args:
        S: level -> (N, d) pooled query embeddings of that SubLM.
        T: (N, d) the teacher's embeddings of the same queries.
        alphas: ridge penalties for RidgeCV to choose from.
        holdout: share of the N queries kept out of the fit, for the report.
        seed: seed of the split.

    Returns:
        heads: level -> (W (d, d), b (d,)) float32, so that W s + b approximates t;
        report: level -> {"alpha", "holdout_cos_before", "holdout_cos_after"} (mean cosine to
        the teacher's query on the held-out queries; None without a held-out share).

    Raises:
        ValueError: S and T disagree in shape, or fewer than two queries would be fitted.
    """
    from sklearn.linear_model import RidgeCV

    n = len(T)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = int(round(holdout * n))
    fit, out = perm[n_out:], perm[:n_out]
    if len(fit) < 2:
        raise ValueError(f"align: {len(fit)} training queries to fit the query heads on; need at least 2")
    heads, report = {}, {}
    t_fit = T[fit].double().numpy()
    for level, s in S.items():
        if s.shape != T.shape:
            raise ValueError(f"align: level {level} embeddings have shape {tuple(s.shape)}, the teacher's {tuple(T.shape)}")
        ridge = RidgeCV(alphas=list(alphas), fit_intercept=True).fit(s[fit].double().numpy(), t_fit)
        W = torch.from_numpy(np.asarray(ridge.coef_, dtype=np.float32))  # (d, d): t ≈ W s + b
        b = torch.from_numpy(np.asarray(ridge.intercept_, dtype=np.float32))  # (d,)
        heads[level] = (W, b)
        before = after = None
        if n_out:
            before = float(F.cosine_similarity(s[out], T[out], dim=-1).mean())
            after = float(F.cosine_similarity(torch.addmm(b, s[out], W.T), T[out], dim=-1).mean())
        report[level] = {"alpha": float(ridge.alpha_), "holdout_cos_before": before, "holdout_cos_after": after}
    return heads, report


def align(cfg: RecipeConfig, model_dir: Path, texts: list[str] | None = None, targets: torch.Tensor | None = None) -> dict:
    """Fit and write ``model_dir``/query_heads.safetensors and align.json; returns align.json's
    content. ``texts`` / ``targets``: the training queries and the teacher's (N, d) embeddings
    of them (default: the task stage's, ``training.teacher.teacher_side``).

    Raises:
        ValueError: the model's index is not the teacher's (finetune.json passage_side), or the
            model and the teacher differ in hidden size.
    """
    side = passage_side_of(model_dir)
    if side != "teacher":
        raise ValueError(f"{model_dir}/finetune.json: passage_side is {side!r}; query heads map into the teacher's "
                         "index, so only a query_distill model gets them (set align.enabled: false)")
    al = cfg.align
    key = json.dumps({"align": asdict(al), "teacher": str(teacher_path(cfg)), "queries": list(cfg.data.train_queries),
                      "pseudo_queries": cfg.query_distill.pseudo_queries,
                      "query_max_length": cfg.encode.query_max_length}, sort_keys=True)
    sha = file_sha256(model_dir / "model.safetensors")
    f = model_dir / QUERY_HEADS
    if f.exists() and (model_dir / "align.json").exists():
        meta = read_metadata(f)
        if meta.get("model_sha256") == sha and meta.get("align_key") == key:
            print(f"[align] {model_dir}: query heads already fitted to these weights", flush=True)
            return json.loads((model_dir / "align.json").read_text())
    t0 = time.time()
    if texts is None or targets is None:
        tside = teacher_side(cfg, pseudo=True)
        texts, targets = tside.train_queries, tside.queries
    if al.max_queries and len(texts) > al.max_queries:
        pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(al.seed))[:al.max_queries]
        texts, targets = [texts[i] for i in pick.tolist()], targets[pick]
    enc = ElasticEncoder(model_dir, query_heads=False)
    if enc.dims.hidden_size != targets.shape[1]:
        raise ValueError(f"{model_dir}: hidden size {enc.dims.hidden_size}, the teacher's query embeddings "
                         f"{targets.shape[1]}: query heads need the teacher's space")
    S = {level: enc.encode(texts, level, cfg.encode.query_max_length, 256) for level in enc.levels}
    heads, report = fit_heads(S, targets, al.alphas, al.holdout, al.seed)
    f.unlink(missing_ok=True)
    QueryHeads(heads, sha).save(f, {"align_key": key})
    out = {"queries": len(texts), "holdout": int(round(al.holdout * len(texts))), "seconds": round(time.time() - t0, 1),
           "levels": {str(k): v for k, v in report.items()}}
    (model_dir / "align.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ", ".join(f"{k}%: {v['holdout_cos_before']:.3f} -> {v['holdout_cos_after']:.3f}" for k, v in report.items()
                      if v["holdout_cos_before"] is not None)
    print(f"[align] {model_dir}: query heads in {out['seconds']} s; held-out cosine to the teacher {lines}", flush=True)
    return out


def run(cfg: RecipeConfig) -> None:
    """Heads for run_dir/elastic and every static baseline already trained."""
    dirs = [cfg.run / "elastic"] + sorted(p / "elastic" for p in (cfg.run / "static").glob("*")
                                          if (p / "elastic" / "model.safetensors").exists())
    if not (dirs[0] / "model.safetensors").exists():
        raise FileNotFoundError(f"{dirs[0]}: no trained model; run python -m training.train first")
    tside = teacher_side(cfg, pseudo=True)
    for d in dirs:
        align(cfg, d, tside.train_queries, tside.queries)


def main() -> None:
    config_cli("Fit the query heads of the trained models (elastic and static) in closed form.", run)


if __name__ == "__main__":
    main()
