#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py says what it measures; < 8 min on one GPU):
#   bash launch/gpu_check.sh                       # CUDA, world size 1
#   bash launch/gpu_check.sh --device cpu --tiny   # the same flow on CPU with tiny models
# Figures: bench/gpu_results.json and .md (printed too).
#
# Python: $PYTHON, else ./.venv/bin/python if present, else python3. It must have torch (any
# release in the supported range, e.g. the GPU machine's own CUDA build; it is never replaced).
# What else dcp_train needs and is missing (torchdata, tiktoken, ...) is installed OFFLINE from
# wheels in $DCP_TRAIN_WHEELS (default launch/gpu_wheels/, not kept in git) into ./.gpu_venv, a
# venv that sees the system's packages (so its torch). Fill that folder on a machine with PyPI,
# for the GPU machine's Python version (python3 -V there; 3.12 below) and platform:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d launch/gpu_wheels \
#     torchdata==0.11.0 tiktoken regex requests urllib3 idna certifi charset-normalizer \
#     tqdm numpy fsspec
# (--no-deps: never torch itself, which torchdata would pull; the list is the closure of
# dcp_train's runtime needs minus torch and torch's own dependencies.)
set -euo pipefail
cd "$(dirname "$0")/.."
_py="${PYTHON:-}"
if [ -z "$_py" ]; then
  if [ -x .venv/bin/python ]; then _py=.venv/bin/python; else _py=python3; fi
fi
_need="import torch, torchdata, tiktoken, tqdm, numpy, fsspec"
if ! "$_py" -c "$_need" 2>/dev/null; then
  _wheels="${DCP_TRAIN_WHEELS:-launch/gpu_wheels}"
  "$_py" -c "import torch" || { echo "gpu_check: error: $_py has no torch; install torch first" >&2; exit 2; }
  [ -x .gpu_venv/bin/python ] || "$_py" -m venv --system-site-packages .gpu_venv
  _py=.gpu_venv/bin/python
  if ! "$_py" -c "$_need" 2>/dev/null; then
    echo "gpu_check: installing dcp_train's dependencies offline from $_wheels"
    "$_py" -m pip install -q --disable-pip-version-check --no-index --find-links "$_wheels" \
      torchdata tiktoken tqdm numpy fsspec || {
      echo "gpu_check: error: cannot install torchdata/tiktoken/... from $_wheels; fill it with" \
           "pip download as the header of launch/gpu_check.sh says" >&2; exit 2; }
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$_py" -m bench.gpu_check "$@"
