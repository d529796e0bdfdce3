#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels gpu_session.sh installs on a GPU machine that cannot reach PyPI:
# Python 3.12 on x86-64, where torch, transformers, matplotlib, nvidia-ml-py, numpy, pyyaml, psutil, ninja,
# einops, msgpack, py-cpuinfo and tqdm are already installed (typing-extensions and packaging are carried
# too: pydantic needs typing-extensions >= 4.16, megatron-core packaging >= 24.2). Run it where pip works:
#   bash scripts/prepare_gpu_wheels.sh
# Versions are the ones opt_ds is tested with (setup.cfg).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl \
    megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 packaging==26.3 hjson==3.1.0
# DeepSpeed publishes a source archive only; without DS_BUILD_OPS it builds a pure-Python wheel (its CUDA
# ops would compile at first use, and opt_ds uses none of them: torch's fused AdamW, no DeepSpeed kernels).
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
