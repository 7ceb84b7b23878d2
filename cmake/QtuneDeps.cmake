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
  # PyPI's LibTorch 2.x bundles its own {fmt} headers (<torch>/include/fmt), which shadow the
  # {fmt} Debian's spdlog is built with: spdlog/common.h then fails (no fmt::basic_runtime). A
  # directory holding only a link to spdlog's {fmt}, searched before Torch's headers, keeps one
  # {fmt} for both. Debian's LibTorch uses the system {fmt} itself: nothing to do there.
  if(TARGET fmt::fmt AND TORCH_INCLUDE_DIRS)
    get_target_property(_qtune_fmt_inc fmt::fmt INTERFACE_INCLUDE_DIRECTORIES)
    foreach(_dir IN LISTS TORCH_INCLUDE_DIRS)
      if(_qtune_fmt_inc AND EXISTS "${_dir}/fmt/core.h" AND NOT _dir IN_LIST _qtune_fmt_inc)
        list(GET _qtune_fmt_inc 0 _qtune_fmt_dir)
        set(_qtune_shim "${CMAKE_BINARY_DIR}/qtune-fmt-shim")
        file(MAKE_DIRECTORY "${_qtune_shim}")
        file(CREATE_LINK "${_qtune_fmt_dir}/fmt" "${_qtune_shim}/fmt" SYMBOLIC)
        target_include_directories(qtune_torch SYSTEM BEFORE INTERFACE "${_qtune_shim}")
        break()
      endif()
    endforeach()
  endif()
endif()
