#!/usr/bin/env bash
# Runs one oracle script with the oracle venv's Python. A missing venv is a failure, not a skip.
set -euo pipefail
src="${QTUNE_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
venv="${QTUNE_ORACLE_VENV:-$src/.venv-oracle}"
if [ ! -x "$venv/bin/python" ]; then
  echo "oracle: FAILED: no Python venv at $venv (run scripts/bootstrap.sh to create it)" >&2
  exit 1
fi
# The venv's torch runs on the CPU only; never let it look for a GPU.
# torch.compile is off: bitsandbytes compiles its CPU dequantization per shape, which without
# triton means minutes of C++ compilation to compute what the eager code computes.
# Offline and quiet: nothing may reach the Hugging Face Hub, and no progress bars in the logs.
export CUDA_VISIBLE_DEVICES="" TORCHDYNAMO_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$(dirname "$0")"
exec "$venv/bin/python" "$@"
