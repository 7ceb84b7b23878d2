// Deliberately broken quantization plugins for the registry tests (tests/sdk), one source built
// several ways:
//   QTUNE_SDK_THROW_STD      the factory throws std::runtime_error
//   QTUNE_SDK_THROW_NON_STD  the factory throws an int
//   QTUNE_SDK_FOREIGN        built "against another LibTorch": its stamp and info record say
//                            LibTorch 9.9.9 (QTUNE_PLUGIN_TORCH_VERSION, set by CMake) and it
//                            needs a symbol nothing defines, so it cannot even be dlopen()ed
//                            (like a plugin linked against a LibTorch with other symbols).
#include <stdexcept>

#include "qtune/error.h"
#include "qtune/plugin.h"

#ifdef QTUNE_SDK_FOREIGN
// Defined nowhere: resolving it fails at dlopen (RTLD_NOW), before any plugin code runs.
extern "C" int qtune_sdk_symbol_of_another_libtorch();
#endif

namespace sdk_test {

class BrokenBackend final : public qtune::QuantBackend {
 public:
  BrokenBackend() {
#if defined(QTUNE_SDK_THROW_STD)
    throw std::runtime_error("cannot initialise: no such device (deliberate)");
#elif defined(QTUNE_SDK_THROW_NON_STD)
    throw 42;
#elif defined(QTUNE_SDK_FOREIGN)
    value_ = qtune_sdk_symbol_of_another_libtorch();
#endif
  }
  std::string name() const override { return QTUNE_SDK_NAME; }
  std::vector<qtune::OptionSpec> option_schema() const override { return {}; }
  double error_bound(const qtune::Json&) const override { return 0.5; }
  std::unique_ptr<qtune::QuantizedWeight> quantize(const torch::Tensor&,
                                                   const qtune::Json&) const override {
    throw qtune::UserError("broken plugin");
  }
  std::unique_ptr<qtune::QuantizedWeight> load(const qtune::TensorState&) const override {
    throw qtune::UserError("broken plugin");
  }

 private:
  int value_ = 0;
};

}  // namespace sdk_test

QTUNE_QUANT_PLUGIN(QTUNE_SDK_NAME, "0.0.1", sdk_test::BrokenBackend)
