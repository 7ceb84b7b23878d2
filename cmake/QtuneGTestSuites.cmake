# Build-time step of qtune_add_test (tests/CMakeLists.txt), run as
#   cmake -D EXE=<test executable> -D PARAMS=<file> -D OUT=<file> -P QtuneGTestSuites.cmake
# Lists the executable's GoogleTest suites (--gtest_list_tests) and writes OUT: one CTest test
# per suite, named "<Suite>.*" and running --gtest_filter=<Suite>.*, with the ENVIRONMENT and
# LABELS that PARAMS sets (QTUNE_TEST_ENV, QTUNE_TEST_LABELS). One process per suite rather than
# per test: each process start loads LibTorch (about 1.3 s here), several hundred times a suite.
cmake_minimum_required(VERSION 3.20)
include("${PARAMS}")
execute_process(COMMAND "${EXE}" --gtest_list_tests
  OUTPUT_VARIABLE listing ERROR_VARIABLE errors RESULT_VARIABLE rc TIMEOUT 60)
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "${EXE} --gtest_list_tests failed (${rc}):\n${errors}${listing}")
endif()
string(REGEX MATCHALL "(^|\n)[^ \n#][^ \n]*\\." suites "${listing}")
set(lines "")
set(seen "")
foreach(suite IN LISTS suites)
  string(STRIP "${suite}" suite)
  string(REGEX REPLACE "\\.$" "" suite "${suite}")
  if(suite MATCHES "^DISABLED_" OR suite IN_LIST seen)
    continue()
  endif()
  list(APPEND seen "${suite}")
  string(APPEND lines
    "add_test([==[${suite}.*]==] [==[${EXE}]==] [==[--gtest_filter=${suite}.*]==])\n"
    "set_tests_properties([==[${suite}.*]==] PROPERTIES ENVIRONMENT [==[${QTUNE_TEST_ENV}]==] "
    "LABELS [==[${QTUNE_TEST_LABELS}]==])\n")
endforeach()
if(NOT seen)
  message(FATAL_ERROR "${EXE} lists no test suites:\n${listing}")
endif()
file(WRITE "${OUT}.tmp" "${lines}")
file(RENAME "${OUT}.tmp" "${OUT}")
