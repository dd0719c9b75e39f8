#!/usr/bin/env bash
# The GPU checklist in one go; prints a markdown report to paste into docs/performance.md (also saved under $OUT or
# /tmp/gpu_check). Sized for 8 minutes on one H200, install included. Run from anywhere, on a machine with one GPU or
# more:
#   benchmarks/gpu_check.sh              # everything, each section under its own time limit
#   QUICK=1 benchmarks/gpu_check.sh      # smoke runs and tests only
# Sections (each guarded: a failing or timed-out section prints its error and the rest runs):
#   1. benchmarks/dit_step.py: the DiT step at 93x704x1280 per attention backend, CFG with one and two controls (time
#      and peak memory),
#      --compile torch; FLOPs counted, share of peak, projected 35-step chunk beside upstream's published times;
#   2. benchmarks/real_size.py --stages text,vae: text encode, VAE encode/decode/re-encode seconds and peak memory
#      beside --plan's estimate (FakeTensorMode: the stack's check too); with >= 2 GPUs, the torchrun placements;
#   3. smoke: the main command (demo checkpoint, face pixelation on) and the tiny Transfer2.5 example on this GPU;
#   4. tests/test_cuda.py (bf16 vs fp32, CUDA vs CPU, NCCL stage processes with >= 2 GPUs);
#   5. --plan for the 2B preset;
#   6. Cosmos 3: benchmarks/cosmos3_step.py (one Nano 720p denoise step, ours vs diffusers' own transformer side by
#      side), benchmarks/real_size.py --preset cosmos3-nano at 720p 121 frames (VAE calls and each transformer pass,
#      random weights, beside --plan), the tiny Cosmos 3 example on this GPU, and with >= 2 GPUs under torchrun;
#   7. the VAE split over ranks (benchmarks/vae_split.py): with >= 2 GPUs, one chunk's encode and decode at degree 1
#      and every degree the GPUs allow, both VAE forms (degree 1 alone is section 2's).
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
START=$SECONDS
section() { echo; echo "## $1 (at $((SECONDS - START)) s)"; echo; }
# run LIMIT CMD...: the command under a time limit; its failure is reported, never fatal
run() {
  local limit=$1; shift
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "    SECTION stopped at its ${limit} s limit"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "    SECTION exit $rc"
  return 0
}
quiet() { grep -v -E "Loading weights|it/s\]|step/s\]|s/it\]|USDT|profiler_st"; }
# run's own SECTION lines pass every filter below

GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
MEM_GB=$($PY -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 1e9))" 2>/dev/null || echo 80)
WORLDS=$(for w in 2 4 8; do [ "$w" -le "$GPUS" ] && printf '%s,' "$w"; done)
echo "# GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/    /'
$PY -c "import sys, torch, diffusers, transformers, accelerate, cv2; print(f'    Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {\".\".join(map(str, torch.cuda.nccl.version()))}), diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, OpenCV {cv2.__version__}, {torch.cuda.device_count()} GPU(s)')"

if [ -z "${QUICK:-}" ]; then
  section "1. DiT step at real size: attention backends, CFG, compile (benchmarks/dit_step.py)"
  run "${DIT_LIMIT:-270}" $PY benchmarks/dit_step.py --compile 2>&1 | quiet

  section "2. Text and VAE calls at real size (benchmarks/real_size.py --stages text,vae)"
  run "${REAL_LIMIT:-150}" $PY benchmarks/real_size.py --stages text,vae --placements "${WORLDS%,}" 2>&1 | quiet
fi

section "3. Smoke: the README's main command and the tiny Transfer2.5 example on this GPU"
SMOKE=$(mktemp -d)
( cd "$SMOKE" && run 90 $PY "$OLDPWD/transfer.py" --controlnet_specs "$OLDPWD/assets/demo_spec.json" \
    --video_save_folder main 2>&1 | grep -E "INFO.*(attention|written|guardrails|weights on)|error|Error|SECTION" | sed 's/^/    /'
  run 90 $PY "$OLDPWD/transfer.py" --checkpoint_preset tiny -i "$OLDPWD/assets/example_spec25.json" -o t25 2>&1 \
    | grep -E "INFO.*(attention|written|weights on)|error|Error|SECTION" | sed 's/^/    /'
  ls main t25 2>&1 | tr '\n' ' ' | sed 's/^/    files: /'; echo )

section "4. CUDA tests (tests/test_cuda.py)"
run 150 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | grep -E "vs fp32|vs CPU|passed|failed|skipped|Error|assert|SECTION" | sed 's/^/    /'

section "5. Memory plan (--plan, ${MEM_GB} GB per GPU)"
for w in 1 ${WORLDS//,/ }; do
  run 75 $PY transfer.py --plan --num_gpus "$w" --checkpoint_preset transfer2.5-2b --gpu_memory_gb "$MEM_GB" 2>&1 \
    | sed 's/^/    /'
  echo
done
section "6. Cosmos 3 (docs/cosmos3.md)"
if [ -z "${QUICK:-}" ]; then
  # one denoise step of Nano at 720p, two hints: this fork's transformer vs diffusers' own, same weights, same GPU
  run "${COSMOS3_STEP_LIMIT:-240}" $PY benchmarks/cosmos3_step.py --height 720 --width 1280 --frames 121 2>&1 | quiet
  run "${COSMOS3_LIMIT:-180}" $PY benchmarks/real_size.py --preset cosmos3-nano --height 720 --width 1280 --frames 121 \
    --steps 1 --placements "" 2>&1 | quiet
fi
C3=$(mktemp -d)
run 90 $PY transfer.py --checkpoint_preset cosmos3-tiny -i assets/example_cosmos3.json -o "$C3/one" --save_raw 2>&1 \
  | grep -E "INFO.*(placement|wrote)|error|Error|SECTION" | sed 's/^/    /'
if [ "$GPUS" -ge 2 ]; then
  run 120 torchrun --nproc_per_node 2 transfer.py --checkpoint_preset cosmos3-tiny -i assets/example_cosmos3.json \
    -o "$C3/two" --save_raw --cp-size 2 2>&1 | grep -E "INFO.*(placement|wrote)|error|Error|SECTION" | sed 's/^/    /'
  C3="$C3" $PY - <<'PYEOF' 2>&1
import os
import numpy as np
a, b = (np.load(f"{os.environ['C3']}/{d}/example_cosmos3.npz") for d in ("one", "two"))
print(f"    cosmos3 sp 2 vs one GPU: latents max diff {abs(a['latents'] - b['latents']).max():.3e}, "
      f"frames max diff {abs(a['frames'].astype(int) - b['frames'].astype(int)).max()}")
PYEOF
fi
section "7. The VAE split over ranks (benchmarks/vae_split.py)"
if [ "$GPUS" -ge 2 ] && [ -z "${QUICK:-}" ]; then
  DEGREES="1 ${WORLDS//,/ }"
  for p in transfer2.5-2b cosmos3-nano; do
    run "${VAE_LIMIT:-150}" $PY benchmarks/vae_split.py --preset "$p" --degrees $DEGREES --frames 93 --height 704 \
      --width 1280 2>&1 | grep -v '^{' | quiet | sed 's/^/    /'
  done
else
  echo "    one GPU (or QUICK): the split needs a GPU per rank; degree 1's encode and decode are section 2's"
fi
echo "total $((SECONDS - START)) s; report: $REPORT"
