#!/usr/bin/env bash
# Run on the development machine (with .venv set up): put into .whl/ the wheels the GPU image
# lacks (Python 3.12 there). The device scripts install them with --no-deps into /tmp/site.
# `.whl/` is git-ignored and carried by the device call (`carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=".venv/bin/python -m pip"
mkdir -p .whl
PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PIP download -q --no-deps --only-binary=:all: $PLAT --platform any -d .whl transformers==5.24.0 peft==0.21.2 hydra-core==1.3.8 omegaconf==2.3.1
$PIP download -q --no-deps --only-binary=:all: $PLAT -d .whl regex==2026.11.19
$PIP wheel -q --no-deps --no-build-isolation -w .whl antlr4-python3-runtime==4.9.3 iopath==0.1.10
SAM2_BUILD_CUDA=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0
ls -la .whl
