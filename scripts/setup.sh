#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine: Java 17 for TorchServe, and a
# virtual environment .venv with torch==2.13.0 (CPU) and requirements.txt. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "[setup] installing Java 17 (TorchServe's frontend)"
  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
if ! command -v taskset >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
fi

pipq() {  # quiet pip, without the local mirror's 'is ignored' noise
  .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  pipq torch==2.13.0
fi
if ! .venv/bin/pip freeze 2>/dev/null | grep -qx "torchserve==0.12.0" || [ requirements.txt -nt .venv/.requirements-done ]; then
  echo "[setup] installing requirements.txt"
  pipq -r requirements.txt
  touch .venv/.requirements-done
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers, ts; print("torch", torch.__version__, "transformers", transformers.__version__, "torchserve", ts.__version__)')"
