// The kit test backend and its broken variants (see kit_backend.h). Each defect is one marked
// line; everything else is what a correct backend written with the kit looks like.
#include "kit_backend.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <stdexcept>

#include "qtune/error.h"
#include "qtune/plugin_kit.h"
#include "qtune/state_layout.h"

namespace kit_test {

using qtune::Json;
using qtune::TensorState;

namespace {

constexpr int kFormatVersion = 1;

struct Params {
  int64_t bits;
  int64_t group_size;
  double qmax() const { return std::ldexp(1.0, static_cast<int>(bits) - 1) - 1; }
};

Defect defect_of(const std::string& name) {
  const std::string v = name.rfind("kit_", 0) == 0 ? name.substr(4) : name;
  if (v == "copy_state") return Defect::kCopyState;
  if (v == "loose_bound") return Defect::kLooseBound;
  if (v == "bad_grad") return Defect::kBadGrad;
  if (v == "lax_load") return Defect::kLaxLoad;
  if (v == "threads") return Defect::kThreads;
  if (v == "throw_options") return Defect::kThrowOptions;
  return Defect::kNone;
}

class KitWeight final : public qtune::QuantizedWeight {
 public:
  KitWeight(std::string name, Defect defect, Params p, torch::Tensor q, torch::Tensor scale)
      : name_(std::move(name)),
        defect_(defect),
        p_(p),
        q_(std::move(q)),
        scale_(std::move(scale)) {}
  std::string backend() const override { return name_; }
  int64_t out_features() const override { return q_.size(0); }
  int64_t in_features() const override { return q_.size(1); }
  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override {
    return dequantize_rows(0, out_features(), dtype, device);
  }
  torch::Tensor dequantize_rows(int64_t b, int64_t e, torch::ScalarType dtype,
                                torch::Device device) const override {
    torch::Tensor w = q_.slice(0, b, e).to(torch::kFloat32);
    w.mul_(qtune::expand_groups(scale_.slice(0, b, e), p_.group_size, in_features()));
    return w.to(device, dtype);
  }
  torch::Tensor linear_grad_input(const torch::Tensor& g) const override {
    torch::Tensor gx = QuantizedWeight::linear_grad_input(g);
    if (defect_ == Defect::kBadGrad) gx.mul_(1.05);  // the defect: 5% off
    return gx;
  }
  TensorState state() const override {
    TensorState s;
    s.tensors = {{"weight", defect_ == Defect::kCopyState ? q_.clone() : q_},  // the defect: a copy
                 {"weight.scale", scale_}};
    s.meta = {{"backend", name_},
              {"format_version", kFormatVersion},
              {"shape", {out_features(), in_features()}},
              {"options", {{"bits", p_.bits}, {"group_size", p_.group_size}}}};
    return s;
  }
  void to(torch::Device device) override {
    for (torch::Tensor* t : {&q_, &scale_})
      if (t->device() != device) t->set_data(t->to(device));
  }
  torch::Device device() const override { return q_.device(); }

 private:
  std::string name_;
  Defect defect_;
  Params p_;
  torch::Tensor q_, scale_;
};

}  // namespace

KitBackend::KitBackend(std::string name) : name_(std::move(name)), defect_(defect_of(name_)) {}

std::vector<qtune::OptionSpec> KitBackend::option_schema() const {
  return {{"bits", 8, "bits per code", 3, 8},
          {"group_size", 64, "columns per scale (0 = one per row)", 0, int64_t{1} << 20}};
}

Json KitBackend::check_options(const Json& user, const std::string& context) const {
  Json o = qtune::resolve_options(option_schema(), user, context);
  if (defect_ == Defect::kThrowOptions && o["bits"].get<int64_t>() % 2)
    throw std::invalid_argument("odd bits");  // the defect: not a UserError
  return o;
}

double KitBackend::error_bound(const Json& options) const {
  const Json o = check_options(options, "quant.options");
  const Params p{o["bits"], o["group_size"]};
  // Absmax of n Gaussians ~ sqrt(2 ln n) sigma; uniform rounding noise step / sqrt(12).
  const double n = p.group_size > 0 ? static_cast<double>(p.group_size) : std::ldexp(1.0, 20);
  const double bound =
      1.1 * std::sqrt(2.0 * std::log(std::max(n, 2.0))) / (p.qmax() * std::sqrt(12.0));
  return defect_ == Defect::kLooseBound ? std::min(0.9, 20 * bound) : bound;  // the defect
}

std::unique_ptr<qtune::QuantizedWeight> KitBackend::quantize(const torch::Tensor& w,
                                                             const Json& options) const {
  const Json o = check_options(options, "quant.options");
  const Params p{o["bits"], o["group_size"]};
  qtune::check_input_matrix(w, name_);
  const int64_t out = w.size(0), in = w.size(1);
  torch::Tensor q = torch::empty({out, in}, w.options().dtype(torch::kInt8));
  torch::Tensor scale = torch::empty({out, qtune::groups_per_row(in, p.group_size)},
                                     w.options().dtype(torch::kFloat32));
  qtune::for_each_row_chunk(w, name_, [&](int64_t b, int64_t e, const torch::Tensor& x) {
    torch::Tensor s = qtune::group_absmax(x, p.group_size).div_(p.qmax());
    if (defect_ == Defect::kThreads) s.mul_(1.0 + 1e-3 * (at::get_num_threads() - 1));  // defect
    const torch::Tensor safe = torch::where(s > 0, s, torch::ones_like(s));
    q.slice(0, b, e).copy_(
        (x / qtune::expand_groups(safe, p.group_size, in)).round_().clamp_(-p.qmax(), p.qmax()));
    scale.slice(0, b, e).copy_(s);
  });
  return std::make_unique<KitWeight>(name_, defect_, p, std::move(q), std::move(scale));
}

std::unique_ptr<qtune::QuantizedWeight> KitBackend::load(const TensorState& state) const {
  const qtune::StateHeader h = qtune::check_state_meta(state, name_, kFormatVersion);
  const Json o = check_options(h.options, name_ + " state meta.options");
  const Params p{o["bits"], o["group_size"]};
  if (defect_ == Defect::kLaxLoad) {  // the defect: keys only
    QTUNE_CHECK(state.tensors.count("weight") && state.tensors.count("weight.scale"), name_,
                " state: missing tensors");
    return std::make_unique<KitWeight>(name_, defect_, p, state.tensors.at("weight"),
                                       state.tensors.at("weight.scale"));
  }
  auto t = qtune::check_state_tensors(
      state, name_,
      {{"weight", torch::kInt8, {h.out, h.in}},
       {"weight.scale", torch::kFloat32, {h.out, qtune::groups_per_row(h.in, p.group_size)}}},
      h.describe(o));
  return std::make_unique<KitWeight>(name_, defect_, p, t.at("weight"), t.at("weight.scale"));
}

}  // namespace kit_test
