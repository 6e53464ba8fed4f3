#!/usr/bin/env bash
# The GPU check in one command (docs/gpus.md#the-gpu-check; bench/gpu_check.py says what it does):
#   bash launch/gpu_check.sh --preflight   # HERE, with PyPI: fill launch/gpu_wheels/ for the GPU
#   bash launch/gpu_check.sh               # on the GPU machine: CUDA, world size 1
#   bash launch/gpu_check.sh --rehearse    # here, on CPU: the same parts, tiny sizes, ~2 min
# Each part prints one JSON line as it ends and appends it to $OUT/gpu_check.jsonl; every
# child's output goes to $OUT/logs/ ($OUT unset: bench/gpu_out/).
#
# Python: $PYTHON, else ./.venv/bin/python if present, else python3. It must have torch (any
# release in the supported range, e.g. the GPU machine's own CUDA build; it is never replaced).
# What else dcp_train needs and is missing there (the GPU image lacks torchdata and crc32c) is
# installed OFFLINE, without dependencies, from the wheels in $DCP_TRAIN_WHEELS (default
# launch/gpu_wheels/, not kept in git: the device command carries it) into ./.gpu_site, put
# first on PYTHONPATH (a target dir, not a venv: the GPU machine's python3 is itself a venv).
# --preflight downloads those wheels for the GPU image's Python (GPU_PYTHON, default 3.12,
# cp312, manylinux x86-64) with pip download, and refuses with one line, exit 2, if one is
# missing afterwards.
set -euo pipefail
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}"  # the check's one clock starts here
cd "$(dirname "$0")/.."
_py="${PYTHON:-}"
if [ -z "$_py" ]; then
  if [ -x .venv/bin/python ]; then _py=.venv/bin/python; else _py=python3; fi
fi
_wheels="${DCP_TRAIN_WHEELS:-launch/gpu_wheels}"
# pinned: the versions the GPU image (torch 2.11, Python 3.12) is checked with
_want=("torchdata==0.11.0" "crc32c==2.9.post0")

if [ "${1:-}" = "--preflight" ]; then
  _pyver="${GPU_PYTHON:-3.12}"
  mkdir -p "$_wheels"
  for _w in "${_want[@]}"; do  # one version of each: two would stop the offline install
    find "$_wheels" -name "${_w%%==*}-*.whl" ! -name "${_w%%==*}-${_w##*==}-*" -delete
  done
  "$_py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$_pyver" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$_wheels" \
    "${_want[@]}" >"$_wheels/.pip.log" 2>&1 || true
  for _w in "${_want[@]}"; do
    _name="${_w%%==*}"; _ver="${_w##*==}"
    ls "$_wheels/$_name-$_ver-"*.whl >/dev/null 2>&1 || {
      echo "gpu_check: error: no $_name $_ver wheel for Python $_pyver in $_wheels" \
           "(pip download failed: $_wheels/.pip.log); get it there before the GPU call" >&2
      exit 2; }
  done
  echo "gpu_check: preflight ok: $(cd "$_wheels" && ls ./*.whl | tr '\n' ' ')in $_wheels"
  exit 0
fi

"$_py" -c "import torch" 2>/dev/null || {
  echo "gpu_check: error: $_py has no torch; install torch first (or set PYTHON)" >&2; exit 2; }
case " $* " in
  *" --rehearse "*) ;;
  *) "$_py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
       echo "gpu_check: error: CUDA is not available to $_py; run on a GPU machine, or" \
            "rehearse on CPU with --rehearse" >&2; exit 2; } ;;
esac
_need="import torch, torchdata, tiktoken, tqdm, numpy, fsspec, crc32c"
if ! "$_py" -c "$_need" 2>/dev/null; then
  echo "gpu_check: installing dcp_train's missing dependencies offline from $_wheels"
  "$_py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target .gpu_site "$_wheels"/*.whl || {
    echo "gpu_check: error: cannot install the wheels in $_wheels; fill it with" \
         "bash launch/gpu_check.sh --preflight where PyPI is reachable" >&2; exit 2; }
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  "$_py" -c "$_need" || {
    echo "gpu_check: error: still missing after installing $_wheels (above); add its wheel" >&2
    exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$_py" -m bench.gpu_check "$@"
