#!/usr/bin/env bash
# The plugin SDK end to end, as a plugin author meets it (CTest: sdk_out_of_tree, label "sdk"):
#   1. install   `cmake --install` this build into <work>/prefix; check the installed layout
#   2. build     configure + build examples/quant-plugin against that prefix only
#                (find_package(qtune) + qtune_add_plugin), with no build type given: the
#                package must make it RelWithDebInfo; hidden visibility
#   3. list      the *installed* trainer --list-plugins --plugin_dir <example build> lists it,
#                and finds the SDK's own plugins in <prefix>/lib/qtune/plugins
#   4. conform   the conformance suite, unchanged (the installed qtune_conformance), finds it
#                through QTUNE_PLUGIN_PATH and passes
#   5. train     the installed trainer runs one qlora step with --quant int4 on stories260K and
#                writes summary.json saying so
#   6. install-plugin  `cmake --install` of the example puts it in <prefix>/lib/qtune/plugins,
#                where the installed trainer finds it with no --plugin_dir
#   7. torch-mismatch  find_package(qtune) with another LibTorch fails at configure time, naming
#                both versions (a stand-in TorchConfig.cmake claiming 9.9.9; nothing compiled)
#   8. tokenizer the installed trainer loads a sentencepiece .model through the module installed
#                beside libqtune_core
#   9. skeleton  the skeleton plugin and CMakeLists.txt of docs/writing-a-plugin.md, extracted
#                from the page, build against the prefix and pass the installed conformance suite
#  10. docs      the quick-start block of docs/writing-a-plugin.md runs as written (with the
#                prefix for $HOME/qtune, from a folder laid out like the source tree); its
#                qtune build lines must be exactly what step 1 stands for
# Prints one line per step and "sdk: N passed, M failed"; exits non-zero on any failure. A step
# whose prerequisite failed counts as failed. Everything it writes is under --work-dir.
set -uo pipefail

usage() {
  echo "usage: $0 --build-dir DIR --source-dir DIR --work-dir DIR [--cmake CMAKE] [--generator G]" \
       "[--torch-dir DIR] [--prefix-path PATHS] [--launcher CCACHE] [--build-type TYPE]" >&2
  exit 2
}
cmake_bin=cmake generator=Ninja torch_dir="" prefix_path="" launcher="" build_type=RelWithDebInfo
build_dir="" source_dir="" work=""
while (($#)); do
  case "$1" in
    --cmake) cmake_bin=$2 ;;
    --generator) generator=$2 ;;
    --build-dir) build_dir=$2 ;;
    --source-dir) source_dir=$2 ;;
    --work-dir) work=$2 ;;
    --torch-dir) torch_dir=$2 ;;
    --prefix-path) prefix_path=$2 ;;
    --launcher) launcher=$2 ;;
    --build-type) build_type=$2 ;;
    *) usage ;;
  esac
  shift 2 || usage
done
[[ -n "$build_dir" && -n "$source_dir" && -n "$work" ]] || usage
data="${QTUNE_DATA:-${QTUNE_DEFAULT_DATA:-$source_dir/../shared/data}}"

prefix="$work/prefix"
example_src="$source_dir/examples/quant-plugin"
doc="$source_dir/docs/writing-a-plugin.md"
docs_dir="$work/docs"                    # the quick start's working directory
example_build="$docs_dir/build-int4"     # the quick start's example build (step 2 makes it)
plugin="$example_build/libqtune_int4.so"
run_dir="$work/run"
log="$work/log"
passed=0 failed=0
declare -A ok

step() {  # step NAME DESCRIPTION FUNCTION [PREREQUISITE...]
  local name=$1 what=$2 fn=$3
  shift 3
  for pre in "$@"; do
    if [[ "${ok[$pre]:-0}" != 1 ]]; then
      echo "sdk: FAIL $name ($what): skipped, '$pre' failed"
      failed=$((failed + 1))
      return
    fi
  done
  local t0=$SECONDS
  if "$fn" >"$log/$name.log" 2>&1; then
    echo "sdk: ok   $name ($what) $((SECONDS - t0)) s"
    ok[$name]=1
    passed=$((passed + 1))
  else
    echo "sdk: FAIL $name ($what) after $((SECONDS - t0)) s; last lines of $log/$name.log:"
    tail -n 40 "$log/$name.log" | sed 's/^/    /'
    failed=$((failed + 1))
  fi
}

expect_file() {
  [[ -e "$1" ]] || { echo "missing: $1"; return 1; }
}

# ---- 1. install ---------------------------------------------------------------------------------
do_install() {
  "$cmake_bin" --install "$build_dir" --prefix "$prefix" || return 1
  local f
  for f in include/qtune/plugin.h include/qtune/quantized_weight.h include/qtune/registry.h \
           include/qtune/options.h include/qtune/tensor_state.h include/qtune/error.h \
           include/qtune/export.h include/qtune/adapter.h \
           lib/libqtune_core.so lib/qtune/plugins/libqtune_nf4.so \
           lib/qtune/plugins/libqtune_hqq.so lib/qtune/plugins/libqtune_int8.so \
           lib/qtune/plugins/libqtune_lora.so bin/trainer bin/qtune_conformance \
           lib/cmake/qtune/qtuneConfig.cmake lib/cmake/qtune/qtuneConfigVersion.cmake \
           lib/cmake/qtune/qtuneTargets.cmake lib/cmake/qtune/QtunePlugin.cmake \
           lib/cmake/qtune/QtuneDeps.cmake; do
    expect_file "$prefix/$f" || return 1
  done
  # The tokenizer dlopen()s the sentencepiece module from libqtune_core's folder (when the build
  # has one).
  if [[ -e "$build_dir/lib/libqtune_sentencepiece.so" ]]; then
    expect_file "$prefix/lib/libqtune_sentencepiece.so" || return 1
  fi
  # Installed programs find the installed core through $ORIGIN, not the build tree.
  local deps
  deps=$(ldd "$prefix/bin/trainer") || return 1
  grep -F "libqtune_core" <<<"$deps"
  grep -qF "$prefix/bin/../lib/libqtune_core.so" <<<"$deps" || {
    echo "installed trainer does not resolve libqtune_core in $prefix/lib"
    return 1
  }
}

# ---- 2. build the example against the installed SDK ---------------------------------------------
do_build() {
  # The source through the quick start's folder (step 10), as the docs name it: the same compile
  # lines there, so step 10's reconfigure of this build compiles nothing again.
  mkdir -p "$docs_dir" && ln -sfn "$source_dir/examples" "$docs_dir/examples" || return 1
  # No CMAKE_BUILD_TYPE, as in the docs: the package must default it to an optimised build.
  local args=(-S "$docs_dir/examples/quant-plugin" -B "$example_build" -G "$generator"
              -DCMAKE_PREFIX_PATH="$prefix${prefix_path:+;$prefix_path}")
  [[ -n "$torch_dir" ]] && args+=(-DTorch_DIR="$torch_dir")
  [[ -n "$launcher" ]] && args+=(-DCMAKE_CXX_COMPILER_LAUNCHER="$launcher")
  # Cache hits across runs need the same paths; the work dir is fixed, so only BASEDIR matters.
  export CCACHE_BASEDIR="$work" CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-time_macros,include_file_mtime,include_file_ctime}"
  "$cmake_bin" "${args[@]}" || return 1
  grep -E "^qtune_DIR:PATH=$prefix/lib/cmake/qtune\$" "$example_build/CMakeCache.txt" || {
    echo "the example found qtune elsewhere: $(grep '^qtune_DIR' "$example_build/CMakeCache.txt")"
    return 1
  }
  grep -E "^CMAKE_BUILD_TYPE:STRING=RelWithDebInfo\$" "$example_build/CMakeCache.txt" || {
    echo "without a build type the plugin is not built optimised: $(grep '^CMAKE_BUILD_TYPE' \
      "$example_build/CMakeCache.txt")"
    return 1
  }
  echo "building $example_build"
  "$cmake_bin" --build "$example_build" || { echo "the build failed"; return 1; }
  expect_file "$plugin" || return 1
  # Hidden visibility: the plugin exports its two entry points and none of its own classes.
  local symbols
  symbols=$(nm -DC --defined-only "$plugin") || return 1
  if grep "int4_example" <<<"$symbols"; then echo "the plugin exports its own classes"; return 1; fi
  grep -q " qtune_plugin_info$" <<<"$symbols" || { echo "no qtune_plugin_info"; return 1; }
  grep -q " qtune_plugin_factory$" <<<"$symbols" || { echo "no qtune_plugin_factory"; return 1; }
}

# ---- 3. the installed trainer lists it -----------------------------------------------------------
do_list() {
  local out
  out=$("$prefix/bin/trainer" --list-plugins --plugin_dir "$example_build") || return 1
  echo "$out"
  grep -qE "^quant +int4 +1\.0\.0 +$plugin\$" <<<"$out" || { echo "int4 not listed"; return 1; }
  local p
  for p in nf4 hqq int8 lora; do
    grep -q " $prefix/lib/qtune/plugins/libqtune_$p.so\$" <<<"$out" || {
      echo "the installed trainer did not find $p in $prefix/lib/qtune/plugins"
      return 1
    }
  done
  if grep -q "^failed" <<<"$out"; then return 1; fi
}

# ---- 4. the conformance suite, unchanged -------------------------------------------------------
# conform PLUGIN_FOLDER NAME: the installed suite passes plugin NAME, found through
# QTUNE_PLUGIN_PATH, with every test run for at least its default options and nothing skipped.
conform() {
  local out
  out=$(QTUNE_PLUGIN_PATH="$1" "$prefix/bin/qtune_conformance" \
          --gtest_filter="*/$2_*:ConformanceDiscovery.*" 2>&1)
  local rc=$?
  echo "$out"
  ((rc == 0)) || return 1
  grep -q "Conformance.GaussianRoundTripWithinDeclaredBound/$2_default" <<<"$out" || return 1
  grep -qE "^\[  PASSED  \] [1-9][0-9]* tests" <<<"$out" || return 1
  if grep -q "^\[  SKIPPED \]" <<<"$out"; then echo "some $2 cases were skipped"; return 1; fi
}

do_conform() { conform "$example_build" int4; }

# ---- 5. one qlora step with the installed trainer -----------------------------------------------
do_train() {
  rm -rf "$run_dir"
  (cd "$work" && QTUNE_DATA="$data" "$prefix/bin/trainer" --train_type qlora --quant int4 \
     --plugin_dir "$example_build" --model stories260K.bin --tokenizer tok512.bin \
     --data tinyshakespeare.txt --max_steps 1 --batch_size 2 --seq_len 32 --threads 1 \
     eval.max_batches=1 --output_dir "$run_dir") || return 1
  expect_file "$run_dir/summary.json" || return 1
  cat "$run_dir/summary.json"
  grep -qE '"quant": *"int4"' "$run_dir/summary.json" || return 1
  grep -qE '"train_type": *"qlora"' "$run_dir/summary.json" || return 1
  grep -qE '"steps": *1[,}]?' "$run_dir/summary.json" || return 1
}

# ---- 6. install the plugin into the SDK's plugin folder -----------------------------------------
do_install_plugin() {
  "$cmake_bin" --install "$example_build" || return 1
  expect_file "$prefix/lib/qtune/plugins/libqtune_int4.so" || return 1
  local out
  out=$(cd "$work" && "$prefix/bin/trainer" --list-plugins) || return 1
  echo "$out"
  grep -qE "^quant +int4 +1\.0\.0 +$prefix/lib/qtune/plugins/libqtune_int4.so\$" <<<"$out" || {
    echo "the installed trainer did not find int4 in its plugin folder"
    return 1
  }
}

# ---- 7. another LibTorch is refused when configuring -------------------------------------------
do_torch_mismatch() {
  local fake="$work/fake-torch" fake_build="$work/mismatch-build"
  mkdir -p "$fake" || return 1
  printf '%s\n' 'set(PACKAGE_VERSION "9.9.9")' 'set(PACKAGE_VERSION_COMPATIBLE TRUE)' \
    >"$fake/TorchConfigVersion.cmake"
  # A stand-in for another LibTorch: only what find_package(Torch) users read.
  printf '%s\n' 'set(TORCH_LIBRARIES "")' 'set(TORCH_INCLUDE_DIRS "")' 'set(TORCH_CXX_FLAGS "")' \
    'set(Torch_FOUND TRUE)' >"$fake/TorchConfig.cmake"
  local out
  if out=$("$cmake_bin" -S "$example_src" -B "$fake_build" -G "$generator" \
             -DCMAKE_PREFIX_PATH="$prefix${prefix_path:+;$prefix_path}" -DTorch_DIR="$fake" 2>&1); then
    echo "$out"
    echo "configuring against LibTorch 9.9.9 succeeded"
    return 1
  fi
  echo "$out"
  # CMake wraps long messages: compare with the line breaks removed.
  local flat
  flat=$(tr -s ' \n' ' ' <<<"$out")
  grep -q "was built against LibTorch [0-9]" <<<"$flat" || return 1
  grep -q "found LibTorch 9.9.9" <<<"$flat" || return 1
}

# ---- 8. the installed tokenizer module ---------------------------------------------------------
# The installed trainer reads a sentencepiece .model through libqtune_sentencepiece.so beside the
# installed libqtune_core. The Llama 2 tokenizer does not fit stories260K, so the run stops with
# a vocabulary error, which it can only report after loading the .model (32000 pieces).
do_tokenizer() {
  if [[ ! -e "$build_dir/lib/libqtune_sentencepiece.so" ]]; then
    echo "this build has no sentencepiece module; nothing to check"
    return 0
  fi
  local out
  out=$(cd "$work" && QTUNE_DATA="$data" "$prefix/bin/trainer" --train_type lora \
          --model stories260K.bin --tokenizer llama2_tokenizer.model --max_steps 1 \
          --output_dir "$work/run-spm" 2>&1)
  echo "$out"
  grep -q "llama2_tokenizer.model has 32000 tokens but the model's vocabulary is 512" <<<"$out"
}

# ---- 9./10. the docs' own code and commands -----------------------------------------------------
# The fenced block after "<!-- sdk-test: NAME -->" in the docs page.
doc_block() {
  awk -v tag="<!-- sdk-test: $1 -->" '
    $0 == tag { found = 1; next }
    found == 1 && /^```/ { found = 2; next }
    found == 2 && /^```/ { exit }
    found == 2 { print }' "$doc"
}

# Environment for building out of tree the way a reader would (cmake picks these up), plus what
# this build needs that a reader's system has in its default places.
doc_env() {
  local extra="$prefix_path"
  [[ -n "$torch_dir" ]] && extra="${extra:+$extra:}$(cd "$torch_dir/../../.." && pwd)"
  export CMAKE_PREFIX_PATH="${extra//;/:}"
  [[ -n "$launcher" ]] && export CMAKE_CXX_COMPILER_LAUNCHER="$launcher"
  export CCACHE_BASEDIR="$work" QTUNE_DATA="$data"
}

do_skeleton() {
  local dir="$work/skeleton"
  rm -rf "$dir" && mkdir -p "$dir" || return 1
  doc_block skeleton.cpp >"$dir/my8.cpp"
  doc_block CMakeLists.txt >"$dir/CMakeLists.txt"
  wc -l "$dir/my8.cpp" "$dir/CMakeLists.txt"
  [[ -s "$dir/my8.cpp" && -s "$dir/CMakeLists.txt" ]] || { echo "no skeleton in $doc"; return 1; }
  (doc_env && cd "$dir" &&
     "$cmake_bin" -S . -B build-my8 -G "$generator" -DCMAKE_PREFIX_PATH="$prefix" &&
     "$cmake_bin" --build build-my8) || return 1
  conform "$dir/build-my8" my8
}

do_docs() {
  local block
  block=$(doc_block quick-start) || return 1
  echo "$block"
  # The lines that build and install qtune itself are step 1 (already done into the prefix).
  local qtune_build=$'cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo\ncmake --build build\ncmake --install build --prefix $HOME/qtune'
  grep -qxF -- "$(sed -n 1p <<<"$qtune_build")" <<<"$block" &&
    grep -qxF -- "cmake --build build" <<<"$block" &&
    grep -qxF -- "cmake --install build --prefix \$HOME/qtune" <<<"$block" || {
    echo "the quick start no longer builds qtune as step 1 does"
    return 1
  }
  local script
  script=$(grep -vxF -f <(printf '%s\n' "$qtune_build") <<<"$block" | sed "s|\$HOME/qtune|$prefix|g")
  mkdir -p "$docs_dir" || return 1
  ln -sfn "$source_dir/examples" "$docs_dir/examples"
  ln -sfn "$source_dir/configs" "$docs_dir/configs"
  rm -rf "$docs_dir/runs" "$docs_dir/bench-int4"
  (doc_env && cd "$docs_dir" && bash -euxo pipefail -c "$script") || return 1
  expect_file "$docs_dir/runs/int4/summary.json" || return 1
  expect_file "$docs_dir/bench-int4/quant.csv" || return 1
  grep -q "int4" "$docs_dir/bench-int4/quant.csv"
}

t_start=$SECONDS
rm -rf "$prefix" "$docs_dir" "$run_dir" "$log" "$work/fake-torch" "$work/mismatch-build" \
  "$work/run-spm" "$work/skeleton" "$work/example-build"
mkdir -p "$log"
step install "cmake --install into $prefix" do_install
step build "examples/quant-plugin against the installed SDK" do_build install
step list "installed trainer --list-plugins" do_list build
step conform "installed qtune_conformance with QTUNE_PLUGIN_PATH" do_conform build
step train "installed trainer, one qlora step with int4" do_train build
step install-plugin "cmake --install of the example into the SDK's plugin folder" \
  do_install_plugin build
step torch-mismatch "find_package(qtune) refuses another LibTorch" do_torch_mismatch install
step tokenizer "installed trainer reads a sentencepiece .model" do_tokenizer install
step skeleton "docs/writing-a-plugin.md's skeleton builds and conforms" do_skeleton install
step docs "docs/writing-a-plugin.md's quick start runs as written" do_docs build
echo "sdk: $passed passed, $failed failed ($((SECONDS - t_start)) s)"
((failed == 0))
