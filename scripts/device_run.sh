#!/usr/bin/env bash
# Run recipe stages on a lent GPU machine that reaches no registry or hub (benchmarks/results/gpu/README.md).
# The machine's own python3 holds torch and transformers; what it lacks travels in .gpu/ (git-ignored):
#   .gpu/*.whl                      bm25s, ir-measures, pytrec-eval-terrier (pip download --platform manylinux...)
#   .gpu/faiss.tar.xz               the unpacked faiss-cpu wheel, xz -9e (18.8 MB wheel -> 9.4 MB); only for stages
#                                   that search an index (training.build_index, benchmarks.evaluate)
#   .gpu/teacher/ + teacher16.safetensors.xz   the bundled teacher's files; its weights rounded to fp16 and xz'd
#                                   (90.9 MB -> 40.8 MB, so the tree fits the 64 MiB a call carries)
#   .gpu/dense.top20.dev500.trec    ElasticDenser's top 20 for the rerank benchmark's dense first stage, written here
#                                   by python -m benchmarks.rerank --denser-run runs/full --save-dense-run FILE
# usage: bash scripts/device_run.sh CONFIG STAGE...   (a stage: a python module with its own flags, quoted, e.g.
#        training.prune or "benchmarks.rerank --device cuda")
# Env: DEADLINE=S stops the stage running S seconds after this script started, and starts no other (the stages
# resume from their checkpoints in the next call on the same warm machine); PACK="DIR..." packs those model
# directories' weights into $OUT (scripts/pack_weights.py; unpack them here with the same script).
# Training stages get --device cuda; the teacher is the fp16-rounded one, back in fp32 (prune.teacher, set in
# a copy of CONFIG parsed as YAML: a recipe with its own prune section keeps it).
# $OUT/run.tgz: the run directory without weights, indexes or caches.
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 1
  if [ -f .gpu/faiss.tar.xz ]; then tar xJf .gpu/faiss.tar.xz -C /tmp/site || exit 1; fi  # only stages that search
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD
if [ ! -f /tmp/teacher/model.safetensors ]; then
  mkdir -p /tmp/teacher && cp -r .gpu/teacher/* /tmp/teacher/
  xz -dc .gpu/teacher16.safetensors.xz > /tmp/t16.safetensors
  python3 -c "
from safetensors.torch import load_file, save_file
sd = load_file('/tmp/t16.safetensors'); save_file({k: v.float().contiguous() for k, v in sd.items()}, '/tmp/teacher/model.safetensors')" || exit 1
fi
CFG=$1; shift
python3 -c "
import sys, yaml
raw = yaml.safe_load(open(sys.argv[1])) or {}
raw.setdefault('prune', {})['teacher'] = '/tmp/teacher'
yaml.safe_dump(raw, open('/tmp/cfg.yaml', 'w'))" "$CFG" || exit 1
RUN=$(python3 -c "from training.config import load_config; print(load_config('/tmp/cfg.yaml').run_dir)")
mkdir -p "$RUN/logs"
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
for st in "$@"; do
  t0=$(date +%s)
  left=$(( ${DEADLINE:-999999} - (t0 - T0) ))
  if [ $left -le 10 ]; then echo "=== $st not started: DEADLINE"; continue; fi
  echo "=== $st"
  timeout $left python3 -m $st --config /tmp/cfg.yaml $(case $st in training.*) echo --device cuda;; esac) 2>&1 | tee -a "$RUN/logs/device.log" | tr '\r' '\n' | grep -v "/s\]$\|s/[a-z]*\]$" | tail -40
  echo "=== $st rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s"
done
PACKED=""
for d in ${PACK:-}; do [ -f "$d/model.safetensors" ] && PACKED="$PACKED $d"; done
[ -n "$PACKED" ] && python3 scripts/pack_weights.py pack $OUT $PACKED
tar czf $OUT/run.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.faiss' "$RUN" 2>/dev/null
ls -la $OUT
