#!/usr/bin/env bash
# Wheels of the lock's pure-Python packages a bare GPU machine may lack (its image has torch,
# numpy, pyyaml, pytest, safetensors, tokenizers, huggingface_hub, pyarrow; not pydantic,
# diffusers, or the locked transformers), into .whl/ (git-ignored), for benchmarks/gpu_check.sh.
#   bash benchmarks/gpu_check_wheels.sh [PYTHON_VERSION]      (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
names=(diffusers pydantic pydantic_core annotated-types typing-inspection importlib_metadata transformers)
pins=()
for n in "${names[@]}"; do
  pin=$(grep -i -E "^${n//[-_]/[-_]}==" requirements.lock) || { echo "error: requirements.lock pins no $n" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
