#!/usr/bin/env bash
# Sets up a fresh machine, builds, and runs the default recipe (configs/default.yaml): LoRA
# fine-tune of the shared stories260K model on tinyshakespeare. Extra arguments go to trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/build.sh
exec "${QTUNE_BUILD_DIR:-build}/bin/trainer" "$@"
