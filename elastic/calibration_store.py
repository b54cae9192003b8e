"""A calibration of t_k stored beside the model, so that a restarted worker (a crash, a new
version with another T) serves within about a second instead of re-timing every (level, batch
size) cell first (about 8 s for the demo model on this machine).

A stored calibration is reused only for the same model files, machine, torch version, thread
count, task, levels, batch sizes and packing (``calibration_key``); anything else is re-measured. The
serving core re-measures a reused one in the background while the worker is idle
(``ElasticServer``), and the online corrections c_k adapt it to what serving sees meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
from pathlib import Path

import torch

from elastic.schedule import Calibration

log = logging.getLogger(__name__)

FILE = "calibration.json"
_EDGE = 1 << 16  # bytes hashed at each end of a large file


def machine_id() -> str:
    """Host name, CPU model and logical CPU count (t_k is only valid where it was measured)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{socket.gethostname()}|{cpu}|{os.cpu_count()}"


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the model directory's files (name, size, and the first and last 64 KiB of
    each): cheap on a 90 MB model, and any retrained, re-pruned or re-indexed model differs. The
    stored calibration and model-config.yaml are left out: a copy with another T (archive/
    set_latency_constraint.py) is the same model; the settings that change t_k are in the key."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).iterdir()):
        if not f.is_file() or f.name in (FILE, "model-config.yaml"):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    return h.hexdigest()


def calibration_key(model_dir: str | Path, task: str, levels: list[int], batch_sizes: tuple[int, ...],
                    threads: int, packed: bool = False) -> dict:
    """What a stored calibration must match to be reused (``packed``: the levels run from
    contiguous copies, handler.packed_levels, which changes t_k; and whether torch's matrix
    products go through oneDNN in this process now, handler.onednn, which changes it too)."""
    return {"model": model_fingerprint(model_dir), "machine": machine_id(), "torch": torch.__version__,
            "threads": threads, "task": task, "levels": list(levels), "batch_sizes": list(batch_sizes),
            "packed": packed, "onednn": bool(torch.backends.mkldnn.enabled)}


def load(model_dir: str | Path, key: dict) -> Calibration | None:
    """The calibration stored in ``model_dir`` under ``key``, or None (none stored, another key,
    or an unreadable file: logged, then re-measured)."""
    path = Path(model_dir) / FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != key:
            return None
        return Calibration(tuple(doc["batch_sizes"]), {int(k): tuple(v) for k, v in doc["ms"].items()})
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: stored calibration unreadable (%s); measuring again", path, e)
        return None


def save(model_dir: str | Path, key: dict, cal: Calibration) -> bool:
    """Store ``cal`` under ``key`` (written to a temporary file, then renamed: a reader never
    sees half a file, and a hard-linked model copy keeps its own). False when the directory is
    not writable (logged; serving goes on)."""
    path = Path(model_dir) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"key": key, "batch_sizes": list(cal.batch_sizes),
                                   "ms": {str(k): list(v) for k, v in cal.ms.items()}}, indent=1))
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("%s: cannot store the calibration (%s); a restart will measure it again", path, e)
        return False
