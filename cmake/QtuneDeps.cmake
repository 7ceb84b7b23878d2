# Third-party dependencies shared by the build tree and by the installed SDK
# (qtuneConfig.cmake includes this file too, so out-of-tree plugins see the same targets).
# On Debian, TorchConfig lives under /usr/lib/<triplet>/cmake/Torch; on the GPU machine it comes
# from pip's torch.utils.cmake_prefix_path (pass -DCMAKE_PREFIX_PATH=...).
find_package(Torch REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(spdlog REQUIRED)
find_package(Boost 1.71 REQUIRED)
find_package(Threads REQUIRED)

# Torch's imported target carries flags we want everywhere (ABI macro, include dirs).
if(NOT TARGET qtune_torch)
  add_library(qtune_torch INTERFACE IMPORTED GLOBAL)
  target_link_libraries(qtune_torch INTERFACE ${TORCH_LIBRARIES})
  separate_arguments(_qtune_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(qtune_torch INTERFACE ${_qtune_torch_flags})
  if(TORCH_INCLUDE_DIRS)
    target_include_directories(qtune_torch INTERFACE ${TORCH_INCLUDE_DIRS})
  endif()
endif()
