#!/usr/bin/env bash
# The full recipe in the background (hours on 2 CPU cores; each stage resumes from its checkpoint):
#   prune, then side by side on the 2 cores:
#   chain A: [relation distillation] -> task stage (training.train) -> index
#   chain B: static baselines (every level alone, same recipe and step budget)
# then the offline evaluation, and the ablations (benchmarks/ablation.py) at ABLATION_STEPS task
# steps each (default 150). Logs: <run_dir>/logs/. Pass --device cuda to train on a GPU.
# CFG=other.yaml picks another recipe; ABLATION=0 skips the ablations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CFG=${CFG:-configs/full.yaml}
RUN=$(.venv/bin/python -c "from training.config import load_config; print(load_config('$CFG').run_dir)")
mkdir -p "$RUN/logs"
py() { .venv/bin/python -m "$@" --config "$CFG" "${EXTRA[@]}"; }
EXTRA=("$@")
py training.prune > "$RUN/logs/prune.log" 2>&1
ABLATION=${ABLATION:-1}
( py training.train && py training.build_index ) > "$RUN/logs/chainA.log" 2>&1 &
A=$!
py training.static > "$RUN/logs/chainB.log" 2>&1 &
B=$!
wait $A; wait $B
.venv/bin/python -m benchmarks.evaluate --config "$CFG" > "$RUN/logs/evaluate.log" 2>&1
if [ "$ABLATION" = 1 ]; then
  .venv/bin/python -m benchmarks.ablation --config "$CFG" --steps "${ABLATION_STEPS:-150}" --threads 0 "${EXTRA[@]}" > "$RUN/logs/ablation.log" 2>&1
fi
echo "[full] done: $RUN/eval/"
