# Sanitizer and fuzzing builds (docs/fuzzing.md). Use a build folder of their own, with clang:
#   CC=clang-14 CXX=clang++-14 cmake -S . -B build-asan -G Ninja -DQTUNE_SANITIZE=ON -DQTUNE_FUZZ=ON
# (scripts/ci-sanitize.sh does this). QTUNE_SANITIZE compiles and links everything with
# AddressSanitizer + UndefinedBehaviorSanitizer; a UB finding aborts (-fno-sanitize-recover) so
# it fails the test that hit it. QTUNE_FUZZ also instruments the code for libFuzzer's coverage
# (-fsanitize=fuzzer-no-link) and adds the tests/fuzz/ executables, linked with -fsanitize=fuzzer.
# LibTorch and the other Debian libraries stay uninstrumented: ASan still sees every allocation
# (malloc is intercepted), UBSan only our code.
option(QTUNE_SANITIZE "Build with -fsanitize=address,undefined (clang, own build folder)" OFF)
option(QTUNE_FUZZ "Add the libFuzzer targets of tests/fuzz (needs QTUNE_SANITIZE and clang)" OFF)

if(QTUNE_FUZZ AND NOT QTUNE_SANITIZE)
  message(FATAL_ERROR "QTUNE_FUZZ=ON needs QTUNE_SANITIZE=ON")
endif()
if(QTUNE_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "QTUNE_SANITIZE=ON needs clang (CXX=clang++-14), got "
                        "${CMAKE_CXX_COMPILER_ID}")
  endif()
  set(QTUNE_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=undefined
                           -fno-omit-frame-pointer)
  if(QTUNE_FUZZ)
    list(APPEND QTUNE_SANITIZE_FLAGS -fsanitize=fuzzer-no-link)
  endif()
  add_compile_options(${QTUNE_SANITIZE_FLAGS})
  add_compile_definitions(QTUNE_SANITIZE)
  add_link_options(-fsanitize=address,undefined)
  # -O1 keeps the instrumented code fast enough for the suites; line tables are all a report's
  # stack trace needs, and keep LibTorch-heavy objects small and quick to link.
  set(CMAKE_CXX_FLAGS_RELWITHDEBINFO "-O1 -gline-tables-only -DNDEBUG")
  # lld links the LibTorch-sized executables several times faster than ld.bfd.
  find_program(QTUNE_LLD ld.lld)
  if(QTUNE_LLD)
    add_link_options(-fuse-ld=lld)
  endif()
  # Shared libraries may use the ASan runtime that the executable carries.
  add_link_options(-Wl,--allow-shlib-undefined)
  # What every test run under the sanitizers gets (tests/CMakeLists.txt adds it to the tests'
  # ENVIRONMENT). Leaks: LibTorch, OpenMP and the plugin registry (which never unloads, by design)
  # keep memory until exit; tests/fuzz/lsan.supp names those and leak checking stays on for
  # the rest. detect_odr_violation=0: LibTorch's and our copies of inline statics are not ours
  # to fix. alloc_dealloc_mismatch=0: libsentencepiece, loaded with RTLD_DEEPBIND, frees with
  # ASan's operator delete what its libstdc++ allocated with malloc (its own static initialisers).
  set(QTUNE_SANITIZE_ENV
    "ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:detect_odr_violation=0:detect_stack_use_after_return=0:alloc_dealloc_mismatch=0"
    "LSAN_OPTIONS=suppressions=${PROJECT_SOURCE_DIR}/tests/fuzz/lsan.supp:print_suppressions=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=${PROJECT_SOURCE_DIR}/tests/fuzz/ubsan.supp")
endif()

# qtune_unsanitized(<target>): builds `target` without the sanitizers. For the sentencepiece
# module, which core loads with RTLD_DEEPBIND and whose libraries then use libc's malloc, not
# ASan's (core/src/tokenizer.cpp, deepbind_dlopen).
function(qtune_unsanitized target)
  if(QTUNE_SANITIZE)
    get_target_property(options ${target} COMPILE_OPTIONS)
    list(REMOVE_ITEM options ${QTUNE_SANITIZE_FLAGS})
    set_target_properties(${target} PROPERTIES COMPILE_OPTIONS "${options}")
    get_target_property(options ${target} LINK_OPTIONS)
    list(REMOVE_ITEM options -fsanitize=address,undefined)
    set_target_properties(${target} PROPERTIES LINK_OPTIONS "${options}")
  endif()
endfunction()
