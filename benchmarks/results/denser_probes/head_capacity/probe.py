"""Probe: does a non-linear query head (residual MLP) beat the ridge head at levels 5/10 of the full model?"""
import sys, time, torch, faiss, numpy as np, torch.nn.functional as F
from training.config import load_config
from training.teacher import teacher_side
from elastic.encoder import ElasticEncoder
from elastic.data import read_tsv, read_qrels
from elastic.metrics import mrr_at_10
from training.align import fit_heads
torch.manual_seed(0); torch.set_num_threads(2)
cfg = load_config("configs/full.yaml")
side = teacher_side(cfg, pseudo=True)
texts, T = side.train_queries, side.queries
print("train queries", len(texts), T.shape, flush=True)
enc = ElasticEncoder("runs/full/elastic", query_heads=False)
index = faiss.read_index("runs/full/index/index.faiss"); pids = open("runs/full/index/pids.txt").read().split()
dev = read_tsv(cfg.data.dev_queries); qrels = read_qrels(cfg.data.qrels); qids = list(dev)
def mrr(q):
    q = F.normalize(q, dim=-1)
    D, I = index.search(q.numpy().astype(np.float32), 10)
    run = {qid: {pids[j]: float(s) for j, s in zip(I[r], D[r]) if j >= 0} for r, qid in enumerate(qids)}
    return mrr_at_10(qrels, run)
g = torch.Generator().manual_seed(1)
perm = torch.randperm(len(texts), generator=g)
hold, fit = perm[:1000], perm[1000:]
for level in [int(x) for x in sys.argv[1:]]:
    t0 = time.time()
    S = enc.encode(texts, level, cfg.encode.query_max_length, 256)
    Sd = enc.encode([dev[q] for q in qids], level, cfg.encode.query_max_length, 256)
    print(f"level {level}: encoded in {time.time()-t0:.0f}s; no head MRR {mrr(Sd):.4f}", flush=True)
    for n in (10000, len(fit)):
        idx = fit[:n]
        heads, rep = fit_heads({level: S[idx]}, T[idx], cfg.align.alphas, 0.0, 0)
        W, b = heads[level]
        hcos = F.cosine_similarity(S[hold] @ W.T + b, T[hold]).mean().item()
        print(f"  ridge on {n}: holdout cos {hcos:.4f}, dev MRR {mrr(Sd @ W.T + b):.4f}", flush=True)
    # residual MLP init from ridge: h(s) = W s + b + U gelu(V s + c)
    idx = fit
    d = S.shape[1]
    for hidden, epochs, wd in ((768, 30, 1e-4), (1536, 30, 1e-4)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(d, d); lin.weight.data.copy_(W); lin.bias.data.copy_(b)
        V = torch.nn.Linear(d, hidden); U = torch.nn.Linear(hidden, d); torch.nn.init.zeros_(U.weight); torch.nn.init.zeros_(U.bias)
        params = list(lin.parameters()) + list(V.parameters()) + list(U.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=wd)
        Xs, Ys = S[idx], T[idx]
        steps = epochs * (len(idx) // 256)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
        f = lambda x: lin(x) + U(F.gelu(V(x)))
        t0 = time.time()
        for ep in range(epochs):
            p = torch.randperm(len(idx))
            for i in range(0, len(idx) - 255, 256):
                j = p[i:i+256]
                loss = 1 - F.cosine_similarity(f(Xs[j]), Ys[j]).mean()
                opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        with torch.no_grad():
            hcos = F.cosine_similarity(f(S[hold]), T[hold]).mean().item()
            print(f"  mlp {hidden} {epochs} ep ({time.time()-t0:.0f}s): holdout cos {hcos:.4f}, dev MRR {mrr(f(Sd)):.4f}", flush=True)
