"""ElasticLM on GLUE (paper §4.2, §5.1-5.2, Table 4): one recipe, every stage resumable.

    python -m training.glue --config configs/glue.yaml [--device cuda]

1. Per task of ``glue.tasks``, the teacher: ``glue.teachers[task]`` when given (its number of
   labels is checked), else the bundled BERT fine-tuned on the task -> run_dir/glue/<task>/teacher;
   its logits on the training examples are the KD targets.
2. One structure for every task: the bundled BERT (``prune.teacher``) pruned into nested SubLMs by
   expressive scores -> run_dir/pruned (``prune.json`` says how; a change re-prunes):
   - ``prune.score_objective: relation``: task-agnostic, the relation-distillation loss on
     unlabeled text (training/importance.relation_scores);
   - ``glue_task``: each task's loss at its fine-tuned teacher over ``prune.score_queries`` of its
     training examples, ℓ2-normalized per layer and summed over the tasks
     (training/importance.classifier_scores). Why: relation scores keep one head of layer 2 (of
     12, 0-based: head 7) in the 10 % SubLM; a linear probe of STS-B on its frozen features
     scores 15, and 53 with the next head of that layer, head 1 (benchmarks/results/glue_probes/
     linear_probe.md). STS-B's own loss ranks head 1 first in layer 2.
3. Task-agnostic elastic distillation (MiniLMv2 relations over unlabeled text, every SubLM at every
   step, training/distill.py) -> run_dir/distilled; each static level cut out and distilled alone
   with the same recipe and steps -> run_dir/static/<p>/distilled.
4. Per task:
   - elastic: the distilled ElasticLM, pooler and classifier from the teacher, fine-tuned with
     every SubLM at every step (Algorithm 1; training/glue_loss.py) -> run_dir/glue/<task>/elastic;
   - static: each level's distilled model fine-tuned alone, same recipe and steps ->
     run_dir/glue/<task>/static/<p>.

Everything that can fail on bad input (task names, GLUE files, a teacher with the wrong number
of labels) fails before the first step. A finished fine-tuning stage leaves ``stage.json`` (what
produced it) beside its weights and drops its optimizer checkpoint; a rerun skips it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from elastic.classifier import GlueModel
from elastic.glue import GlueSet, GlueTask, get_task, read_glue, task_file
from training.config import RecipeConfig, config_cli, teacher_path
from training.distill import distill, fingerprint
from training.glue_loss import glue_loss
from training.loop import LoopConfig, configure_torch, level_weights, resolve_device, train_elastic
from training.query_distill import batch_sampler
from training.static import cut_level, static_levels


def load_task_data(cfg: RecipeConfig, task: GlueTask) -> tuple[GlueSet, GlueSet]:
    """(train, dev) of ``task``; train subsampled to ``glue.max_train_examples`` (uniform, seeded
    by ``glue.seed``, file order kept). Raises FileNotFoundError / ValueError naming the file."""
    g = cfg.glue
    train = read_glue(task_file(g.data_dir, task, "train"), task)
    dev = read_glue(task_file(g.data_dir, task, "dev"), task)
    if g.max_train_examples and len(train) > g.max_train_examples:
        idx = sorted(random.Random(g.seed).sample(range(len(train)), g.max_train_examples))
        train = train.subset(idx)
    return train, dev


def check_inputs(cfg: RecipeConfig) -> dict[str, tuple[GlueSet, GlueSet]]:
    """Read every task's files and load every given teacher before any training time is spent.

    Raises:
        ValueError: an unknown task, a malformed GLUE file (named), or a teacher whose number
            of labels does not match its task.
    """
    data = {}
    for name in cfg.glue.tasks:
        task = get_task(name)
        data[name] = load_task_data(cfg, task)
    for name, path in cfg.glue.teachers.items():
        if not isinstance(path, str):
            raise ValueError(f"config glue.teachers.{name}: expected a directory path, got {path!r}")
        GlueModel(path, get_task(name))  # raises on a label-count mismatch
    return data


class GlueObjective:
    """Algorithm 1's loss for GLUE: per SubLM, (1 - α)·task + α·KD (training/glue_loss.py)."""

    def __init__(self, model: GlueModel, alpha: float, temperature: float):
        self.model, self.alpha, self.temperature = model, alpha, temperature

    def prepare(self, batch: dict) -> None:
        return None  # the teacher's logits are precomputed per example

    def loss(self, batch: dict, prep: None, level: int) -> torch.Tensor:
        logits = self.model.logits(batch, level)  # (B, num_labels)
        return glue_loss(logits, batch["labels"], batch.get("teacher"), self.alpha, self.temperature)

    def finish(self, prep: None) -> None:
        pass


def finetune_steps(epochs: float, n_train: int, batch_size: int, max_epoch_examples: int = 0) -> int:
    """Optimizer steps of ``epochs`` passes: ceil(epochs · E / batch_size), E = min(n_train,
    max_epoch_examples), or n_train when that is 0 (``glue.max_epoch_examples``); at least 1."""
    epoch = min(n_train, max_epoch_examples) if max_epoch_examples else n_train
    return max(1, math.ceil(epochs * epoch / batch_size))


def finetune(cfg: RecipeConfig, model: GlueModel, train: GlueSet, teacher_logits: torch.Tensor | None, levels: list[int],
             epochs: float, lr: float, out: Path, workdir: Path, key: dict, desc: str,
             weights: dict[int, float] | None = None) -> None:
    """Fine-tune ``model``'s SubLMs ``levels`` on ``train`` (every level at every step) and write
    the model directory ``out``; skipped when ``out/stage.json`` holds the same ``key``.

    Steps: ceil(epochs · min(N, glue.max_epoch_examples) / batch_size) (N when that is 0); batches
    are drawn from all N examples by length window (``glue.length_window``).
    ``weights``: per-level loss weights (training/loop.level_weights); None = every level alike.
    """
    g = cfg.glue
    key = {**key, "levels": levels, "epochs": epochs, "lr": lr, "n_train": len(train)}
    done = out / "stage.json"
    if done.exists() and json.loads(done.read_text()).get("key") == json.loads(json.dumps(key)):
        print(f"[{desc}] done before: {out}", flush=True)
        return
    device = resolve_device(cfg.train.device)
    torch.manual_seed(g.seed)
    m = model.model.to(device)
    if g.freeze_word_embeddings:
        m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    enc = model.tokenize(train.text_a, train.text_b)
    bs = min(g.batch_size, len(train))
    pick = batch_sampler([len(x) for x in enc["input_ids"]], bs, g.length_window, "glue", "examples")
    labels = train.labels.to(device)
    soft = teacher_logits.to(device) if teacher_logits is not None else None

    def sample(rng: random.Random) -> dict:
        idx = pick(rng)
        b = {k: v.to(device) for k, v in model.collate(enc, idx).items()}
        b["labels"] = labels[idx]
        if soft is not None:
            b["teacher"] = soft[idx]
        return b

    steps = finetune_steps(epochs, len(train), bs, g.max_epoch_examples)
    lc = LoopConfig(steps, lr, g.weight_decay, g.warmup, g.max_grad_norm, g.seed, cfg.train.checkpoint_every,
                    cfg.train.log_every)
    t0 = time.time()
    records = train_elastic(m, levels, sample, GlueObjective(model, g.kd_weight, g.kd_temperature), lc, workdir, key,
                            device, desc, weights)
    m.to("cpu")
    model.save(out)
    done.write_text(json.dumps({"key": key, "steps": steps, "wall_s": round(time.time() - t0, 1),
                                "last": records[-1] if records else None}, indent=1) + "\n")
    shutil.copy(workdir / "train_log.jsonl", out / "train_log.jsonl")
    (workdir / "checkpoint.pt").unlink(missing_ok=True)  # weights + AdamW moments; the output holds the result


# glue fields that only the students (elastic and static) train with: a teacher's key leaves them
# out, so that a change of the students' budget does not fine-tune the teachers again
STUDENT_ONLY = ("epochs", "lr", "kd_weight", "kd_temperature", "level_weight_power")


def _stage_key(cfg: RecipeConfig, task: GlueTask, stage: str, init: Path, teacher: Path | None) -> dict:
    g = asdict(cfg.glue)
    for k in ("tasks", "teachers", "eval_batch_size", "data_dir") + (STUDENT_ONLY if stage == "teacher" else ()):
        g.pop(k)
    if g["pooling"] == "cls":  # added later; at its default, stages finished before it are still done
        del g["pooling"]
    # likewise; it weighs the elastic run alone (a teacher's key has dropped it with STUDENT_ONLY)
    if stage != "elastic" or g.get("level_weight_power") == 0.0:
        g.pop("level_weight_power", None)
    return {"stage": stage, "task": task.name, "glue": g, "init": fingerprint(init),
            "teacher": fingerprint(teacher) if teacher is not None else None}


def teacher_for(cfg: RecipeConfig, task: GlueTask, train: GlueSet) -> Path:
    """The task's teacher directory: ``glue.teachers[task]``, else the bundled BERT fine-tuned
    here (``glue.teacher_epochs``, ``glue.teacher_lr``, task loss only)."""
    if task.name in cfg.glue.teachers:
        return Path(cfg.glue.teachers[task.name])
    root = cfg.run / "glue" / task.name
    src = teacher_path(cfg)
    model = GlueModel(src, task, cfg.glue.dropout, cfg.glue.seed, cfg.glue.pooling)
    finetune(cfg, model, train, None, [100], cfg.glue.teacher_epochs, cfg.glue.teacher_lr, root / "teacher",
             root / "checkpoints" / "teacher", _stage_key(cfg, task, "teacher", src, None), f"{task.name} teacher")
    return root / "teacher"


def teacher_logits(cfg: RecipeConfig, task: GlueTask, teacher_dir: Path, train: GlueSet, cache: Path) -> torch.Tensor:
    """(N, num_labels) teacher logits of the training examples, cached under the teacher's fingerprint."""
    tag = {"teacher": fingerprint(teacher_dir), "n": len(train), "max_length": task.max_length}
    if cache.exists():
        ck = torch.load(cache, weights_only=False)
        if ck.get("tag") == tag:
            return ck["logits"]
    teacher = GlueModel(teacher_dir, task)
    logits = teacher.predict_logits(train.text_a, train.text_b, teacher.levels[0], cfg.glue.eval_batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tag": tag, "logits": logits}, cache)
    return logits


def with_head(cfg: RecipeConfig, init: Path, task: GlueTask, teacher: GlueModel) -> GlueModel:
    """The model directory ``init`` (a distilled ElasticLM, no classifier) with the pooling, pooler
    and classifier of the task's teacher."""
    model = GlueModel(init, task, cfg.glue.dropout, cfg.glue.seed, teacher.model.pooling)
    model.model.pooler.load_state_dict(teacher.model.pooler.state_dict())
    model.model.classifier.load_state_dict(teacher.model.classifier.state_dict())
    return model


def prune_glue_tasks(cfg: RecipeConfig, teachers: dict[str, Path], data: dict[str, tuple[GlueSet, GlueSet]],
                     out: Path) -> None:
    """Prune the bundled BERT by the summed task-loss expressive scores of ``teachers`` (module
    docstring, stage 2, ``glue_task``) and write the model directory ``out``.

    Per task: ``prune.score_queries`` training examples (seeded sample, ``prune.seed``) in batches
    of ``prune.batch_size``, the teacher in eval mode (no dropout).

    Raises:
        ValueError: a teacher whose layer, head or neuron counts differ from ``prune.teacher``'s
            (its scores could not rank that model's units).
    """
    from elastic.encoder import ElasticEncoder
    from training.importance import classifier_scores
    from training.prune import export_pruned

    base = ElasticEncoder(teacher_path(cfg))
    hs = ns = None
    for name, tdir in teachers.items():
        teacher = GlueModel(tdir, get_task(name))
        if teacher.dims.full() != base.dims.full():
            raise ValueError(f"config glue.teachers.{name}: {tdir} has layout {teacher.dims.full()}, the pruned "
                             f"model {base.dims.full()}; prune.score_objective glue_task needs the same")
        train = data[name][0]
        idx = random.Random(cfg.prune.seed).sample(range(len(train)), min(cfg.prune.score_queries, len(train)))
        sample = train.subset(idx)  # only these are tokenized
        enc = teacher.tokenize(sample.text_a, sample.text_b)
        bs = cfg.prune.batch_size
        batches = ({**teacher.collate(enc, list(range(s, min(s + bs, len(sample))))),
                    "labels": sample.labels[s:s + bs]} for s in range(0, len(sample), bs))
        teacher.model.eval()
        h, n = classifier_scores(teacher.model, batches)  # (L, A), (L, I), rows of norm 1
        hs, ns = (h, n) if hs is None else (hs + h, ns + n)
    hs = hs / hs.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ns = ns / ns.norm(dim=1, keepdim=True).clamp(min=1e-12)
    export_pruned(base, hs, ns, cfg.prune.levels, out)


def _prune_key(cfg: RecipeConfig, teachers: dict[str, Path]) -> dict:
    p = cfg.prune
    key = {"score_objective": p.score_objective, "levels": p.levels, "score_queries": p.score_queries,
           "batch_size": p.batch_size, "seed": p.seed, "teacher": str(teacher_path(cfg))}
    if p.score_objective == "glue_task":
        key["task_teachers"] = {name: fingerprint(d) for name, d in teachers.items()}
    else:
        key["distill"] = {k: getattr(cfg.distill, k) for k in ("max_length", "relation_heads", "pair_fraction")}
    return key


def task_agnostic(cfg: RecipeConfig, teachers: dict[str, Path], data: dict[str, tuple[GlueSet, GlueSet]]) -> None:
    """Stages 2-3 of the module docstring. Pruning is redone when ``prune.json`` differs from the
    recipe (a directory pruned before that file existed counts as ``relation``), and then the
    checkpoints of every later stage are dropped; the static levels are cut again from it every
    run (a second; same bytes, so their distillation stays done); distillation resumes or is
    skipped by its own key."""
    from training.prune import prune_task_agnostic

    run = cfg.run
    key = _prune_key(cfg, teachers)
    made = run / "pruned" / "prune.json"
    if made.exists():
        done = json.loads(made.read_text()) == json.loads(json.dumps(key))
    else:
        done = (run / "pruned" / "submap.json").exists() and cfg.prune.score_objective == "relation"
    if not done:
        t0 = time.time()
        # checkpoints of the stages after pruning were trained on the old structure: of no use now
        stale = [run / "pruned", run / "checkpoints" / "distill", *run.glob("static/*/checkpoints"),
                 *run.glob("glue/*/checkpoints/elastic"), *run.glob("glue/*/checkpoints/static")]
        for d in stale:
            if d.exists():
                shutil.rmtree(d)
        if cfg.prune.score_objective == "glue_task":
            prune_glue_tasks(cfg, teachers, data, run / "pruned")
        else:
            prune_task_agnostic(cfg, run / "pruned")
        made.write_text(json.dumps(key, indent=1) + "\n")
        print(f"[glue] pruned by {cfg.prune.score_objective} expressive scores into {run / 'pruned'} in "
              f"{time.time() - t0:.0f} s", flush=True)
    if cfg.distill.enabled:
        distill(cfg, run / "pruned", run / "distilled", run / "checkpoints" / "distill", "distill elastic")
    if cfg.static.enabled:
        for level in static_levels(cfg):
            root = run / "static" / str(level)
            cut_level(run / "pruned", level, root / "pruned")
            if cfg.distill.enabled:
                distill(cfg, root / "pruned", root / "distilled", root / "checkpoints" / "distill",
                        f"distill static {level}%")


def run(cfg: RecipeConfig) -> None:
    """The whole recipe (module docstring); finished stages are skipped, unfinished ones resume."""
    t0 = time.time()
    data = check_inputs(cfg)
    configure_torch(cfg.train)
    teachers = {name: teacher_for(cfg, get_task(name), train) for name, (train, _dev) in data.items()}
    task_agnostic(cfg, teachers, data)
    for name, (train, _dev) in data.items():
        task = get_task(name)
        root = cfg.run / "glue" / name
        tdir = teachers[name]
        soft = teacher_logits(cfg, task, tdir, train, root / "teacher_train_logits.pt")
        teacher = GlueModel(tdir, task)  # its pooler and classifier start every student of the task
        init = cfg.task_init(cfg.run)
        elastic = with_head(cfg, init, task, teacher)
        finetune(cfg, elastic, train, soft, elastic.levels, cfg.glue.epochs,
                 cfg.glue.lr, root / "elastic", root / "checkpoints" / "elastic",
                 _stage_key(cfg, task, "elastic", init, tdir), f"{name} elastic",
                 level_weights(elastic.levels, cfg.glue.level_weight_power))
        if cfg.static.enabled:
            for level in static_levels(cfg):
                sinit = cfg.task_init(cfg.run / "static" / str(level))
                finetune(cfg, with_head(cfg, sinit, task, teacher), train, soft, [level], cfg.glue.epochs, cfg.glue.lr,
                         root / "static" / str(level), root / "checkpoints" / "static" / str(level),
                         _stage_key(cfg, task, "static", sinit, tdir), f"{name} static {level}%")
    print(f"[glue] every stage done in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    config_cli("ElasticLM on GLUE: task-agnostic structure and distillation, then per-task teacher, elastic and "
               "static fine-tuning.", run)


if __name__ == "__main__":
    main()
