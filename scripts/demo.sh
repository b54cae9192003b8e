#!/usr/bin/env bash
# The main job: install what is needed, then run ElasticDenser end to end (benchmarks/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.demo "$@"
