// Out-of-line destructors (and default methods) of the exported interface classes, so their vtables
// and type info live in libqtune_core (one copy shared by every plugin).
#include "qtune/adapter.h"
#include "qtune/error.h"
#include "qtune/quantized_weight.h"
#include "qtune/tokenizer.h"
#include "qtune/weight_source.h"

namespace qtune {

QuantizedWeight::~QuantizedWeight() = default;
QuantBackend::~QuantBackend() = default;

bool QuantBackend::load_is_cheap() const { return true; }
Adapter::~Adapter() = default;
AdapterFactory::~AdapterFactory() = default;
Json QuantBackend::check_options(const Json& user, const std::string& context) const {
  return resolve_options(option_schema(), user, context);
}
Json AdapterFactory::check_options(const Json& user, const std::string& context) const {
  return resolve_options(option_schema(), user, context);
}
WeightSource::~WeightSource() = default;
Tokenizer::~Tokenizer() = default;

void Adapter::bind_base(const AdapterBase&) {}

torch::Tensor Adapter::apply(const torch::Tensor& x, const torch::Tensor& base_out) {
  return base_out + forward(x);
}

TensorState WeightSource::quantized(const std::string& name) const {
  throw UserError("no pre-quantized state for " + name + " in " + describe());
}

}  // namespace qtune
