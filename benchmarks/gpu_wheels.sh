#!/usr/bin/env bash
# Wheels for a GPU machine without network whose Python already has torch, triton, transformers,
# sentencepiece, safetensors, pybind11 and numpy (the lent H100/H200 image: Python 3.12), into .whl/:
# DeepSpeed (built here from its sdist: PyPI has no wheel), its pydantic/hjson needs, and Liger-Kernel,
# the peer of benchmarks/linear_cross_entropy.py.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12; run where pip reaches PyPI)
#
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 setup.py build_ext --inplace -j 16 && bash benchmarks/gpu_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Versions as tested on an H100 on 2026-11-23; pydantic pins its pydantic-core exactly.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${platforms[@]}" -d .whl liger-kernel==0.8.5 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# DeepSpeed's wheel is pure Python (no ops prebuilt); its setup.py imports torch, hence no isolation.
sdist=$(mktemp -d)
$PY -m pip download -q --no-deps --no-binary=:all: -d "$sdist" deepspeed==0.19.8
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$sdist"/deepspeed-*.tar.gz
rm -rf "$sdist"
ls -1 .whl
