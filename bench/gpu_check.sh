#!/usr/bin/env bash
# GPU check for leanformers (parity CPU vs CUDA, eager vs compiled; ~1B decode benchmark; fine-tuning loop
# in fp32, bf16-mixed, fp16-mixed and bf16-true). < 5 minutes.
#
#   bash bench/gpu_check.sh            # from the repo root on a CUDA machine; JSON -> $OUT/gpu_check.json
#   bash bench/gpu_check.sh --no-quant # extra arguments go to bench/gpu_check.py (see --help)
#
# Needs: python3 with torch >= 2.5 built with CUDA, Triton (bundled with CUDA torch wheels) and numpy.
# Nothing is downloaded: the models are random-weight configs built in memory. leanformers is used from
# src/ (no install needed); its other dependencies (tokenizers, gguf, ...) are not imported here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: needs torch with CUDA and a visible GPU:" >&2
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" >&2 \
        || echo "gpu_check: torch is not importable; pip install torch (a CUDA build, >= 2.5)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 290 "$PY" bench/gpu_check.py "$@"
