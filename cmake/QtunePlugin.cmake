# qtune_add_plugin(<name> SOURCES <src>... [LINK <libs>...])
#
# Builds a qtune plugin: a MODULE library named qtune_<name> with hidden visibility, linked only
# against the core SDK (qtune::core when installed, qtune_core in the build tree). It also creates
# an OBJECT library <name>_objects holding the same sources, so the plugin's unit tests can link
# them directly. The module lands in the plugin folder the registry searches by default.
function(qtune_add_plugin name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LINK;DEFINES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "qtune_add_plugin(${name}): SOURCES is required")
  endif()
  if(TARGET qtune_core)
    set(core qtune_core)
  else()
    set(core qtune::core)
  endif()
  add_library(${name}_objects OBJECT ${ARG_SOURCES})
  target_link_libraries(${name}_objects PUBLIC ${core} ${ARG_LINK})
  target_compile_definitions(${name}_objects PRIVATE ${ARG_DEFINES})
  set_target_properties(${name}_objects PROPERTIES
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON POSITION_INDEPENDENT_CODE ON)
  if(COMMAND qtune_use_pch)
    qtune_use_pch(${name}_objects)
  endif()

  add_library(qtune_${name} MODULE $<TARGET_OBJECTS:${name}_objects>)
  target_link_libraries(qtune_${name} PRIVATE ${core} ${ARG_LINK})
  set_target_properties(qtune_${name} PROPERTIES PREFIX "lib" CXX_VISIBILITY_PRESET hidden)
  if(DEFINED QTUNE_PLUGIN_OUTPUT_DIR)
    set_target_properties(qtune_${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${QTUNE_PLUGIN_OUTPUT_DIR})
  endif()
  if(DEFINED QTUNE_PLUGIN_INSTALL_DIR)
    install(TARGETS qtune_${name} LIBRARY DESTINATION ${QTUNE_PLUGIN_INSTALL_DIR})
  endif()
endfunction()
