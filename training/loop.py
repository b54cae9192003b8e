"""Elastic optimization (paper §4.2, Algorithm 1), shared by both stages and the static baselines.

Every optimizer step traverses every SubLM: forward the batch through SubLM k, w_k · loss_k / K,
backward (gradients accumulate in the shared weights), then one clipped AdamW step with a linear
warmup/decay schedule (transformers' ``get_linear_schedule_with_warmup``). A static baseline is
the same loop with one level. w_k = 1 for every k is Algorithm 1 as the paper has it; a stage may
pass other per-level weights (``level_weights``: mean 1, larger for the small SubLMs, whose
gradients the large ones otherwise outweigh in the weights they share).

The loop logs (step, loss per level, learning rate, wall seconds, peak memory) to
``train_log.jsonl``, checkpoints model + optimizer + scheduler + step + torch's RNG state every
``checkpoint_every`` steps (written to a temporary file, then renamed), and resumes from the
checkpoint when one exists. Batches are drawn from a generator seeded by (seed, step), and the
RNG state (dropout) is restored, so a resumed run sees the batches and dropout masks the
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from tqdm import tqdm


class Objective(Protocol):
    """One training stage's loss, split the way Algorithm 1 needs it."""

    def prepare(self, batch: Any) -> Any:
        """Per step, once: teacher targets (no grad) and anything shared by all SubLMs."""

    def loss(self, batch: Any, prep: Any, level: int) -> torch.Tensor:
        """Scalar loss of the SubLM at ``level``; the loop divides it by K and calls backward."""

    def finish(self, prep: Any) -> None:
        """After every SubLM's backward: push accumulated gradients through shared parts."""


@dataclass
class LoopConfig:
    """Optimizer and bookkeeping of one loop (filled from the stage's config section)."""

    steps: int
    lr: float
    weight_decay: float
    warmup: float  # fraction of steps
    max_grad_norm: float
    seed: int
    checkpoint_every: int
    log_every: int


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max allocated on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def configure_torch(tc: Any) -> None:
    """Set what a training stage's process computes with, from ``train`` (training/config.py
    TrainConfig): intra-op threads (``threads``; 0 leaves torch's default) and the library of the
    CPU matrix products (``onednn``: oneDNN, else MKL; ``torch.backends.mkldnn.enabled``, a
    process-wide flag that only CPU operators read). Every stage calls it before it trains."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.backends.mkldnn.enabled = bool(tc.onednn)


@contextlib.contextmanager
def matrix_products(onednn: bool) -> Iterator[None]:
    """Within the block, CPU matrix products run in oneDNN (``onednn``) or MKL's sgemm
    (``torch.backends.mkldnn.enabled``); the caller's setting is restored after it, errors
    included. For code that times one library beside another (benchmarks)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = bool(onednn)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu' / 'cuda' as given.

    Raises:
        ValueError: 'cuda' asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config train.device: 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def level_weights(levels: list[int], power: float) -> dict[int, float]:
    """Per-level loss weights w_k ∝ (largest level / k) ** power, scaled to mean 1.

    power 0 gives w_k = 1 (Algorithm 1 as the paper has it); power 0.5 weights the 5 % SubLM
    √10 ≈ 3.2 times the 50 % one. One level always gets 1, so a static baseline is unchanged.

    Raises:
        ValueError: no levels, a level not in (0, 100], or a negative power.
    """
    if not levels or any(not 0 < k <= 100 for k in levels):
        raise ValueError(f"level_weights: levels must be percentages in (0, 100], got {levels}")
    if power < 0:
        raise ValueError(f"level_weights: power must be >= 0, got {power}")
    raw = {k: (max(levels) / k) ** power for k in levels}
    mean = sum(raw.values()) / len(raw)
    return {k: w / mean for k, w in raw.items()}


def train_elastic(
    params_from: torch.nn.Module,
    levels: list[int],
    sample: Callable[[random.Random], Any],
    objective: Objective,
    lc: LoopConfig,
    workdir: Path,
    key: dict,
    device: torch.device,
    desc: str,
    weights: dict[int, float] | None = None,
) -> list[dict]:
    """Run Algorithm 1 for ``lc.steps`` optimizer steps; returns the log records.

    Args:
        params_from: the module whose parameters the optimizer updates (student + any
            auxiliary block, e.g. the relation head).
        levels: preserving levels traversed at every step, largest first.
        sample: draws one batch from the given step-seeded ``random.Random``.
        objective: prepare / loss / finish of the stage.
        workdir: where ``checkpoint.pt`` and ``train_log.jsonl`` live.
        key: what defines this run (recipe section, inputs); a checkpoint written under another
            key is refused instead of silently resumed.

    Raises:
        ValueError: ``workdir/checkpoint.pt`` was written by a different recipe or model (the
            message names the file and the differing fields).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = workdir / "checkpoint.pt", workdir / "train_log.jsonl"
    params = [p for p in params_from.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, int(lc.warmup * lc.steps), lc.steps)
    key = {**key, "loop": asdict(lc), "levels": list(levels)}
    if weights is not None:
        missing = sorted(set(levels) - set(weights))
        if missing:
            raise ValueError(f"train_elastic: no weight for levels {missing}")
        if all(weights[k] == 1.0 for k in levels):  # Algorithm 1 as is (power 0, or one level: a static run)
            weights = None
    if weights is not None:  # only then: runs of uniform weight keep the key they were written under
        key["level_weights"] = {str(k): round(weights[k], 6) for k in levels}
    start, records = 0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck.get("key") != key:
            old = ck.get("key") or {}
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ValueError(f"{ckpt_path}: written by a different run (differs in {diff}); "
                             "delete it to start this stage afresh")
        try:
            params_from.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ValueError(f"{ckpt_path}: does not fit the model: {str(e).splitlines()[0]}") from None
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if "rng" in ck:  # dropout masks go on as an uninterrupted run's would (older checkpoints lack it)
            torch.set_rng_state(ck["rng"].cpu())  # loaded onto the device with the rest
            if device.type == "cuda" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        start, records = ck["step"], ck["records"]
        print(f"[{desc}] resuming from {ckpt_path} at step {start}/{lc.steps}", flush=True)

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        state = {"key": key, "model": params_from.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "records": records, "rng": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)

    params_from.train()  # the encoder has no dropout; train() only marks intent
    t0 = time.time() - (records[-1]["wall_s"] if records else 0.0)
    window: list[dict[int, float]] = []
    # the log holds this run's records and no other's: those up to the checkpoint it resumes from
    # (steps logged after that checkpoint are trained and logged again), none on a fresh start
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(log_path, "a") as log:
        for step in tqdm(range(start, lc.steps), desc=desc, unit="step", initial=start, total=lc.steps):
            batch = sample(random.Random(lc.seed * 1_000_003 + step))
            opt.zero_grad(set_to_none=True)
            prep = objective.prepare(batch)
            per_level = {}
            for level in levels:  # Algorithm 1: traverse every SubLM, accumulate gradients
                loss = objective.loss(batch, prep, level)
                w = 1.0 if weights is None else weights[level]
                (w * loss / len(levels)).backward()
                per_level[level] = loss.item()
            objective.finish(prep)
            torch.nn.utils.clip_grad_norm_(params, lc.max_grad_norm)
            opt.step()
            sched.step()
            window.append(per_level)
            done = step + 1
            if done % lc.log_every == 0 or done == lc.steps:
                rec = {"step": done, "loss": sum(sum(w.values()) / len(w) for w in window) / len(window),
                       "loss_per_level": {str(k): round(sum(w[k] for w in window) / len(window), 5) for k in levels},
                       "lr": sched.get_last_lr()[0], "wall_s": round(time.time() - t0, 2),
                       "peak_mem_mib": round(peak_memory_mib(device), 1)}
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                window = []
            if done % lc.checkpoint_every == 0 or done == lc.steps:
                save(done)
    params_from.eval()
    if records:
        r = records[-1]
        print(f"[{desc}] step {r['step']}: loss {r['loss']:.4f} (first logged {records[0]['loss']:.4f}), "
              f"{r['wall_s']:.0f} s, peak memory {r['peak_mem_mib']:.0f} MiB", flush=True)
    return records
