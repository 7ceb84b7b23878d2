// Entry point of one kit test plugin (see kit_backend.h): QTUNE_SDK_NAME ("kit_<variant>", set
// by CMake) is the plugin's name and selects its defect.
#include "kit_backend.h"
#include "qtune/plugin.h"

namespace kit_test {
struct NamedKitBackend final : KitBackend {
  NamedKitBackend() : KitBackend(QTUNE_SDK_NAME) {}
};
}  // namespace kit_test

QTUNE_QUANT_PLUGIN(QTUNE_SDK_NAME, "0.0.1", kit_test::NamedKitBackend)
