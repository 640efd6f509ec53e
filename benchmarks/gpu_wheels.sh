#!/usr/bin/env bash
# What the GPU machine's image lacks for benchmarks/gpu_check.py, fetched here (PyPI is reachable here,
# nothing is there) into .whl/ (git-ignored, ~5 MB), to travel with the device call (carry: .whl):
#   pydantic and its helpers (viq imports pydantic); hjson and a DeepSpeed wheel built here without
#   compiled ops, for train_check's ZeRO-1 run (DeepSpeed publishes sources only). diffusers is not
#   needed: gpu_check draws nothing. On the device, before the check:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# PYTHON (default: python3) must have torch and setuptools: building the DeepSpeed wheel imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"/deepspeed-0.19.8.tar.gz
ls -l .whl
