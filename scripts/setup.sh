#!/usr/bin/env bash
# Create .venv in the repository root and install everything pg_train needs.
# Idempotent: a second run with unchanged requirements.txt, setup.sh and pyproject.toml (its console
# scripts) does nothing but verify.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
STAMP="$VENV/.pg_train-setup-$(sha256sum requirements.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ]; then
  echo "[setup] .venv is up to date ($(basename "$STAMP"))"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip

# torch first: pip serves these two from local disk; any other install order may pull a
# multi-GB CUDA build through a dependency's unpinned 'torch'.
TORCH_PIN=$(grep -E '^torch==' requirements.txt)
TV_PIN=$(grep -E '^torchvision==' requirements.txt)
echo "[setup] installing $TORCH_PIN $TV_PIN"
"$PIP" install -q "$TORCH_PIN" "$TV_PIN"

echo "[setup] installing requirements.txt"
"$PIP" install -q -r requirements.txt

# sam2 declares torch as a build requirement: an isolated build would install a second torch.
echo "[setup] installing sam2 (no build isolation, no CUDA extension)"
SAM2_BUILD_CUDA=0 "$PIP" install -q --no-build-isolation sam2==1.1.0

# The real Qwen BPE ranks (qwen.tiktoken) for the tests' real-vocabulary tokenizer; only the
# data file is read, so none of the SDK's dependencies are installed.
echo "[setup] installing dashscope (no dependencies: its qwen.tiktoken file only)"
"$PIP" install -q --no-deps dashscope==2.0.2

echo "[setup] installing pg_train (editable)"
"$PIP" install -q --no-deps --no-build-isolation -e .

# DeepSpeed JIT-compiles its CPU ops on first use (30-70 s); build them once into the venv.
echo "[setup] warming DeepSpeed CPU ops into $VENV/torch_extensions"
TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" DS_ACCELERATOR=cpu PATH="$VENV/bin:$PATH" \
  "$VENV/bin/python" - <<'PY'
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    get_accelerator().create_op_builder(name).load(verbose=False)
    print(f"[setup]   {name} ready")
PY

touch "$STAMP"
echo "[setup] done"
