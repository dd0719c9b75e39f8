#!/usr/bin/env bash
# Here (a machine with network), before benchmarks/gpu_check.sh runs on this workplace's lent GPU machine, which has
# PyTorch, transformers, accelerate, imageio, OpenCV... but not diffusers, PyAV or loguru, and no network:
# download those wheels (CPython 3.12, x86-64) into .whl/ (git-ignored through .git/info/exclude), ~42 MB.
# Then: device run, carry [".whl"], command "benchmarks/gpu_check.sh". On any other GPU machine: pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 av==18.1.0 loguru==0.7.3 importlib_metadata
ls -la .whl
