"""Change the latency constraint T of a served elastic model without downtime.

    python -m archive.set_latency_constraint --model elastic --ms 80 [--model-store model_store]
        [--management http://127.0.0.1:8081] [--timeout-s 300]

TorchServe has no API for handler settings, and re-registering a model leaves it unavailable for
seconds. So, through its management API (../shared/notes/torchserve-0.12.md):

1. copy the default version's archive (.mar, or a no-archive directory) into the model store as a
   new no-archive directory whose model-config.yaml has ``handler.latency_constraint_ms`` = T and
   whose MANIFEST names a new version ("<epoch>-T<ms>"); files are hard links where possible;
2. register it under the same model name with as many workers as the old version has, and wait
   until they are READY (their t_k calibration stored beside the model is reused where present,
   elastic/calibration_store.py);
3. make it the default version: new requests go to it from then on;
4. wait until the old version has no request waiting, plus a grace period for the batch in
   progress, then unregister it (and delete its directory if an earlier run of this script made it).

Requests keep being answered by one version or the other throughout. Prints each step and the
seconds it took. T is validated before anything touches the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import yaml

PREFIX_SEP = "-T"  # directories this script makes: <model>-T<ms>-<epoch>


def parse_ms(text: str) -> float:
    """T in milliseconds from the command line.

    Raises:
        argparse.ArgumentTypeError: not a number, not finite, or not > 0.
    """
    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"T must be a number of milliseconds, got {text!r}") from None
    if not (math.isfinite(ms) and ms > 0):
        raise argparse.ArgumentTypeError(f"T must be a positive number of milliseconds, got {text!r}")
    return ms


class Management:
    """The few TorchServe management API calls this needs (JSON in, JSON out)."""

    def __init__(self, address: str):
        self.address = address.rstrip("/")

    def call(self, method: str, path: str, timeout_s: float = 30) -> object:
        req = urllib.request.Request(self.address + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise RuntimeError(f"{method} {path} answered {e.code}: {detail}") from None
        return json.loads(body) if body else None

    def version(self, model: str, version: str) -> dict:
        return self.call("GET", f"/models/{model}/{urllib.parse.quote(version)}")[0]  # type: ignore[index]


def copy_version(store: Path, url: str, model: str, ms: float, version: str) -> Path:
    """A no-archive copy of the archive ``url`` (in ``store``) with T = ``ms`` and the MANIFEST
    version ``version``; returns its directory.

    Raises:
        FileNotFoundError: ``url`` is not in the model store (a remote url cannot be copied).
        ValueError: the archive has no model-config.yaml with a handler section.
    """
    src = store / url
    if not src.exists():
        raise FileNotFoundError(f"{src}: the model's archive is not in the model store {store}")
    out = store / f"{model}{PREFIX_SEP}{ms:g}-{int(time.time())}"
    if src.is_dir():
        shutil.copytree(src, out, copy_function=_link_or_copy)
    else:
        with zipfile.ZipFile(src) as z:
            z.extractall(out)
    manifest = out / "MAR-INF" / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    cfg_name = doc["model"].get("configFile")
    if not cfg_name or not (out / cfg_name).exists():
        shutil.rmtree(out)
        raise ValueError(f"{url}: has no model-config.yaml (build it with archive/build_mar.py)")
    cfg = yaml.safe_load((out / cfg_name).read_text()) or {}
    if not isinstance(cfg.get("handler"), dict):
        shutil.rmtree(out)
        raise ValueError(f"{url}: its model-config.yaml has no handler section")
    cfg["handler"]["latency_constraint_ms"] = ms
    doc["model"]["modelVersion"] = version
    for path, text in ((out / cfg_name, yaml.safe_dump(cfg, sort_keys=False)), (manifest, json.dumps(doc, indent=2))):
        path.unlink()  # possibly a hard link to the old version's file: write a new one
        path.write_text(text)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def wait_idle(api: Management, model: str, version: str, grace_s: float, timeout_s: float) -> float:
    """Seconds until ``version`` has had no request waiting for ``grace_s`` (the batch in
    progress then finishes before it is unregistered).

    Raises:
        TimeoutError: requests still waiting after ``timeout_s``.
    """
    t0 = time.time()
    quiet_since = None
    while time.time() - t0 < timeout_s:
        pending = int(api.version(model, version).get("jobQueueStatus", {}).get("pendingRequests", 0))
        now = time.time()
        quiet_since = (quiet_since or now) if pending == 0 else None
        if quiet_since is not None and now - quiet_since >= grace_s:
            return now - t0
        time.sleep(0.1)
    raise TimeoutError(f"{model} version {version} still has requests waiting after {timeout_s:.0f} s")


def set_latency_constraint(api: Management, store: Path, model: str, ms: float, timeout_s: float = 300,
                           log=print) -> str:
    """Serve ``model`` with T = ``ms`` under a new version, then retire the old one (module
    docstring). Returns the new version.

    Raises:
        RuntimeError: a management call failed, or the new version does not serve T = ``ms``
            (ELASTIC_LATENCY_CONSTRAINT_MS overrides the yaml); the old version keeps serving and
            a registered new version is unregistered again.
    """
    old = api.call("GET", f"/models/{model}")[0]  # the default version  # type: ignore[index]
    old_version, old_url = old["modelVersion"], old["modelUrl"]
    workers = max(1, len(old.get("workers", [])), int(old.get("minWorkers", 1)))
    new_version = f"{int(time.time())}{PREFIX_SEP}{ms:g}"
    t0 = time.time()
    out = copy_version(store, old_url, model, ms, new_version)
    log(f"[set-T] {model}: version {new_version} in {out} ({time.time() - t0:.1f} s)")
    t0 = time.time()
    q = urllib.parse.urlencode({"url": out.name, "model_name": model, "initial_workers": workers,
                                "synchronous": "true"})
    try:
        api.call("POST", f"/models?{q}", timeout_s)
        served = served_T(api, model, new_version)
        if served is not None and served != ms:
            raise RuntimeError(f"version {new_version} serves T = {served:g} ms, not {ms:g}: the environment of "
                               "`torchserve --start` sets ELASTIC_LATENCY_CONSTRAINT_MS, which overrides the yaml "
                               "(unset it, or change T there and restart); the old version keeps serving")
        api.call("PUT", f"/models/{model}/{urllib.parse.quote(new_version)}/set-default")
    except Exception:
        try:
            api.call("DELETE", f"/models/{model}/{urllib.parse.quote(new_version)}")
        except Exception:
            pass
        shutil.rmtree(out, ignore_errors=True)
        raise
    log(f"[set-T] {model}: version {new_version} READY with {workers} worker(s) and the default "
        f"({time.time() - t0:.1f} s)")
    grace_s = 1.0 + float(old.get("maxBatchDelay", 0)) / 1000  # longer than any batch in progress takes
    waited = wait_idle(api, model, old_version, grace_s, timeout_s)
    api.call("DELETE", f"/models/{model}/{urllib.parse.quote(old_version)}", timeout_s)
    log(f"[set-T] {model}: version {old_version} drained ({waited:.1f} s) and unregistered")
    old_dir = store / old_url
    if old_dir.is_dir() and old_dir.name.startswith(f"{model}{PREFIX_SEP}"):
        shutil.rmtree(old_dir, ignore_errors=True)
    return new_version


def served_T(api: Management, model: str, version: str) -> float | None:
    """The T (ms) a registered version's handler reports (GET ...?customized=true), or None."""
    meta = api.call("GET", f"/models/{model}/{urllib.parse.quote(version)}?customized=true")[0]  # type: ignore[index]
    meta = meta.get("customizedMetadata")
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return float(meta["latency_constraint_ms"]) if isinstance(meta, dict) and "latency_constraint_ms" in meta else None


def main() -> None:
    ap = argparse.ArgumentParser(description="Change the latency constraint T of a served model without downtime.")
    ap.add_argument("--model", default="elastic", help="TorchServe model name")
    ap.add_argument("--ms", required=True, type=parse_ms, help="the new T in milliseconds (> 0)")
    ap.add_argument("--model-store", type=Path, default=Path("model_store"), help="TorchServe's --model-store")
    ap.add_argument("--management", default="http://127.0.0.1:8081", help="TorchServe management API address")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for a worker or a drain")
    a = ap.parse_args()
    try:
        set_latency_constraint(Management(a.management), a.model_store, a.model, a.ms, a.timeout_s)
    except (RuntimeError, OSError, ValueError, TimeoutError) as e:
        sys.exit(f"[set-T] failed: {e}")


if __name__ == "__main__":
    main()
