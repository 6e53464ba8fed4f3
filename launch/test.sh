#!/usr/bin/env bash
# The README's test command: set up .venv (with the test servers) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh test
python -m pytest -q "$@"
