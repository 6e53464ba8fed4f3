#!/usr/bin/env bash
# Sourced by the other scripts: create ./.venv if needed and install this package into it.
#   source launch/setup.sh [EXTRAS]      e.g. EXTRAS=test,s3,gcs
# torch is pinned to 2.13.0 in pyproject.toml, so a CPU machine with the local CPU wheel
# never pulls CUDA packages. If ../shared/tiktoken_cache exists (tests, CI, offline machines)
# and TIKTOKEN_CACHE_DIR is unset, tiktoken is pointed at it.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-}"
if [ ! -x "$_root/.venv/bin/python" ]; then
  python3 -m venv "$_root/.venv"
fi
_spec="$_root"
[ -n "$_extras" ] && _spec="$_root[$_extras]"
"$_root/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$_spec"
export PATH="$_root/.venv/bin:$PATH"
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$_root/../shared/tiktoken_cache" ]; then
  export TIKTOKEN_CACHE_DIR="$_root/../shared/tiktoken_cache"
fi
