// int8 backend: options, absmax quantization, on-the-fly dequantization, and matmuls that apply
// the per-row scale after the product (layout in int8_backend.h).
#include "int8_backend.h"

#include <algorithm>
#include <cmath>

#include "qtune/error.h"
#include "qtune/plugin_kit.h"
#include "qtune/state_layout.h"

namespace qtune::int8 {
namespace {

constexpr int kFormatVersion = 1;
constexpr double kQMax = 127.0;  // symmetric: -128 is never used, so q and -q both exist

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

std::vector<OptionSpec> option_schema() {
  return {
      {"group_size", 0,
       "input columns sharing one scale (0 = one scale per output row); the last group of a row "
       "may be shorter",
       0, int64_t{1} << 30},
      {"scale_dtype", "fp32", "storage of the scales", nullptr, nullptr, {"fp32", "bf16"}},
  };
}

Int8Params parse_params(const Json& options, const std::string& context) {
  const Json o = resolve_options(option_schema(), options, context);
  Int8Params p;
  p.group_size = o["group_size"].get<int64_t>();
  p.scale_dtype = o["scale_dtype"].get<std::string>();
  return p;
}

// ---------------------------------------------------------------------------------------------
// Int8Weight

Int8Weight::Int8Weight(Int8Params params, torch::Tensor q, torch::Tensor scale)
    : params_(std::move(params)), q_(std::move(q)), scale_(std::move(scale)) {}

torch::Tensor Int8Weight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                          torch::Device device) const {
  TORCH_CHECK(0 <= begin && begin <= end && end <= q_.size(0), "int8: rows [", begin, ", ", end,
              ") outside [0, ", q_.size(0), ")");
  // fp32 product then one rounding to dtype (a bf16 product of bf16 operands would round twice).
  const torch::Tensor s = scale_.slice(0, begin, end).to(torch::kFloat32);
  torch::Tensor w = q_.slice(0, begin, end).to(torch::kFloat32);
  const int64_t in = q_.size(1), groups = s.size(1);
  if (groups == 1 || groups * params_.group_size == in)  // broadcast, no expanded copy
    w.view({end - begin, groups, in / groups}).mul_(s.unsqueeze(2));
  else
    w.mul_(expand_groups(s, params_.group_size, in));
  return w.to(device, dtype);
}

torch::Tensor Int8Weight::dequantize(torch::ScalarType dtype, torch::Device device) const {
  const int64_t out = q_.size(0), tile = tile_rows();
  if (tile >= out) return dequantize_rows(0, out, dtype, device);
  torch::Tensor w = torch::empty(q_.sizes(), q_.options().dtype(dtype));
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    w.slice(0, r, e).copy_(dequantize_rows(r, e, dtype, q_.device()));
  }
  return w.to(device);
}

bool Int8Weight::fast_path(torch::ScalarType dtype) const {
  return params_.group_size == 0 &&
         (dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kFloat64);
}

torch::Tensor Int8Weight::linear(const torch::Tensor& x) const {
  if (!fast_path(x.scalar_type())) return QuantizedWeight::linear(x);
  const auto opts = x.options();
  const int64_t out = q_.size(0), tile = tile_rows();
  auto part = [&](int64_t r, int64_t e) {
    return torch::matmul(x, q_.slice(0, r, e).to(opts).t())
        .mul_(scale_.slice(0, r, e).view(-1).to(opts));
  };
  if (tile >= out) return part(0, out);
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  torch::Tensor y = torch::empty(sizes, opts);
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    y.narrow(-1, r, e - r).copy_(part(r, e));
  }
  return y;
}

torch::Tensor Int8Weight::linear_grad_input(const torch::Tensor& g) const {
  // LibTorch's CPU bf16 GEMM without native bf16 support (no AVX-512 BF16) accumulates g @ W
  // in bf16: ~1% error on a 256-wide product. fp32 is as fast there and rounds once.
  if (g.is_cpu() && g.scalar_type() == torch::kBFloat16)
    return linear_grad_input(g.to(torch::kFloat32)).to(torch::kBFloat16);
  if (!fast_path(g.scalar_type())) return QuantizedWeight::linear_grad_input(g);
  const auto opts = g.options();
  const int64_t out = q_.size(0), tile = tile_rows();
  torch::Tensor gx;
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    const torch::Tensor gs = g.narrow(-1, r, e - r) * scale_.slice(0, r, e).view(-1).to(opts);
    const torch::Tensor p = torch::matmul(gs, q_.slice(0, r, e).to(opts));
    if (gx.defined())
      gx.add_(p);
    else
      gx = p;
  }
  return gx;
}

TensorState Int8Weight::state() const {
  TensorState st;
  st.tensors = {{"weight", q_}, {"weight.scale", scale_}};
  st.meta = Json{{"backend", "int8"},
                 {"format_version", kFormatVersion},
                 {"shape", {q_.size(0), q_.size(1)}},
                 {"options", params_.to_json()}};
  return st;
}

void Int8Weight::to(torch::Device device) {
  // set_data keeps the TensorImpl, so handles from state() (module buffers) see the move.
  for (torch::Tensor* t : {&q_, &scale_})
    if (t->device() != device) t->set_data(t->to(device));
}

// ---------------------------------------------------------------------------------------------
// Int8Backend

Json Int8Backend::check_options(const Json& user, const std::string& context) const {
  return parse_params(user, context).to_json();
}

double Int8Backend::error_bound(const Json& options) const {
  const Int8Params p = parse_params(options);
  // The largest |w| of n Gaussian values is about sqrt(2 ln n) standard deviations and the
  // rounding noise is (absmax / 127) / sqrt(12), so the relative error is about
  // sqrt(2 ln n) / (127 sqrt(12)) (measured on N(0,1) 1024x1024: 0.0076 per row, 0.0054 for
  // groups of 64; see tests/plugins/int8). Per-row scales are bounded for rows up to 2^20
  // columns; 10% margin (bf16 scales add ~0.1%).
  const double n = p.group_size > 0 ? static_cast<double>(p.group_size) : std::ldexp(1.0, 20);
  return 1.1 * std::sqrt(2.0 * std::log(std::max(n, 2.0))) / (kQMax * std::sqrt(12.0));
}

std::unique_ptr<QuantizedWeight> Int8Backend::quantize(const torch::Tensor& w,
                                                       const Json& options) const {
  check_input_matrix(w, "int8");
  const Int8Params p = parse_params(options);
  const int64_t out = w.size(0), in = w.size(1);
  torch::Tensor q = torch::empty({out, in}, w.options().dtype(torch::kInt8));
  torch::Tensor scale =
      torch::empty({out, p.groups_per_row(in)}, w.options().dtype(p.scale_scalar_type()));
  for_each_row_chunk(w, "int8", [&](int64_t r, int64_t e, const torch::Tensor& x) {
    // The codes are computed with the scale as stored (bf16-rounded), so dequantization
    // reproduces exactly what was measured here.
    const torch::Tensor s_store = (group_absmax(x, p.group_size) / kQMax).to(p.scale_scalar_type());
    const torch::Tensor s = s_store.to(torch::kFloat32);
    // An all-zero row/group has scale 0: divide by 1 instead (its values are 0 anyway).
    const torch::Tensor s_safe = torch::where(s > 0, s, torch::ones_like(s));
    q.slice(0, r, e).copy_((x / expand_groups(s_safe, p.group_size, in))
                               .round_()
                               .clamp_(-kQMax, kQMax)
                               .to(torch::kInt8));
    scale.slice(0, r, e).copy_(s_store);
  });
  return std::make_unique<Int8Weight>(p, std::move(q), std::move(scale));
}

std::unique_ptr<QuantizedWeight> Int8Backend::load(const TensorState& state) const {
  const StateHeader h = check_state_meta(state, "int8", kFormatVersion);
  const Int8Params p = parse_params(h.options, "int8 state meta.options");
  auto t = check_state_tensors(
      state, "int8",
      {{"weight", torch::kInt8, {h.out, h.in}},
       {"weight.scale", p.scale_scalar_type(), {h.out, p.groups_per_row(h.in)}}},
      h.describe(p.to_json()));
  return std::make_unique<Int8Weight>(p, t.at("weight"), t.at("weight.scale"));
}

}  // namespace qtune::int8
