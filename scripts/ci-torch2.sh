#!/usr/bin/env bash
# The LibTorch 2.x step of CI (.ci/run runs it last): builds build-torch2/ against PyPI's torch
# wheel in the oracle venv (LibTorch 2.x with CUDA and NCCL), configured as the README shows,
# then runs the suites that differ most between 1.13 and 2.x on the CPU: the core unit
# suites (the allocator override, scaled_dot_product_attention, the model families) and the
# data-parallel suites (c10d moved Work and added Backend in 2.x; the NCCL build's refusals).
# Only what those suites need is built: the library, the plugins, trainer, qtune-convert and the
# sentencepiece module.
#
# Budget: QTUNE_TORCH2_BUDGET_S (default 900 s) for the build and the suites together. When
# QTUNE_CI_DEADLINE (seconds since the epoch, set by .ci/run) leaves less than that, the step is
# skipped; a build or suite still running when the budget ends is stopped. Either way the step
# says so in a line starting "ci-torch2: INCOMPLETE" and does not fail CI (a fixed time budget,
# like fuzzing's); a compile error or a failing test does.
# Usage: scripts/ci-torch2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
BUILD_DIR="${QTUNE_TORCH2_BUILD_DIR:-build-torch2}"
BUDGET="${QTUNE_TORCH2_BUDGET_S:-900}"
venv="${QTUNE_ORACLE_VENV:-$root/.venv-oracle}"

if [ -n "${QTUNE_CI_DEADLINE:-}" ]; then
  left=$((QTUNE_CI_DEADLINE - $(date +%s)))
  if ((left < BUDGET)); then
    echo "ci-torch2: INCOMPLETE: skipped, ${left} s left before the CI deadline, the step's budget is ${BUDGET} s"
    exit 0
  fi
fi

T=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null) || {
  echo "ci-torch2: no torch in $venv (scripts/bootstrap.sh installs it from tests/oracle/requirements.txt)" >&2
  exit 1
}
N="$T/../nvidia"  # the wheel's NCCL/CUDA libraries, which libtorch_cuda.so links

export CCACHE_BASEDIR="$root"
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"

start=$SECONDS
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$T;$T/share/cmake" \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$N/nccl/lib:$N/cu13/lib:$N/cudnn/lib:$N/cusparselt/lib:$N/nvshmem/lib"
fi
targets=(qtune_core qtune_sentencepiece qtune_nf4 qtune_hqq qtune_int8 qtune_lora qtune_dora
         trainer qtune-convert qtune-quantize qtune_core_tests qtune_dist_tests qtune_dist_e2e_tests)
# Runs "$@" for at most $1 seconds; past that, says so and ends the step without failing it.
within() {
  local limit=$1 rc=0
  shift
  timeout "$limit" "$@" || rc=$?
  if ((rc == 124)); then
    echo "ci-torch2: INCOMPLETE: '$*' ran past the step's budget of ${BUDGET} s"
    exit 0
  fi
  return "$rc"
}
within "$BUDGET" cmake --build "$BUILD_DIR" -j "$(nproc)" --target "${targets[@]}"
echo "ci-torch2: build ${BUILD_DIR} ($("$venv/bin/python" -c 'import torch; print(torch.__version__)')) took $((SECONDS - start)) s"

suites=$SECONDS
left=$((BUDGET - (SECONDS - start)))
((left > 0)) || left=1  # (timeout 0 would mean no limit)
# The GoogleTest suites (tests named <Suite>.*) of the executables built above.
within "$left" ctest --test-dir "$BUILD_DIR" --output-on-failure \
  -j "$(nproc)" --timeout 600 -R '^[A-Za-z0-9]+\.\*$'
echo "ci-torch2: suites against LibTorch 2.x took $((SECONDS - suites)) s"
