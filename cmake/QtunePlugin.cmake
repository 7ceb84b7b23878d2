# qtune_add_plugin(<name> SOURCES <src>... [LINK <libs>...] [DEFINES <defs>...]
#                  [OUTPUT_DIRECTORY <dir>] [INSTALL_DESTINATION <dir>])
#
# Builds a qtune plugin: a MODULE library libqtune_<name>.so (target qtune_<name>) with hidden
# visibility, linked only against the core SDK (qtune::core when installed, qtune_core in the
# build tree). It also creates an OBJECT library <name>_objects holding the same sources, so the
# plugin's unit tests can link them directly. Used both in-tree and, through the installed
# package (find_package(qtune)), by out-of-tree plugins.
#
#   OUTPUT_DIRECTORY     where the .so is written. Default: in-tree, the build's plugin folder
#                        (build/lib/qtune/plugins, which the registry searches by default);
#                        out of tree, CMAKE_LIBRARY_OUTPUT_DIRECTORY or the current build folder
#                        (load it with --plugin_dir or QTUNE_PLUGIN_PATH).
#   INSTALL_DESTINATION  install(TARGETS) destination. Default: in-tree, lib/qtune/plugins;
#                        out of tree, not installed (pass ${QTUNE_PLUGIN_DIR} to install it
#                        beside the SDK's own plugins, where an installed trainer finds it).
function(qtune_add_plugin name)
  cmake_parse_arguments(ARG "" "OUTPUT_DIRECTORY;INSTALL_DESTINATION" "SOURCES;LINK;DEFINES"
                        ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "qtune_add_plugin(${name}): SOURCES is required")
  endif()
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "qtune_add_plugin(${name}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  if(TARGET qtune_core)
    set(core qtune_core)
  else()
    set(core qtune::core)
  endif()
  add_library(${name}_objects OBJECT ${ARG_SOURCES})
  target_link_libraries(${name}_objects PUBLIC ${core} ${ARG_LINK})
  target_compile_definitions(${name}_objects PRIVATE ${ARG_DEFINES})
  # The SDK headers are C++17; say so on the target so a project need not set it globally.
  target_compile_features(${name}_objects PUBLIC cxx_std_17)
  set_target_properties(${name}_objects PROPERTIES
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON POSITION_INDEPENDENT_CODE ON)
  if(COMMAND qtune_use_pch)  # the in-tree precompiled LibTorch header; absent when installed
    qtune_use_pch(${name}_objects)
  endif()

  add_library(qtune_${name} MODULE $<TARGET_OBJECTS:${name}_objects>)
  target_link_libraries(qtune_${name} PRIVATE ${core} ${ARG_LINK})
  set_target_properties(qtune_${name} PROPERTIES PREFIX "lib" CXX_VISIBILITY_PRESET hidden)

  if(ARG_OUTPUT_DIRECTORY)
    set(out_dir ${ARG_OUTPUT_DIRECTORY})
  elseif(DEFINED QTUNE_PLUGIN_OUTPUT_DIR)
    set(out_dir ${QTUNE_PLUGIN_OUTPUT_DIR})
  elseif(CMAKE_LIBRARY_OUTPUT_DIRECTORY)
    set(out_dir ${CMAKE_LIBRARY_OUTPUT_DIRECTORY})
  else()
    set(out_dir ${CMAKE_CURRENT_BINARY_DIR})
  endif()
  set_target_properties(qtune_${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${out_dir})

  if(ARG_INSTALL_DESTINATION)
    set(install_dir ${ARG_INSTALL_DESTINATION})
  elseif(DEFINED QTUNE_PLUGIN_INSTALL_DIR)
    set(install_dir ${QTUNE_PLUGIN_INSTALL_DIR})
  endif()
  if(install_dir)
    # The host process has libqtune_core loaded already, but a plugin that finds it on its own
    # RPATH can also be inspected (ldd) or loaded by another host: in-tree the plugin folder is
    # lib/qtune/plugins, so the core library is two levels up; out of tree, keep the SDK's
    # absolute library folder (and LibTorch's, when outside the system folders).
    if(TARGET qtune_core AND DEFINED CMAKE_INSTALL_LIBDIR AND NOT IS_ABSOLUTE ${install_dir})
      file(RELATIVE_PATH to_lib /${install_dir} /${CMAKE_INSTALL_LIBDIR})
      set_target_properties(qtune_${name} PROPERTIES INSTALL_RPATH "$ORIGIN/${to_lib}")
    endif()
    set_target_properties(qtune_${name} PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)
    install(TARGETS qtune_${name} LIBRARY DESTINATION ${install_dir})
  endif()
endfunction()
