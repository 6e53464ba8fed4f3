#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py says what it measures; < 8 min on one GPU):
#   bash launch/gpu_check.sh                       # CUDA, world size 1
#   bash launch/gpu_check.sh --device cpu --tiny   # the same flow on CPU with tiny models
# Figures: bench/gpu_results.json and .md (printed too).
#
# Python: $PYTHON, else ./.venv/bin/python if present, else python3. It must have torch (any
# release in the supported range, e.g. the GPU machine's own CUDA build; it is never replaced).
# What else dcp_train needs and is missing (torchdata, tiktoken, ...) is installed OFFLINE,
# without dependencies, from the wheels in $DCP_TRAIN_WHEELS (default launch/gpu_wheels/, not
# kept in git) into ./.gpu_site, put first on PYTHONPATH (a target dir, not a venv: the GPU
# machine's python3 is itself a venv, whose packages a nested venv would not see). Fill that
# folder on a machine with PyPI, for the GPU machine's Python (python3 -V there; 3.12 below):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d launch/gpu_wheels \
#     torchdata==0.11.0 crc32c==2.9.post0
# adding any of tiktoken regex requests urllib3 idna certifi charset-normalizer tqdm numpy
# fsspec that the machine lacks (never torch itself, which torchdata would pull). crc32c is
# the checksum of every checkpoint file (pyproject's dependencies); the H200 image lacks it.
# Without CUDA (and without --device cpu) it stops at once: one line, exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
_py="${PYTHON:-}"
if [ -z "$_py" ]; then
  if [ -x .venv/bin/python ]; then _py=.venv/bin/python; else _py=python3; fi
fi
"$_py" -c "import torch" 2>/dev/null || {
  echo "gpu_check: error: $_py has no torch; install torch first (or set PYTHON)" >&2; exit 2; }
case " $* " in
  *" --device cpu "*|*" --device=cpu "*) ;;
  *) "$_py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
       echo "gpu_check: error: CUDA is not available to $_py; run on a GPU machine, or with" \
            "--device cpu --tiny for the CPU flow" >&2; exit 2; } ;;
esac
_need="import torch, torchdata, tiktoken, tqdm, numpy, fsspec, crc32c"
if ! "$_py" -c "$_need" 2>/dev/null; then
  _wheels="${DCP_TRAIN_WHEELS:-launch/gpu_wheels}"
  echo "gpu_check: installing dcp_train's missing dependencies offline from $_wheels"
  "$_py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target .gpu_site "$_wheels"/*.whl || {
    echo "gpu_check: error: cannot install the wheels in $_wheels; fill it with pip download" \
         "as the header of launch/gpu_check.sh says" >&2; exit 2; }
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  "$_py" -c "$_need" || {
    echo "gpu_check: error: still missing after installing $_wheels (above); add its wheel" >&2
    exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$_py" -m bench.gpu_check "$@"
