#!/usr/bin/env bash
# Run recipe stages on a lent GPU machine that reaches no registry or hub (benchmarks/results/gpu/README.md).
# The machine's own python3 holds torch and transformers; what it lacks travels in .gpu/ (git-ignored):
#   .gpu/*.whl                      bm25s, ir-measures, pytrec-eval-terrier (pip download --platform manylinux...)
#   .gpu/faiss.tar.xz               the unpacked faiss-cpu wheel, xz -9e (18.8 MB wheel -> 9.4 MB)
#   .gpu/teacher/ + teacher16.safetensors.xz   the bundled teacher's files; its weights rounded to fp16 and xz'd
#                                   (90.9 MB -> 40.8 MB, so the tree fits the 64 MiB a call carries)
# usage: bash scripts/device_run.sh CONFIG STAGE...   (stages: python modules, e.g. training.prune)
# Training stages get --device cuda; the teacher is the fp16-rounded one, back in fp32 (prune.teacher, set in
# a copy of CONFIG parsed as YAML: a recipe with its own prune section keeps it).
# $OUT/run.tgz: the run directory without weights, indexes or caches.
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/faiss ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 1
  tar xJf .gpu/faiss.tar.xz -C /tmp/site || exit 1
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
python3 -c "import torch, transformers, faiss, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'faiss', faiss.__version__, 'numpy', numpy.__version__)"
for st in "$@"; do
  t0=$(date +%s)
  echo "=== $st"
  python3 -m $st --config /tmp/cfg.yaml $(case $st in training.*) echo --device cuda;; esac) 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$" | tail -40
  echo "=== $st rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s"
done
tar czf $OUT/run.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.faiss' "$RUN" 2>/dev/null
ls -la $OUT
