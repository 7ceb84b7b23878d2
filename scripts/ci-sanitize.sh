#!/usr/bin/env bash
# The sanitizer + fuzz step of CI (.ci/run runs it after scripts/test.sh; docs/fuzzing.md):
#   1. builds build-asan/ with clang-14, -fsanitize=address,undefined and libFuzzer coverage
#      (QTUNE_SANITIZE=ON QTUNE_FUZZ=ON), only what steps 2 and 3 run;
#   2. runs the unit and end-to-end suites under the sanitizers (CTest: everything but the
#      oracle, sdk, conformance and dist labels, and qtune-bench's e2e tests);
#   3. runs each libFuzzer target for QTUNE_FUZZ_SECONDS (default 12) from a corpus of the seeds
#      and regression inputs in tests/fuzz/ plus small valid files made from ../shared/data.
# Any sanitizer report, test failure or fuzz finding fails the step; a finding's input is kept in
# build-asan/fuzz/findings/ (add it to tests/fuzz/regressions/<target>/ once fixed).
# Usage: scripts/ci-sanitize.sh [--fuzz-only] [--no-fuzz] [target ...]   (targets: fuzz only)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
BUILD_DIR="${QTUNE_ASAN_BUILD_DIR:-build-asan}"
FUZZ_SECONDS="${QTUNE_FUZZ_SECONDS:-12}"
DATA="${QTUNE_DATA:-$root/../shared/data}"
run_suites=1 run_fuzz=1
targets=()
for a in "$@"; do
  case "$a" in
    --fuzz-only) run_suites=0 ;;
    --no-fuzz) run_fuzz=0 ;;
    *) targets+=("$a") ;;
  esac
done

export CCACHE_BASEDIR="$root"
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
# The same options CTest gives each test (cmake/QtuneSanitize.cmake), also for what runs outside
# CTest: gtest's test discovery at build time, the fuzz executables.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_odr_violation=0:detect_stack_use_after_return=0:alloc_dealloc_mismatch=0"
export LSAN_OPTIONS="suppressions=$root/tests/fuzz/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$root/tests/fuzz/ubsan.supp"

start=$SECONDS
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  CC=clang-14 CXX=clang++-14 cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DQTUNE_SANITIZE=ON -DQTUNE_FUZZ=ON
fi
# QTUNE_SANITIZE_SUITES: which suites run under the sanitizers. "unit": the core, tokenizer and
# fuzz-regression suites (and the two apps the tokenizer suite runs) and the robustness table;
# "e2e" (CI's default) adds the plugin unit suites and the end-to-end suites (and what they run:
# the apps and plugins). QTUNE_SANITIZE_SUITES=unit leaves the e2e suites out.
suites="${QTUNE_SANITIZE_SUITES:-unit e2e}"
build_targets=(qtune_fuzz)
if ((run_suites)); then
  # (The tokenizer suite runs qtune-convert and qtune-tokenize; the core suite builds models
  # with the plugins, which a fresh build folder does not have yet.)
  build_targets+=(qtune_core_tests qtune_tokenizer_tests qtune_fuzz_regression_tests
                  qtune-convert qtune-tokenize qtune_nf4 qtune_hqq qtune_int8 qtune_lora qtune_dora
                  trainer qtune-export qtune-quantize qtune-generate qtune_robustness_tests)
  if [[ " $suites " == *" e2e "* ]]; then
    build_targets+=(qtune_e2e_tests)
    for t in nf4 hqq int8 lora dora; do
      [ -d "tests/plugins/$t" ] && build_targets+=("qtune_${t}_tests")
    done
  fi
fi
cmake --build "$BUILD_DIR" -j "$(nproc)" --target "${build_targets[@]}"
echo "ci-sanitize: build ${BUILD_DIR} took $((SECONDS - start)) s"

if ((run_suites)); then
  start=$SECONDS
  # Every test of the executables built above: the oracle, sdk, conformance and dist labels are
  # the normal suite's; qtune-bench is not built here (a benchmark, not a parser of user input),
  # so its e2e tests (Bench.*) are left out; *_NOT_BUILT are the suites not selected.
  exclude='(^Bench\.|_NOT_BUILT)'
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 \
    -LE '^(oracle|sdk|conformance|dist|e2e)$' -E "$exclude"
  # The robustness table end to end (every program on ~200 bad inputs and faults; ~4 min here).
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 -R '^Robustness\.'
  if [[ " $suites " == *" e2e "* ]]; then
    ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 \
      -L '^e2e$' -LE '^dist$' -E "(^Robustness\.|$exclude)"
  fi
  echo "ci-sanitize: suites ($suites) under ASan/UBSan took $((SECONDS - start)) s"
fi

if ((run_fuzz)); then
  start=$SECONDS
  fuzz="$BUILD_DIR/fuzz"
  rm -rf "$fuzz/corpus"
  mkdir -p "$fuzz/corpus" "$fuzz/findings"
  # Small valid files from ../shared/data (never copied into git).
  seed() {  # seed <target> <name> : stdin -> corpus file
    mkdir -p "$fuzz/corpus/$1"
    cat >"$fuzz/corpus/$1/$2"
  }
  [ -d "$DATA" ] || { echo "ci-sanitize: $DATA is missing (set QTUNE_DATA)" >&2; exit 1; }
  seed tokenizer_bin tok512.bin <"$DATA/tok512.bin"
  { printf '\000'; head -c 3000 "$DATA/tinyshakespeare.txt"; } | seed data shakespeare.txt
  { printf '\001'; python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))[:3]))' \
      "$DATA/alpaca_sample102.json"; } | seed data alpaca3.json
  { printf '\002'; head -n 3 "$DATA/self_instruct_seed_tasks.jsonl"; } | seed data self_instruct.jsonl
  for f in configs/*.yaml; do seed recipe "$(basename "$f")" <"$f"; done
  all=()
  # The fuzz executables only: bin/qtune_fuzz_regression_tests is the GoogleTest replay suite.
  for exe in "$BUILD_DIR"/bin/qtune_fuzz_*; do
    [[ "$exe" == */qtune_fuzz_regression_tests ]] || all+=("${exe##*/qtune_fuzz_}")
  done
  ((${#targets[@]})) || targets=("${all[@]}")
  failed=()
  for t in "${targets[@]}"; do
    mkdir -p "$fuzz/corpus/$t"
    for kind in seeds regressions; do
      [ -d "tests/fuzz/$kind/$t" ] && cp "tests/fuzz/$kind/$t"/* "$fuzz/corpus/$t/" 2>/dev/null || true
    done
    echo "ci-sanitize: fuzzing $t for ${FUZZ_SECONDS} s"
    if ! "$BUILD_DIR/bin/qtune_fuzz_$t" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 \
        -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$fuzz/findings/$t-" "$fuzz/corpus/$t" >"$fuzz/$t.log" 2>&1; then
      failed+=("$t")
      tail -n 60 "$fuzz/$t.log"
    else
      grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$fuzz/$t.log" | tail -n 2 || true
    fi
  done
  echo "ci-sanitize: fuzz step took $((SECONDS - start)) s"
  if ((${#failed[@]})); then
    echo "ci-sanitize: fuzz findings in: ${failed[*]} (inputs in $fuzz/findings/)" >&2
    exit 1
  fi
fi
