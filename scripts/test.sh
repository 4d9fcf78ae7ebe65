#!/usr/bin/env bash
# Set up a virtual environment (.venv) and run the linters and the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh ".[test]"
ruff check .
ruff format --check .
python -m pytest "$@"
