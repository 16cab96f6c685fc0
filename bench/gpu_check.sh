#!/usr/bin/env bash
# One prepared GPU check for the train engine (finishes in well under 5 minutes on one H100):
# resnet18 at 224 px, bf16 autocast + channels_last, images/s from in-memory tensors vs through
# the real uint8 cache + albumentations DataLoader path (target >= 0.9x), plus the GPU
# utilisation nvidia-smi reports during each variant. Figures go to bench/RESULTS.md by hand.
#
#   bash bench/gpu_check.sh                 # figures printed and saved to $OUT or bench/results
#   GPU_CHECK_COMPILE=1 bash bench/gpu_check.sh   # also time torch.compile (adds ~1 min)
#
# Needs a CUDA build of torch and this project importable: installed (`pip install -e .`), or
# not, in which case the checkout's src/ is put on PYTHONPATH (its dependencies must then be
# importable already). PYTHON=/path/to/python overrides the interpreter; GPU_CHECK_TIMEOUT (s,
# default 240) bounds the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
# albumentations would otherwise ask PyPI for a newer version at import (no network on GPU boxes)
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
if ! "$PY" -c "import imgcls" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # not installed: this checkout's src
fi
# Everything the benchmark imports through imgcls (pydantic, albumentations, timm, sklearn, ...).
if ! err=$("$PY" -c "import imgcls.training.trainer, imgcls.data.augment, imgcls.models" 2>&1); then
  echo "gpu_check: imgcls or one of its dependencies does not import with $PY:" >&2
  echo "$err" | tail -3 >&2
  echo "gpu_check: run \`$PY -m pip install -e .\` (or install the missing package) first" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# DataLoader workers hand batches over in /dev/shm: a small one there stalls the augment path.
df -h /dev/shm 2>/dev/null | tail -1 || true

extra=()
[[ "${GPU_CHECK_COMPILE:-0}" == "1" ]] && extra+=(--compile)
# The timeout keeps a stuck run inside the 5-minute budget (JPEGs + cache go to $TMPDIR); its
# SIGTERM makes the benchmark print every thread's stack, and the figures so far are saved.
timeout -k 15 "${GPU_CHECK_TIMEOUT:-240}" "$PY" bench/bench_train_gpu.py --device cuda --model resnet18 --size 224 \
  --images 8192 --batch 256 --epochs 4 --precision bf16 \
  --out "$OUT_DIR/gpu_check.json" --md "$OUT_DIR/gpu_check.md" "${extra[@]}" "$@"
