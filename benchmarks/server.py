"""Starting, waiting on and stopping a local TorchServe (used by benchmarks/online.py and the
integration test). Everything listens on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """Prefix ``taskset -c cpus`` when asked and available (keeps load generator and model apart)."""
    if cpus is not None and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpus] + cmd
    return cmd


class TorchServe:
    """One ``torchserve --start`` process group with its own log folder and PID-file folder.

    Args:
        ts_config: config.properties path; model_store: folder of .mar files;
        models: ``name=file.mar`` pairs to load at start; work_dir: logs/ and tmp/ go here;
        management: management API base address; env: extra environment (e.g. T override);
        log_config: log4j2 configuration (default: the project's log4j2.xml).
    """

    def __init__(self, ts_config: Path, model_store: Path, models: dict[str, str], work_dir: Path,
                 management: str = "http://127.0.0.1:8081", env: dict | None = None, log_config: Path | None = None):
        self.ts_config, self.model_store, self.models = ts_config, model_store, models
        self.log_config = log_config or ROOT / "log4j2.xml"
        self.work_dir, self.management = work_dir, management
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)
        (work_dir / "tmp").mkdir(parents=True, exist_ok=True)
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "LOG_LOCATION": str(work_dir / "logs"), "METRICS_LOCATION": str(work_dir / "logs"),
                    "TMPDIR": str(work_dir / "tmp"), "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    **(env or {})}

    def _ts(self, *args: str, cpus: str | None = None) -> int:
        """Run the torchserve launcher; its output goes to logs/launcher.log (the Java frontend
        it starts inherits these descriptors and keeps them open, so they are never pipes)."""
        cmd = pinned([str(Path(sys.executable).with_name("torchserve")), *args], cpus)
        with open(self.work_dir / "logs" / "launcher.log", "a") as log:
            return subprocess.run(cmd, env=self.env, cwd=self.work_dir, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL).returncode

    def start(self, cpus: str | None = None) -> None:
        models = [f"{k}={v}" for k, v in self.models.items()]  # one argument each (--models takes nargs="+")
        rc = self._ts("--start", "--ncs", "--ts-config", str(self.ts_config), "--model-store", str(self.model_store),
                      *(["--models", *models] if models else []), "--log-config", str(self.log_config), cpus=cpus)
        if rc != 0:
            raise RuntimeError(f"torchserve --start exited {rc}; see {self.work_dir / 'logs' / 'launcher.log'}")

    def stop(self) -> None:
        self._ts("--stop")

    def wait_up(self, timeout_s: float = 60) -> None:
        """Block until the management API answers (a start without models has no worker to wait on)."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            try:
                with urllib.request.urlopen(f"{self.management}/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"TorchServe's management API {self.management} not up after {timeout_s:.0f} s")

    def register(self, name: str, url: str, timeout_s: float = 300, workers: int = 1) -> None:
        """Register ``url`` (a .mar or model directory in the model store) as ``name`` with
        ``workers`` workers and wait until they are READY (TorchServe management API,
        ``synchronous=true``). One model at a time, so that a worker's start-up (calibration) does
        not share the core with another model's."""
        import urllib.parse

        q = urllib.parse.urlencode({"url": url, "model_name": name, "initial_workers": workers, "synchronous": "true"})
        req = urllib.request.Request(f"{self.management}/models?{q}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s):
                pass
        except OSError as e:
            body = e.read().decode(errors="replace")[:500] if hasattr(e, "read") else ""
            raise RuntimeError(f"registering {name} ({url}) failed: {e} {body}") from None
        self.wait_ready(name, timeout_s, workers)

    def scale(self, name: str, workers: int, timeout_s: float = 300) -> None:
        """Set ``name`` to ``workers`` workers (PUT /models/{name}?min_worker=...&synchronous=true)
        and wait until they are READY. Scaling after a one-worker registration lets the new
        workers reuse the first one's stored calibration instead of timing at once on one core."""
        import urllib.parse

        q = urllib.parse.urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        req = urllib.request.Request(f"{self.management}/models/{name}?{q}", method="PUT")
        with urllib.request.urlopen(req, timeout=timeout_s):
            pass
        self.wait_ready(name, timeout_s, workers)

    def model_status(self, name: str) -> list | None:
        try:
            with urllib.request.urlopen(f"{self.management}/models/{name}", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    def wait_ready(self, name: str, timeout_s: float = 180, workers: int = 1) -> None:
        """Block until ``workers`` workers of ``name`` are READY; raises TimeoutError with the
        model log's tail."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            st = self.model_status(name)
            if st and sum(w.get("status") == "READY" for w in st[0].get("workers", [])) >= workers:
                return
            time.sleep(0.5)
        log = self.work_dir / "logs" / "model_log.log"
        tail = log.read_text()[-3000:] if log.exists() else "(no model_log.log)"
        raise TimeoutError(f"model {name} not READY after {timeout_s:.0f} s; model_log tail:\n{tail}")

    def wait_drained(self, name: str, timeout_s: float = 120) -> float:
        """Block until model ``name`` has no request waiting (``jobQueueStatus.pendingRequests``
        of the management API is 0); returns the seconds waited. A load generator that stops
        leaves what it sent behind, and the next run must not share the worker with it."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            st = self.model_status(name)
            if st and int(st[0].get("jobQueueStatus", {}).get("pendingRequests", 0)) == 0:
                return time.time() - t0
            time.sleep(0.5)
        raise TimeoutError(f"model {name} still has requests waiting after {timeout_s:.0f} s")

    def describe(self, name: str) -> dict:
        """The handler's describe_handle() (calibrated t_k, T, levels)."""
        with urllib.request.urlopen(f"{self.management}/models/{name}?customized=true", timeout=10) as resp:
            meta = json.loads(resp.read())[0].get("customizedMetadata", "{}")
        return json.loads(meta) if isinstance(meta, str) else meta


def model_variant(base: Path, store: Path, name: str, handler: dict | None = None, batch: dict | None = None) -> Path:
    """A copy of the no-archive model directory ``base`` as ``store/name`` whose model-config.yaml
    differs only by ``handler`` settings (e.g. pin_level, latency_constraint_ms) and top-level
    ``batch`` keys (batchSize, maxBatchDelay); files are hard links, so a variant costs no disk.
    This is what ops would do to change a setting: a model directory with its own yaml."""
    import yaml

    out = store / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, copy_function=os.link)
    cfg_path = out / "model-config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.update(batch or {})
    if handler:
        cfg.setdefault("handler", {}).update(handler)
    cfg_path.unlink()  # a hard link: write a new file, leave base's untouched
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def free_ports(n: int) -> list[int]:
    """n free TCP ports on 127.0.0.1."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def scrape(metrics_url: str, prefix: str = "Elastic") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of TorchServe's Prometheus endpoint, parsed by prometheus_client: (metric name
    as TorchServe names it, sorted labels without Hostname) -> value, for the metrics whose name
    starts with ``prefix`` (the parser's counter samples end in _total; the family name does not)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name.startswith(prefix):
                out[(family.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "Hostname")))] = s.value
    return out


def local_config(work: Path) -> tuple[Path, int, int, int]:
    """work/config.properties: the project's config.properties on free loopback ports, with its
    own worker socket port (/tmp/.ts.sock.<port>), apart from a TorchServe already running.
    Returns (path, inference port, management port, metrics port)."""
    inf, mgmt, met, worker = free_ports(4)
    props = (ROOT / "config.properties").read_text()
    props = props.replace("8080", str(inf)).replace("8081", str(mgmt)).replace("8082", str(met))
    path = work / "config.properties"
    path.write_text(props + f"initial_worker_port={worker}\n")
    return path, inf, mgmt, met
