#!/usr/bin/env bash
# One call that measures rlhfkit on a lent NVIDIA GPU and prints one table (see benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine: full shapes, at most 8 minutes
#   bash benchmarks/gpu_suite.sh --dry-run    # here or in CI: tiny random model on the CPU
#
# Needs nothing built by hand: rlhfkit runs from src/ (no install), with the Python that has torch and
# transformers (.venv/bin/python when there is one, else python3). Wheels the machine lacks (trl,
# datasets, ...) can travel in .whl/ (the device tool's README says how to fetch them); they are
# installed into /tmp/site for this call only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_suite.py "$@"
