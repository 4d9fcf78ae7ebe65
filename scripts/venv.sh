# Sourced by demo.sh and test.sh from the repository root: create and activate .venv, then install
# AnomalyFlag editable with the pip arguments given (e.g. ".[test]").
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain "torch" requirement would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e "$@"
