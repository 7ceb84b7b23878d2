#!/usr/bin/env bash
# Sets up a fresh machine, builds, and runs the whole test suite (CTest). Extra arguments go to
# ctest, e.g. scripts/test.sh -R nf4.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/build.sh
BUILD_DIR="${QTUNE_BUILD_DIR:-build}"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 "$@"
