// The LoRA adapter plugin: options, initialisation, forward/merge math, state and PEFT config.
// Conventions follow HF PEFT (peft/tuners/lora/{config,layer}.py) so adapters are interchangeable.
#include "lora_adapter.h"

#include <cmath>
#include <set>
#include <sstream>

#include "qtune/error.h"

namespace qtune::lora {

namespace {

constexpr const char* kContext = "adapter.options";
constexpr const char* kKeyA = "lora_A.weight";
constexpr const char* kKeyB = "lora_B.weight";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

LoraOptions LoraOptions::from_json(const Json& resolved) {
  LoraOptions o;
  o.rank = resolved.at("rank").get<int64_t>();
  o.alpha = resolved.at("alpha").get<double>();
  o.dropout = resolved.at("dropout").get<double>();
  o.use_rslora = resolved.at("use_rslora").get<bool>();
  o.init = resolved.at("init").get<std::string>();
  QTUNE_CHECK(o.rank > 0, kContext, ".rank must be > 0, got ", o.rank);
  // Bounded before anything is allocated from it (a mistyped 1000000 would ask for gigabytes);
  // far above any rank in use (PEFT's largest published recipes use 256).
  QTUNE_CHECK(o.rank <= 65536, kContext, ".rank must be at most 65536, got ", o.rank);
  QTUNE_CHECK(std::isfinite(o.alpha) && o.alpha > 0, kContext, ".alpha must be > 0, got ", o.alpha);
  QTUNE_CHECK(o.dropout >= 0 && o.dropout < 1, kContext, ".dropout must be in [0, 1), got ",
              o.dropout);
  QTUNE_CHECK(o.init == "kaiming" || o.init == "gaussian", kContext, ".init must be ",
              "\"kaiming\" or \"gaussian\", got \"", o.init, "\"");
  return o;
}

Json LoraOptions::to_json() const {
  return Json{{"rank", rank},
              {"alpha", alpha},
              {"dropout", dropout},
              {"use_rslora", use_rslora},
              {"init", init}};
}

double LoraOptions::scale() const {
  // PEFT LoraLayer.update_layer: scaling = lora_alpha / sqrt(r) if use_rslora else lora_alpha / r.
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

// ---------------------------------------------------------------------------------------------
// Adapter

LoraFactor::LoraFactor(int64_t rows, int64_t cols) : torch::nn::Module("LoraFactor") {
  weight = register_parameter("weight", torch::zeros({rows, cols}, torch::kFloat32));
}

LoraAdapter::LoraAdapter(int64_t in_features, int64_t out_features, const LoraOptions& options)
    : in_features_(in_features),
      out_features_(out_features),
      options_(options),
      scale_(options.scale()) {
  a_ = register_module("lora_A", std::make_shared<LoraFactor>(options.rank, in_features));
  b_ = register_module("lora_B", std::make_shared<LoraFactor>(out_features, options.rank));
  torch::NoGradGuard no_grad;
  if (options.init == "kaiming") {
    // What nn.Linear does to its weight, and PEFT (after microsoft/LoRA loralib) to A:
    // kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    torch::nn::init::kaiming_uniform_(a_->weight, std::sqrt(5.0));
  } else {
    // PEFT init_lora_weights="gaussian": nn.init.normal_(A, std=1 / r).
    torch::nn::init::normal_(a_->weight, 0.0, 1.0 / static_cast<double>(options.rank));
  }
  // B stays zero, so the adapted model starts exactly at the base model.
}

torch::Tensor LoraAdapter::forward(const torch::Tensor& x) {
  QTUNE_CHECK(x.dim() >= 1 && x.size(-1) == in_features_, "lora adapter: input has shape ",
              shape_str(x.sizes()), ", expected last dimension ", in_features_);
  if (!enabled()) {
    auto sizes = x.sizes().vec();
    sizes.back() = out_features_;
    return torch::zeros(sizes, x.options());
  }
  torch::Tensor h = options_.dropout > 0 ? torch::dropout(x, options_.dropout, is_training()) : x;
  // Tensor::to is recorded by autograd, so with bf16 activations the gradient flows back,
  // converted, into the fp32 master weights.
  const torch::Tensor a = a_->weight.to(x.scalar_type());
  const torch::Tensor b = b_->weight.to(x.scalar_type());
  return torch::linear(torch::linear(h, a), b) * scale_;
}

torch::Tensor LoraAdapter::delta_weight() const {
  return torch::matmul(b_->weight.to(torch::kFloat32), a_->weight.to(torch::kFloat32)) * scale_;
}

TensorState LoraAdapter::state() const {
  TensorState s;
  s.tensors[kKeyA] = a_->weight;
  s.tensors[kKeyB] = b_->weight;
  s.meta = Json{{"adapter", "lora"},
                {"options", options_.to_json()},
                {"in_features", in_features_},
                {"out_features", out_features_}};
  return s;
}

void LoraAdapter::load(const TensorState& state) {
  if (state.meta.is_object() && state.meta.contains("adapter")) {
    QTUNE_CHECK(state.meta["adapter"] == "lora", "lora state: saved by adapter ",
                state.meta["adapter"].dump(), ", expected \"lora\"");
  }
  std::string have;
  for (const auto& [key, _] : state.tensors) {
    have += (have.empty() ? "" : ", ") + key;
    QTUNE_CHECK(key == kKeyA || key == kKeyB, "lora state: unexpected tensor '", key,
                "' (expected only ", kKeyA, " and ", kKeyB, ")");
  }
  const std::pair<const char*, const torch::Tensor*> wanted[] = {{kKeyA, &a_->weight},
                                                                 {kKeyB, &b_->weight}};
  for (const auto& [key, param] : wanted) {
    auto it = state.tensors.find(key);
    QTUNE_CHECK(it != state.tensors.end(), "lora state: missing tensor '", key,
                "' (have: ", have.empty() ? "none" : have, ")");
    QTUNE_CHECK(it->second.defined() && it->second.is_floating_point(), "lora state: tensor '", key,
                "' must be a floating-point tensor");
    QTUNE_CHECK(it->second.sizes() == param->sizes(), "lora state: tensor '", key, "' has shape ",
                shape_str(it->second.sizes()), ", expected ", shape_str(param->sizes()), " (rank ",
                options_.rank, ", in ", in_features_, ", out ", out_features_, ")");
  }
  // alpha and use_rslora are not visible in the shapes but change the function; a mismatch would
  // silently rescale a trained update.
  if (state.meta.is_object() && state.meta.contains("options")) {
    const Json& o = state.meta["options"];
    if (o.contains("alpha") && o["alpha"].is_number())
      QTUNE_CHECK(std::abs(o["alpha"].get<double>() - options_.alpha) <= 1e-9 * options_.alpha,
                  "lora state: saved with alpha ", o["alpha"].get<double>(),
                  ", this adapter has alpha ", options_.alpha);
    if (o.contains("use_rslora") && o["use_rslora"].is_boolean())
      QTUNE_CHECK(o["use_rslora"].get<bool>() == options_.use_rslora,
                  "lora state: saved with use_rslora ", o["use_rslora"].dump(),
                  ", this adapter has use_rslora ", options_.use_rslora ? "true" : "false");
  }
  torch::NoGradGuard no_grad;
  a_->weight.copy_(state.tensors.at(kKeyA));
  b_->weight.copy_(state.tensors.at(kKeyB));
}

Json LoraAdapter::peft_config() const {
  // Field names of HF PEFT's LoraConfig (peft/tuners/lora/config.py). PEFT types lora_alpha as
  // int; write an integer when alpha is integral so strict readers are happy.
  Json alpha = options_.alpha == std::floor(options_.alpha) && std::abs(options_.alpha) < 1e15
                   ? Json(static_cast<int64_t>(options_.alpha))
                   : Json(options_.alpha);
  return Json{{"peft_type", "LORA"},
              {"r", options_.rank},
              {"lora_alpha", alpha},
              {"lora_dropout", options_.dropout},
              {"use_rslora", options_.use_rslora},
              {"init_lora_weights", options_.init == "gaussian" ? Json("gaussian") : Json(true)},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"task_type", "CAUSAL_LM"}};
}

void LoraAdapter::pretty_print(std::ostream& stream) const {
  stream << "qtune::lora::LoraAdapter(in_features=" << in_features_
         << ", out_features=" << out_features_ << ", rank=" << options_.rank
         << ", alpha=" << options_.alpha << ", scale=" << scale_ << ", dropout=" << options_.dropout
         << (options_.use_rslora ? ", rslora" : "") << (enabled() ? "" : ", disabled") << ")";
}

// ---------------------------------------------------------------------------------------------
// Factory

std::vector<OptionSpec> LoraFactory::option_schema() const {
  return {
      {"rank", 8, "LoRA rank r (> 0): the inner dimension of B @ A"},
      {"alpha", 16.0, "LoRA alpha (> 0): the update is scaled by alpha / rank"},
      {"dropout", 0.0, "dropout probability on the adapter input during training, in [0, 1)"},
      {"use_rslora", false, "rank-stabilised LoRA: scale by alpha / sqrt(rank) instead"},
      {"init", "kaiming",
       "initialisation of A (B is zero): \"kaiming\" (uniform, as nn.Linear and PEFT's default) "
       "or \"gaussian\" (normal with std 1/rank, PEFT's init_lora_weights=\"gaussian\")"},
  };
}

Json LoraFactory::check_options(const Json& user, const std::string& context) const {
  return LoraOptions::from_json(resolve_options(option_schema(), user, context)).to_json();
}

std::shared_ptr<Adapter> LoraFactory::create(int64_t in_features, int64_t out_features,
                                             const Json& options) const {
  QTUNE_CHECK(in_features > 0 && out_features > 0, "lora adapter: features must be > 0, got in ",
              in_features, ", out ", out_features);
  const LoraOptions o = LoraOptions::from_json(resolve_options(option_schema(), options, kContext));
  return std::make_shared<LoraAdapter>(in_features, out_features, o);
}

}  // namespace qtune::lora
