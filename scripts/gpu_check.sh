#!/usr/bin/env bash
# The engine on a CUDA machine, in one command (under 10 minutes): losslessness on the device, the
# toy pair's AR/SD/PSD sweep with the drafter inline on its own CUDA stream, and forward costs of
# 1B/68M Llama shapes (random weights) fed to `minedraft simulate`. Writes docs/gpu.md.
#
#   bash scripts/gpu_check.sh             # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run   # the same code on the CPU at toy sizes (the tests run this)
#
# Needs python3 with PyTorch (CUDA build) and transformers; no tritonserver, no network. Its inputs
# are this checkout and the toy pair in model_repository/minedraft/1 (15 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/backend${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import torch, transformers" 2>/dev/null; then
    echo "gpu_check: python3 needs torch and transformers (pip install torch transformers)" >&2
    exit 2
fi
exec python3 -m minedraft.tools.gpu_check "$@"
