#!/usr/bin/env bash
# The GPU checklist in one go; prints a markdown report to paste into docs/performance.md (also saved under $OUT or
# /tmp/gpu_check). Run from anywhere, on a machine with one GPU or more:
#   benchmarks/gpu_check.sh                 # everything the visible GPUs allow (estimated 6-9 minutes on one H200)
#   QUICK=1 benchmarks/gpu_check.sh         # tests and --plan only
# 1. CUDA-only tests (tests/test_cuda.py: bf16 vs fp32 numerics, CUDA vs CPU fp32, NCCL stage processes with >= 2
#    GPUs); 2. benchmarks/real_size.py: Transfer2.5-2B with random weights, every stage's cost and peak memory at
#    704x1280 x 93 frames beside --plan's estimate of each call's peak, the projected full-video time next to
#    upstream's, and the presets the GPUs allow under torchrun (NCCL); 3. --plan for the same placements.
# On this workplace's lent machine first run benchmarks/gpu_wheels.sh here and carry .whl (the script installs it).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1 TRANSFER_CACHE_DIR="${TRANSFER_CACHE_DIR:-/tmp/transfer-cache}"
PY="${PYTHON:-python3}"
REPORT="${OUT:-/tmp/gpu_check}/gpu_check.md"
mkdir -p "$(dirname "$REPORT")"
exec > >(tee "$REPORT") 2>&1

GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
MEM_GB=$($PY -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 1e9))" 2>/dev/null || echo 80)
WORLDS=$(for w in 2 4 8; do [ "$w" -le "$GPUS" ] && printf '%s,' "$w"; done)
echo "# GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/    /'
$PY -c "import torch, diffusers, transformers; print(f'    torch {torch.__version__} (CUDA {torch.version.cuda}, NCCL {\".\".join(map(str, torch.cuda.nccl.version()))}), diffusers {diffusers.__version__}, transformers {transformers.__version__}, {torch.cuda.device_count()} GPU(s)')"

echo; echo "## 1. CUDA tests (tests/test_cuda.py)"; echo
timeout 900 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | grep -E "vs fp32|vs CPU|passed|failed|skipped|Error|assert" | sed 's/^/    /'

if [ -z "${QUICK:-}" ]; then
  echo; echo "## 2. Real size: Transfer2.5-2B, random weights (benchmarks/real_size.py)"; echo
  timeout 1200 $PY benchmarks/real_size.py --placements "${WORLDS%,}" 2>&1 | grep -v -E "Loading weights|it/s\]|step/s\]"
fi

echo; echo "## 3. Memory plan (--plan, ${MEM_GB} GB per GPU)"; echo
for w in 1 ${WORLDS//,/ }; do
  $PY transfer.py --plan --num_gpus "$w" --checkpoint_preset transfer2.5-2b --gpu_memory_gb "$MEM_GB" 2>&1 | sed 's/^/    /'
  echo
done
echo "report: $REPORT"
