// The DoRA adapter plugin: options, magnitude initialisation from the base, the detached-norm
// forward, merging, state and PEFT config. The math follows the DoRA paper (arXiv 2402.09353,
// eq. 5 and section 4.3) in HF PEFT's arrangement (peft/tuners/lora/dora.py,
// DoraLinearLayer.forward), so results and saved adapters agree with PEFT's use_dora = true.
//
// The options, the state checks and the PEFT config fields repeat the LoRA plugin's on purpose:
// DoRA is PEFT's LoraConfig with use_dora, and plugins never include each other (DESIGN.md).
#include "dora.h"

#include <cmath>
#include <sstream>

#include "qtune/error.h"
#include "qtune/plugin.h"

namespace qtune::dora {

namespace {

constexpr const char* kContext = "adapter.options";
constexpr const char* kKeyA = "lora_A.weight";
constexpr const char* kKeyB = "lora_B.weight";
constexpr const char* kKeyM = "lora_magnitude_vector";  // PEFT's saved key (no ".weight")

// m / norm per row; a zero row of the direction (a zero base row before any update) keeps the
// plain sum instead of dividing by zero.
torch::Tensor row_factor(const torch::Tensor& m, const torch::Tensor& norm) {
  return torch::where(norm > 0, m / norm, torch::ones_like(norm));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

DoraOptions DoraOptions::from_json(const Json& resolved) {
  DoraOptions o;
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
  QTUNE_CHECK(o.init == "kaiming" || o.init == "gaussian", kContext,
              ".init must be \"kaiming\" or \"gaussian\", got \"", o.init, "\"");
  return o;
}

Json DoraOptions::to_json() const {
  return Json{{"rank", rank},
              {"alpha", alpha},
              {"dropout", dropout},
              {"use_rslora", use_rslora},
              {"init", init}};
}

double DoraOptions::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

// ---------------------------------------------------------------------------------------------
// Adapter

DoraFactor::DoraFactor(int64_t rows, int64_t cols) : torch::nn::Module("DoraFactor") {
  weight = register_parameter("weight", torch::zeros({rows, cols}, torch::kFloat32));
}

DoraAdapter::DoraAdapter(int64_t in_features, int64_t out_features, const DoraOptions& options)
    : in_features_(in_features),
      out_features_(out_features),
      options_(options),
      scale_(options.scale()) {
  a_ = register_module("lora_A", std::make_shared<DoraFactor>(options.rank, in_features));
  b_ = register_module("lora_B", std::make_shared<DoraFactor>(out_features, options.rank));
  magnitude_ = register_parameter(kKeyM, torch::ones({out_features}, torch::kFloat32));
  torch::NoGradGuard no_grad;
  if (options.init == "kaiming")
    torch::nn::init::kaiming_uniform_(a_->weight, std::sqrt(5.0));  // PEFT's default for A
  else
    torch::nn::init::normal_(a_->weight, 0.0, 1.0 / static_cast<double>(options.rank));
}

void DoraAdapter::check_bound() const {
  QTUNE_CHECK(base_.weight && base_.linear,
              "dora adapter: not bound to a base projection (bind_base is called by the model "
              "builder before use)");
}

void DoraAdapter::bind_base(const AdapterBase& base) {
  QTUNE_CHECK(base.weight && base.linear, "dora adapter: bind_base needs weight and linear");
  base_ = base;
  torch::NoGradGuard no_grad;
  const torch::Tensor w = base_.weight(torch::kFloat32);
  QTUNE_CHECK(w.dim() == 2 && w.size(0) == out_features_ && w.size(1) == in_features_,
              "dora adapter: base weight has shape ", shape_str(w.sizes()), ", expected [",
              out_features_, ", ", in_features_, "]");
  base_norm_sq_ = w.to(torch::kCPU).pow(2).sum(1);
  // PEFT initialises the magnitude to ||W + s B A|| with B = 0, i.e. the base's row norms;
  // forward computes the norm the same way, so the factor m / ||V|| starts at exactly 1.
  magnitude_.copy_(base_norm_sq_.to(magnitude_.scalar_type()).sqrt());
}

torch::Tensor DoraAdapter::direction_norm(torch::ScalarType dtype) const {
  torch::NoGradGuard no_grad;
  const torch::Tensor a = a_->weight.detach().to(dtype);
  const torch::Tensor b = b_->weight.detach().to(dtype);
  // ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (A W^T)^T_i + s^2 B_i (A A^T) B_i^T: only
  // [out, r] products, and A W^T goes through the base's own (tiled, quantized) linear.
  const torch::Tensor awt = base_.linear(a).to(dtype);  // [r, out]
  const torch::Tensor cross = (b * awt.t()).sum(1);
  const torch::Tensor quad = (torch::mm(b, torch::mm(a, a.t())) * b).sum(1);
  // fp64 (tests) takes ||W||^2 from W in fp64; otherwise the fp32 sums kept since bind_base.
  const torch::Tensor sq = dtype == torch::kFloat64
                               ? base_.weight(torch::kFloat64).pow(2).sum(1)
                               : base_norm_sq_.to(b.device()).to(dtype);
  return (sq + cross * (2.0 * scale_) + quad * (scale_ * scale_)).clamp_min(0).sqrt();
}

torch::Tensor DoraAdapter::apply(const torch::Tensor& x, const torch::Tensor& base_out) {
  check_bound();
  QTUNE_CHECK(x.dim() >= 1 && x.size(-1) == in_features_, "dora adapter: input has shape ",
              shape_str(x.sizes()), ", expected last dimension ", in_features_);
  const auto dt = x.scalar_type();
  const auto ct = torch::promote_types(dt, torch::kFloat32);
  // With dropout in training, PEFT applies it to both branches of the DoRA term and keeps the
  // undropped base output: out = y + (f - 1) W dropout(x) + f s B A dropout(x).
  const bool drop = options_.dropout > 0 && is_training();
  const torch::Tensor h = drop ? torch::dropout(x, options_.dropout, true) : x;
  const torch::Tensor base_h = drop ? base_.linear(h) : base_out;
  const torch::Tensor lora = torch::linear(torch::linear(h, a_->weight.to(dt)), b_->weight.to(dt));
  const torch::Tensor f = row_factor(magnitude_.to(ct), direction_norm(ct));
  const torch::Tensor y = base_out.to(ct);
  return (y + (f - 1.0) * base_h.to(ct) + f * lora.to(ct) * scale_).to(dt);
}

torch::Tensor DoraAdapter::forward(const torch::Tensor& x) {
  check_bound();
  if (!enabled()) {
    auto sizes = x.sizes().vec();
    sizes.back() = out_features_;
    return torch::zeros(sizes, x.options());
  }
  const torch::Tensor y = base_.linear(x);
  return apply(x, y) - y;
}

torch::Tensor DoraAdapter::delta_weight() const {
  check_bound();
  const torch::Tensor w = base_.weight(torch::kFloat32);
  const torch::Tensor v =
      w + torch::matmul(b_->weight.to(torch::kFloat32), a_->weight.to(torch::kFloat32)) * scale_;
  // The norm forward uses, so that the merged weight is what forward computes (and B = 0
  // merges to exactly nothing).
  const torch::Tensor norm = direction_norm(torch::kFloat32).to(v.device());
  return row_factor(magnitude_.to(torch::kFloat32), norm).unsqueeze(1) * v - w;
}

TensorState DoraAdapter::state() const {
  TensorState s;
  s.tensors[kKeyA] = a_->weight;
  s.tensors[kKeyB] = b_->weight;
  s.tensors[kKeyM] = magnitude_;
  s.meta = Json{{"adapter", "dora"},
                {"options", options_.to_json()},
                {"in_features", in_features_},
                {"out_features", out_features_}};
  return s;
}

void DoraAdapter::load(const TensorState& state) {
  if (state.meta.is_object() && state.meta.contains("adapter"))
    QTUNE_CHECK(state.meta["adapter"] == "dora", "dora state: saved by adapter ",
                state.meta["adapter"].dump(), ", expected \"dora\"");
  const std::pair<const char*, const torch::Tensor*> wanted[] = {
      {kKeyA, &a_->weight}, {kKeyB, &b_->weight}, {kKeyM, &magnitude_}};
  for (const auto& [key, _] : state.tensors) {
    bool known = false;
    for (const auto& w : wanted) known = known || key == w.first;
    QTUNE_CHECK(known, "dora state: unexpected tensor '", key, "' (expected ", kKeyA, ", ", kKeyB,
                " and ", kKeyM, ")");
  }
  for (const auto& [key, param] : wanted) {
    auto it = state.tensors.find(key);
    QTUNE_CHECK(it != state.tensors.end(), "dora state: missing tensor '", key, "'",
                std::string(key) == kKeyM ? " (a LoRA adapter, not DoRA?)" : "");
    QTUNE_CHECK(it->second.defined() && it->second.is_floating_point(), "dora state: tensor '", key,
                "' must be a floating-point tensor");
    QTUNE_CHECK(it->second.sizes() == param->sizes(), "dora state: tensor '", key, "' has shape ",
                shape_str(it->second.sizes()), ", expected ", shape_str(param->sizes()), " (rank ",
                options_.rank, ", in ", in_features_, ", out ", out_features_, ")");
  }
  if (state.meta.is_object() && state.meta.contains("options")) {
    const Json& o = state.meta["options"];
    if (o.contains("alpha") && o["alpha"].is_number())
      QTUNE_CHECK(std::abs(o["alpha"].get<double>() - options_.alpha) <= 1e-9 * options_.alpha,
                  "dora state: saved with alpha ", o["alpha"].get<double>(),
                  ", this adapter has alpha ", options_.alpha);
    if (o.contains("use_rslora") && o["use_rslora"].is_boolean())
      QTUNE_CHECK(o["use_rslora"].get<bool>() == options_.use_rslora,
                  "dora state: saved with use_rslora ", o["use_rslora"].dump(),
                  ", this adapter has use_rslora ", options_.use_rslora ? "true" : "false");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, param] : wanted)
    const_cast<torch::Tensor*>(param)->copy_(state.tensors.at(key));
}

Json DoraAdapter::peft_config() const {
  // PEFT's LoraConfig (peft/tuners/lora/config.py) with use_dora; lora_alpha an integer when
  // integral, as PEFT types it.
  Json alpha = options_.alpha == std::floor(options_.alpha) && std::abs(options_.alpha) < 1e15
                   ? Json(static_cast<int64_t>(options_.alpha))
                   : Json(options_.alpha);
  return Json{{"peft_type", "LORA"},
              {"use_dora", true},
              {"r", options_.rank},
              {"lora_alpha", alpha},
              {"lora_dropout", options_.dropout},
              {"use_rslora", options_.use_rslora},
              {"init_lora_weights", options_.init == "gaussian" ? Json("gaussian") : Json(true)},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"task_type", "CAUSAL_LM"}};
}

void DoraAdapter::pretty_print(std::ostream& stream) const {
  stream << "qtune::dora::DoraAdapter(in_features=" << in_features_
         << ", out_features=" << out_features_ << ", rank=" << options_.rank
         << ", alpha=" << options_.alpha << ", scale=" << scale_ << ", dropout=" << options_.dropout
         << (options_.use_rslora ? ", rslora" : "") << (enabled() ? "" : ", disabled") << ")";
}

// ---------------------------------------------------------------------------------------------
// Factory

std::vector<OptionSpec> DoraFactory::option_schema() const {
  return {
      {"rank", 8, "rank r (> 0) of the direction update B @ A"},
      {"alpha", 16.0, "alpha (> 0): the direction update is scaled by alpha / rank"},
      {"dropout", 0.0, "dropout probability on the adapter input during training, in [0, 1)"},
      {"use_rslora", false, "rank-stabilised scale alpha / sqrt(rank) instead"},
      {"init", "kaiming",
       "initialisation of A (B is zero, the magnitude the base's row norms): \"kaiming\" or "
       "\"gaussian\" (normal with std 1/rank), as PEFT's init_lora_weights"},
  };
}

Json DoraFactory::check_options(const Json& user, const std::string& context) const {
  return DoraOptions::from_json(resolve_options(option_schema(), user, context)).to_json();
}

std::shared_ptr<Adapter> DoraFactory::create(int64_t in_features, int64_t out_features,
                                             const Json& options) const {
  QTUNE_CHECK(in_features > 0 && out_features > 0, "dora adapter: features must be > 0, got in ",
              in_features, ", out ", out_features);
  const DoraOptions o = DoraOptions::from_json(resolve_options(option_schema(), options, kContext));
  return std::make_shared<DoraAdapter>(in_features, out_features, o);
}

}  // namespace qtune::dora

QTUNE_ADAPTER_PLUGIN("dora", "1.0.0", ::qtune::dora::DoraFactory)
