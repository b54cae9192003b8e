# Probe (not part of the product): ElasticDenser 50 % top 20 (.gpu/dense.top20.dev500.trec, written by
# python -m benchmarks.rerank --denser-run runs/full --save-dense-run FILE) reranked by ElasticRanker 50 % and 20 %
# (runs/ranker_gpu), and the reciprocal rank fusion of the two orders. Run: PYTHONPATH=. python THIS_FILE
import json, collections, time
from elastic.data import read_run
from elastic.ranker import CrossEncoder
from benchmarks.rerank import quality, reorder
from training.config import load_config
from benchmarks.evaluate import EvalData
cfg = load_config("configs/ranker_gpu.yaml")
data = EvalData.load(cfg, cfg.data.dev_queries, cfg.data.qrels, cfg.data.collection)
queries, texts = dict(zip(data.qids, data.qtexts)), dict(zip(data.pids, data.ptexts))
dense = read_run(".gpu/dense.top20.dev500.trec")
m = CrossEncoder("runs/ranker_gpu/ranker/elastic", cfg.ranker.max_length)
out = {}
for level in (50, 20):
    t = time.time()
    qids = list(dense)
    flat = m.score([queries[q] for q in qids for _ in dense[q]], [texts[p] for q in qids for p in dense[q]],
                   level, 64).tolist()
    scores, i = {}, 0
    for q in qids:
        scores[q] = flat[i:i + len(dense[q])]; i += len(dense[q])
    out[level] = scores
    rr = reorder(dense, scores)
    res = {"dense": quality(data.qrels, dense)["mrr_at_10"], "ranker": quality(data.qrels, rr)["mrr_at_10"]}
    for k in (60, 10, 1):
        fused = {}
        for q in qids:
            s = collections.defaultdict(float)
            for r, p in enumerate(dense[q], 1): s[p] += 1 / (k + r)
            for r, p in enumerate(rr[q], 1): s[p] += 1 / (k + r)
            fused[q] = sorted(dense[q], key=lambda p: -s[p])
        res[f"rrf{k}"] = quality(data.qrels, fused)["mrr_at_10"]
    for K in (5, 10):
        top = {q: reorder({q: dense[q][:K]}, {q: scores[q][:K]})[q] for q in qids}  # top K reranked, tail kept
        res[f"rerank top{K}"] = quality(data.qrels, {q: top[q] + dense[q][K:] for q in qids})["mrr_at_10"]
    print(level, res, round(time.time() - t), "s", flush=True)
json.dump({str(k): v for k, v in out.items()}, open("runs/ranker_gpu/dense_top20_scores.json", "w"))
