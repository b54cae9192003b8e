"""Pack ElasticDenser (or a GLUE ElasticLM, or ElasticRanker) into a TorchServe archive with
torch-model-archiver.

    python -m archive.build_mar --config configs/demo.yaml [--archive-format no-archive]
    python -m archive.build_mar --config configs/glue.yaml --glue-task SST-2   # -> elasticlm-sst-2.mar
    python -m archive.build_mar --config configs/ranker.yaml --ranker          # -> elasticranker.mar
    python -m archive.build_mar --config configs/ranker.yaml --pipeline --denser-run runs/full
                                                                   # -> elasticpipeline.mar

Packs handler/elastic_handler.py, the elastic/ package, the model directory (config.json,
model.safetensors, submap.json, tokenizer files, query_heads.safetensors when the model has query
heads: elastic/query_head.py), the FAISS index (index.faiss, pids.txt), the
elastic metrics' metrics.yaml (elastic/telemetry.py) and a
model-config.yaml (batchSize, maxBatchDelay, and under ``handler:`` the latency constraint T in
milliseconds) into model_store/elasticdenser.mar. ``--archive-format no-archive`` writes a
directory model_store/elasticdenser/ whose model-config.yaml ops can edit (then re-register).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from elastic.telemetry import metrics_yaml
from training.config import RecipeConfig, ServeConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ("config.json", "model.safetensors", "submap.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")  # whichever the tokenizer saved
OPTIONAL_FILES = TOKENIZER_FILES + ("query_heads.safetensors",)  # packed when the model directory has them


def model_config(serve: ServeConfig, query_max_length: int) -> dict:
    """The model-config.yaml TorchServe reads at registration (batching, workers, handler settings)."""
    return {
        "minWorkers": serve.workers,
        "maxWorkers": serve.workers,
        "batchSize": serve.batch_size,
        "maxBatchDelay": serve.max_batch_delay_ms,
        "responseTimeout": 120,
        "handler": {
            "latency_constraint_ms": serve.latency_constraint_ms,
            "schedule": serve.schedule,
            "late_requests": serve.late_requests,
            "management_address": f"http://127.0.0.1:{serve.management_port}",
            "query_max_length": query_max_length,
            "top_k": serve.top_k,
            "torch_threads": serve.torch_threads,
            "worker_nice": serve.worker_nice,
        },
    }


def archive(handler: Path, files: Path, yaml_cfg: dict, name: str, export_path: Path,
            archive_format: str = "default") -> Path:
    """torch-model-archiver over a staged folder: ``files`` go flat into the model directory,
    ``yaml_cfg`` becomes its model-config.yaml. Returns the .mar (or no-archive directory) path.

    Raises:
        subprocess.CalledProcessError: torch-model-archiver failed.
    """
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "model-config.yaml"
        cfg_path.write_text(yaml.safe_dump(yaml_cfg, sort_keys=False))
        cmd = [
            str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", name, "--version", "1.0",
            "--handler", str(handler), "--extra-files", str(files), "--config-file", str(cfg_path),
            "--export-path", str(export_path), "--archive-format", archive_format, "--force",
        ]
        subprocess.run(cmd, check=True)
    return export_path / (name if archive_format == "no-archive" else f"{name}.mar")


def add_serving_code(stage: Path) -> None:
    """Copy the elastic/ package and the elastic metrics' metrics.yaml (TorchServe's metrics
    configuration format, elastic/telemetry.py) into a staged model directory."""
    (stage / "elastic").mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "elastic").glob("*.py"):
        shutil.copy(f, stage / "elastic" / f.name)
    (stage / "metrics.yaml").write_text(yaml.safe_dump(metrics_yaml(), sort_keys=False))


def keep_levels(submap_path: Path, levels: list[int]) -> None:
    """Rewrite a staged submap.json (config.json beside it) to hold only ``levels``: the schedule
    of the archive then chooses among them (``serve.levels``). The weights are untouched: every
    level is a prefix of the largest, which must stay.

    Raises:
        ValueError: a level the model does not have, or the largest one left out (both name
            serve.levels).
    """
    from elastic.structure import BertDims
    from elastic.submap import Submap

    dims = BertDims.from_config_file(submap_path.with_name("config.json"))
    sm = Submap.load(submap_path, dims)
    missing = sorted(set(levels) - set(sm.levels))
    if missing:
        raise ValueError(f"config serve.levels: {missing} are not levels of the model's submap.json {list(sm.levels)}")
    if sm.largest not in levels:
        raise ValueError(f"config serve.levels: must keep the largest level, {sm.largest} (model.safetensors holds "
                         "its layout)")
    Submap({p: sm.levels[p] for p in levels}, sm.pooling, sm.normalize).save(submap_path, dims)


def build_mar(model_dir: Path, index_dir: Path | None, export_path: Path, yaml_cfg: dict, name: str = "elasticdenser",
              archive_format: str = "default", levels: list[int] | None = None) -> Path:
    """Stage the model, index (ElasticDenser; None for a GLUE model) and elastic/ package, then
    ``archive`` them with the elastic handler, which serves whichever task the directory holds.
    ``levels``: pack only these preserving levels (``keep_levels``; None or empty = all).

    Raises:
        FileNotFoundError: a model or index file is missing (named).
        ValueError: ``levels`` that the model cannot keep (``keep_levels``).
        subprocess.CalledProcessError: torch-model-archiver failed.
    """
    needed = [model_dir / f for f in MODEL_FILES]
    if index_dir is not None:
        needed += [index_dir / "index.faiss", index_dir / "pids.txt"]
    for f in needed:
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing; run training.prune/distill/finetune and training.build_index first")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "files"
        stage.mkdir()
        for f in MODEL_FILES + OPTIONAL_FILES:
            if (model_dir / f).exists():
                shutil.copy(model_dir / f, stage / f)
        for f in ("index.faiss", "pids.txt") if index_dir is not None else ():
            shutil.copy(index_dir / f, stage / f)
        if levels:
            keep_levels(stage / "submap.json", levels)
        add_serving_code(stage)
        return archive(ROOT / "handler" / "elastic_handler.py", stage, yaml_cfg, name, export_path, archive_format)


def build_noop_mar(export_path: Path, batch_size: int, max_batch_delay_ms: int, name: str = "noop",
                   archive_format: str = "no-archive") -> Path:
    """The no-op model (benchmarks/noop_handler.py): the serving stack's ceiling, same batching."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "files").mkdir()
        (Path(tmp) / "files" / "README").write_text("no model: benchmarks/noop_handler.py answers a fixed top-10\n")
        cfg = {"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
               "responseTimeout": 120}
        return archive(ROOT / "benchmarks" / "noop_handler.py", Path(tmp) / "files", cfg, name, export_path,
                       archive_format)


def main() -> None:
    ap = argparse.ArgumentParser(description="Pack ElasticDenser into model_store/elasticdenser.mar.")
    ap.add_argument("--config", help="recipe YAML (default: built-in defaults)")
    ap.add_argument("--export-path", type=Path, default=Path("model_store"))
    ap.add_argument("--archive-format", choices=["default", "no-archive"], default="default",
                    help="default = one .mar file; no-archive = an editable directory")
    ap.add_argument("--glue-task", help="pack the recipe's GLUE ElasticLM of this task (run_dir/glue/<task>/elastic, "
                                        "training/glue.py) as elasticlm-<task>.mar instead of ElasticDenser")
    ap.add_argument("--ranker", action="store_true", help="pack the recipe's ElasticRanker (run_dir/ranker/elastic, "
                    "training/ranker.py) as elasticranker.mar instead of ElasticDenser")
    ap.add_argument("--pipeline", action="store_true", help="pack the two-stage pipeline (--denser-run's ElasticDenser, "
                    "this recipe's ElasticRanker, run_dir/pipeline/pipeline.json from benchmarks.pipeline_quality) as "
                    "elasticpipeline.mar")
    ap.add_argument("--denser-run", type=Path, help="with --pipeline: the ElasticDenser's run directory (default: run_dir)")
    a = ap.parse_args()
    cfg = load_config(a.config)
    if a.pipeline:
        run_pipeline(cfg, a.denser_run or cfg.run, a.export_path, a.archive_format)
    elif a.ranker:
        run_ranker(cfg, a.export_path, a.archive_format)
    elif a.glue_task:
        run_glue(cfg, a.glue_task, a.export_path, a.archive_format)
    else:
        run(cfg, a.export_path, a.archive_format)


def run_glue(cfg: RecipeConfig, task: str, export_path: Path = Path("model_store"),
             archive_format: str = "default") -> Path:
    """Pack run_dir/glue/<task>/elastic with the same handler and serving settings as ElasticDenser.

    Raises:
        ValueError: ``task`` is not a GLUE task of this project.
    """
    from elastic.glue import get_task

    t = get_task(task)
    yaml_cfg = model_config(cfg.serve, cfg.encode.query_max_length)
    del yaml_cfg["handler"]["query_max_length"], yaml_cfg["handler"]["top_k"]  # retrieval only
    out = build_mar(cfg.run / "glue" / t.name / "elastic", None, export_path, yaml_cfg,
                    name=f"elasticlm-{t.name.lower()}", archive_format=archive_format, levels=cfg.serve.levels)
    print(f"[archive] wrote {out}", flush=True)
    return out


def stage_pipeline(denser_dir: Path, index_dir: Path, ranker_dir: Path, collection: Path, quality: Path,
                   out: Path) -> Path:
    """Lay out the two-stage pipeline's model directory (elastic/service.ElasticPipelineServer):
    denser/ and ranker/ (model files), index.faiss + pids.txt, passages.tsv.gz (the collection's
    text of every indexed pid, gzip) and pipeline.json (the quality table of
    benchmarks/pipeline_quality.py).

    Raises:
        FileNotFoundError: a model, index, collection or quality file is missing (named).
        ValueError: an indexed pid without text in the collection.
    """
    import gzip

    from elastic.data import read_tsv

    needed = ([denser_dir / f for f in MODEL_FILES] + [ranker_dir / f for f in MODEL_FILES] +
              [index_dir / "index.faiss", index_dir / "pids.txt", collection, quality])
    for f in needed:
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing" + ("; measure it with python -m benchmarks.pipeline_quality"
                                                       if f == quality else ""))
    for sub, src in (("denser", denser_dir), ("ranker", ranker_dir)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in MODEL_FILES + OPTIONAL_FILES:
            if (src / f).exists():
                shutil.copy(src / f, out / sub / f)
    for f in ("index.faiss", "pids.txt"):
        shutil.copy(index_dir / f, out / f)
    text = read_tsv(collection)
    pids = (index_dir / "pids.txt").read_text().split()
    missing = [p for p in pids if p not in text]
    if missing:
        raise ValueError(f"{collection}: no text for indexed pid {missing[0]!r} ({len(missing)} missing)")
    with gzip.open(out / "passages.tsv.gz", "wt", encoding="utf-8") as f:
        f.writelines(f"{p}\t{text[p]}\n" for p in pids)
    shutil.copy(quality, out / "pipeline.json")
    return out


def ranker_model_config(serve: ServeConfig, max_passages: int, pair_max_length: int) -> dict:
    """``model_config`` for ElasticRanker: no retrieval settings; up to ``max_passages`` passages
    per request, each pair cut to ``pair_max_length`` tokens."""
    yaml_cfg = model_config(serve, 0)
    h = yaml_cfg["handler"]
    del h["query_max_length"], h["top_k"]  # retrieval only
    h["max_passages"], h["pair_max_length"] = max_passages, pair_max_length
    return yaml_cfg


def archive_pipeline(stage: Path, yaml_cfg: dict, export_path: Path, archive_format: str = "default") -> Path:
    """Add the serving code to a directory laid out by ``stage_pipeline`` and archive it with the
    elastic handler as elasticpipeline(.mar)."""
    add_serving_code(stage)
    return archive(ROOT / "handler" / "elastic_handler.py", stage, yaml_cfg, "elasticpipeline", export_path,
                   archive_format)


def run_ranker(cfg: RecipeConfig, export_path: Path = Path("model_store"), archive_format: str = "default") -> Path:
    """Pack run_dir/ranker/elastic (training/ranker.py) as elasticranker.mar with the same handler
    and the recipe's serve settings; a request may carry up to ``ranker.eval_depth`` passages (the
    depth its quality is measured at), each pair cut to ``ranker.max_length`` tokens."""
    yaml_cfg = ranker_model_config(cfg.serve, cfg.ranker.eval_depth, cfg.ranker.max_length)
    out = build_mar(cfg.run / "ranker" / "elastic", None, export_path, yaml_cfg, name="elasticranker",
                    archive_format=archive_format)
    print(f"[archive] wrote {out}", flush=True)
    return out


def run_pipeline(cfg: RecipeConfig, denser_run: Path, export_path: Path = Path("model_store"),
                 archive_format: str = "default") -> Path:
    """Pack the two-stage pipeline (``stage_pipeline``) as elasticpipeline.mar with the same handler
    and the recipe's serve settings; pairs are cut to ``ranker.max_length`` tokens."""
    yaml_cfg = model_config(cfg.serve, cfg.encode.query_max_length)
    yaml_cfg["handler"]["pair_max_length"] = cfg.ranker.max_length
    with tempfile.TemporaryDirectory() as tmp:
        stage = stage_pipeline(denser_run / "elastic", denser_run / "index", cfg.run / "ranker" / "elastic",
                               Path(cfg.data.collection), cfg.run / "pipeline" / "pipeline.json", Path(tmp) / "files")
        out = archive_pipeline(stage, yaml_cfg, export_path, archive_format)
    print(f"[archive] wrote {out}", flush=True)
    return out


def run(cfg: RecipeConfig, export_path: Path = Path("model_store"), archive_format: str = "default") -> Path:
    out = build_mar(cfg.run / "elastic", cfg.run / "index", export_path, model_config(cfg.serve, cfg.encode.query_max_length),
                    archive_format=archive_format, levels=cfg.serve.levels)
    print(f"[archive] wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
