#!/usr/bin/env bash
# Sourced by the other scripts: create ./.venv if needed and install this package into it.
#   source launch/setup.sh [EXTRAS]      e.g. EXTRAS=test,s3,gcs
# torch: pyproject.toml accepts the supported range (torch>=2.11,<2.14), and pip keeps a torch
# that is already installed in it. Where the venv has no torch yet, the tested release
# torch==$DCP_TRAIN_TORCH (default 2.13.0) is installed first, on its own: on a CPU machine
# whose pip finds the local CPU wheel that is the CPU build, while resolving the range alone
# could pick a newer release, a CUDA build of several GB. If ../shared/tiktoken_cache exists
# (tests, CI, offline machines) and TIKTOKEN_CACHE_DIR is unset, tiktoken is pointed at it.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-}"
if [ ! -x "$_root/.venv/bin/python" ]; then
  python3 -m venv "$_root/.venv"
fi
_pip=("$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$_root/.venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  "${_pip[@]}" "torch==${DCP_TRAIN_TORCH:-2.13.0}"
fi
_spec="$_root"
[ -n "$_extras" ] && _spec="$_root[$_extras]"
"${_pip[@]}" -e "$_spec"
export PATH="$_root/.venv/bin:$PATH"
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$_root/../shared/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="$_root/../shared/tiktoken_cache"
fi
