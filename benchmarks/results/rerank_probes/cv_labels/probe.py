"""Probe (not part of the product; issue 10's "cross-validation over dev500" option): can real labels lift
the cross-encoder teacher above the bi-encoder it learned from? The GPU teacher (runs/ranker_gpu, 0.487 on
BM25's top 20) is fine-tuned with LCE (eq. 9, training/lce_loss.py) on half of dev500's judged queries (the
judged passage against 7 others of its BM25 top 20) and scored on the other half, then the halves swap; every
query is scored by a model that never saw its label. Reported as 2-fold cross-validation over dev500.

    PYTHONPATH=. .venv/bin/python benchmarks/results/rerank_probes/cv_labels/probe.py
"""

import json
import random
import time
from pathlib import Path

import torch

from benchmarks.evaluate import EvalData
from benchmarks.rerank import quality, reorder
from elastic.data import read_run
from elastic.ranker import CrossEncoder
from training.config import load_config
from training.lce_loss import lce_loss

STEPS, QUERIES, GROUP, LR, SEED = 200, 4, 8, 2e-5, 0
OUT = Path(__file__).parent / "cv_labels.json"


def main() -> None:
    torch.set_num_threads(2)
    cfg = load_config("configs/ranker_gpu.yaml")
    data = EvalData.load(cfg, cfg.data.dev_queries, cfg.data.qrels, cfg.data.collection)
    queries, texts = dict(zip(data.qids, data.qtexts)), dict(zip(data.pids, data.ptexts))
    stages = {"bm25": read_run(cfg.data.candidates), "dense": read_run(".gpu/dense.top20.dev500.trec")}
    stages = {k: {q: [p for p in v.get(q, []) if p in texts][:20] for q in data.qids} for k, v in stages.items()}
    qids = sorted(data.qids)
    random.Random(SEED).shuffle(qids)
    folds = [qids[: len(qids) // 2], qids[len(qids) // 2:]]
    scores = {"before": {k: {} for k in stages}, "after": {k: {} for k in stages}}
    log = []
    for f, test in enumerate(folds):
        train = [q for q in folds[1 - f] if any(data.qrels.get(q, {}).get(p, 0) > 0 for p in stages["bm25"][q])]
        model = CrossEncoder("runs/ranker_gpu/ranker/teacher", cfg.ranker.max_length, dropout=0.1, seed=SEED)
        for name in ("before", "after"):
            if name == "after":
                t0 = time.time()
                model.model.train()
                model.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
                opt = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=LR,
                                        weight_decay=0.01)
                rng = random.Random(SEED * 1000 + f)
                for step in range(STEPS):
                    qs, ps = [], []
                    for q in rng.sample(train, QUERIES):
                        pos = next(p for p in stages["bm25"][q] if data.qrels[q].get(p, 0) > 0)
                        neg = [p for p in stages["bm25"][q] if data.qrels[q].get(p, 0) <= 0]
                        group = [pos, *rng.sample(neg, GROUP - 1)]
                        qs += [queries[q]] * GROUP
                        ps += [texts[p] for p in group]
                    loss = lce_loss(model.scores(model.pairs(qs, ps), 100).view(-1, GROUP))  # (B, m), positive first
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
                    opt.step()
                    if step % 50 == 0 or step == STEPS - 1:
                        log.append({"fold": f, "step": step, "loss": round(loss.item(), 4)})
                        print(log[-1], f"{time.time() - t0:.0f} s", flush=True)
            for stage, cands in stages.items():
                qs = [queries[q] for q in test for _ in cands[q]]
                ps = [texts[p] for q in test for p in cands[q]]
                flat = model.score(qs, ps, 100, 64).tolist()
                i = 0
                for q in test:
                    scores[name][stage][q] = flat[i:i + len(cands[q])]
                    i += len(cands[q])
            print(f"fold {f} {name} scored", flush=True)
    out = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/results/rerank_probes/cv_labels/probe.py",
           "settings": {"steps": STEPS, "queries_per_step": QUERIES, "group": GROUP, "lr": LR, "folds": 2},
           "train_log": log}
    for stage, cands in stages.items():
        out[stage] = {"first_stage_order": quality(data.qrels, cands)["mrr_at_10"]}
        for name in ("before", "after"):
            out[stage][f"teacher_{name}"] = quality(data.qrels, reorder(cands, scores[name][stage]))["mrr_at_10"]
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in stages}, indent=1))


if __name__ == "__main__":
    main()
