#!/usr/bin/env bash
# The device check, for the day a GPU is lent (README, "Checking a GPU"): the GPU tests, a
# throughput and MFU table of the tiny, base and small presets, and a 200-step tiny training on
# CUDA, in under 8 minutes on one H200. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else runs/gpu_check)
#
# Python: $PYTHON, else .venv/bin/python (a machine set up with `make setup`), else python3. On a
# bare GPU machine without the lock's packages, put them in .whl/ first on a machine with PyPI
# (`bash benchmarks/gpu_check_wheels.sh`): they are installed under /tmp for this run only.
# The training part reads the default pipeline's outputs: data/latents, data/text,
# artifacts/tokenizer, artifacts/vae and artifacts/judge (`dvc repro latents judge` makes them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
set -a
# shellcheck disable=SC1091
source transfusion/defaults.env
set +a
export PYTHONUNBUFFERED=1
mkdir -p "$out"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
timeout 470 "$py" benchmarks/gpu_check.py --out "$out" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
