// int8 backend: options, absmax quantization, on-the-fly dequantization, matmuls that apply the
// per-row scale after the product, and the plugin entry point (layout in int8.h).
#include "int8.h"

#include <algorithm>
#include <cmath>

#include "qtune/error.h"
#include "qtune/plugin.h"

namespace qtune::int8 {
namespace {

constexpr int kFormatVersion = 1;
constexpr double kQMax = 127.0;  // symmetric: -128 is never used, so q and -q both exist
// Rows quantized per step: about 1M elements of fp32 temporaries whatever the matrix size.
constexpr int64_t kChunkElems = int64_t{1} << 20;

// Scales [rows, G] of x [rows, in] expanded to [rows, in] (fp32).
torch::Tensor expand_scale(const torch::Tensor& s, int64_t group, int64_t in) {
  if (s.size(1) == 1) return s.expand({s.size(0), in});
  return s.repeat_interleave(group, 1).slice(1, 0, in);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

std::vector<OptionSpec> option_schema() {
  return {
      {"group_size", 0,
       "input columns sharing one scale (0 = one scale per output row); the last group of a row "
       "may be shorter"},
      {"scale_dtype", "fp32", "storage of the scales: fp32 or bf16"},
  };
}

Int8Params parse_params(const Json& options, const std::string& context) {
  const Json o = resolve_options(option_schema(), options, context);
  Int8Params p;
  const Json& g = o["group_size"];
  QTUNE_CHECK(g.get<int64_t>() >= 0 && g.get<int64_t>() <= (int64_t{1} << 30), context,
              ".group_size must be 0 (per row) or a positive integer <= 2^30, got ", g.dump());
  p.group_size = g.get<int64_t>();
  const Json& sd = o["scale_dtype"];
  QTUNE_CHECK(sd == "fp32" || sd == "bf16", context,
              ".scale_dtype must be one of \"fp32\", \"bf16\", got ", sd.dump());
  p.scale_dtype = sd.get<std::string>();
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
    w.mul_(expand_scale(s, params_.group_size, in));
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
  QTUNE_CHECK(w.defined() && w.dim() == 2, "int8: the weight must be a 2-D matrix [out, in], got ",
              w.defined() ? shape_str(w.sizes()) : std::string("an undefined tensor"));
  QTUNE_CHECK(w.is_floating_point(), "int8: the weight must be floating point, got ",
              c10::toString(w.scalar_type()));
  QTUNE_CHECK(w.numel() > 0, "int8: the weight ", shape_str(w.sizes()), " is empty");
  const Int8Params p = parse_params(options);
  torch::NoGradGuard no_grad;
  const int64_t out = w.size(0), in = w.size(1), groups = p.groups_per_row(in);
  const int64_t gsz = p.group_size > 0 ? p.group_size : in;
  torch::Tensor q = torch::empty({out, in}, w.options().dtype(torch::kInt8));
  torch::Tensor scale = torch::empty({out, groups}, w.options().dtype(p.scale_scalar_type()));

  const int64_t rows = std::max<int64_t>(1, kChunkElems / in);
  for (int64_t r = 0; r < out; r += rows) {
    const int64_t e = std::min(out, r + rows);
    const torch::Tensor x = w.slice(0, r, e).to(torch::kFloat32);
    QTUNE_CHECK(torch::isfinite(x).all().item<bool>(),
                "int8: the weight contains NaN or Inf values (rows ", r, "..", e - 1,
                "); cannot quantize it");
    torch::Tensor a = x.abs();
    if (groups * gsz != in)  // zero padding cannot change an absmax
      a = torch::constant_pad_nd(a, {0, groups * gsz - in});
    const torch::Tensor absmax = a.view({e - r, groups, gsz}).amax(2);
    // The codes are computed with the scale as stored (bf16-rounded), so dequantization
    // reproduces exactly what was measured here.
    const torch::Tensor s_store = (absmax / kQMax).to(p.scale_scalar_type());
    const torch::Tensor s = s_store.to(torch::kFloat32);
    // An all-zero row/group has scale 0: divide by 1 instead (its values are 0 anyway).
    const torch::Tensor s_safe = torch::where(s > 0, s, torch::ones_like(s));
    q.slice(0, r, e).copy_(
        (x / expand_scale(s_safe, gsz, in)).round_().clamp_(-kQMax, kQMax).to(torch::kInt8));
    scale.slice(0, r, e).copy_(s_store);
  }
  return std::make_unique<Int8Weight>(p, std::move(q), std::move(scale));
}

std::unique_ptr<QuantizedWeight> Int8Backend::load(const TensorState& state) const {
  const Json& m = state.meta;
  QTUNE_CHECK(m.is_object(), "int8 state: meta must be a JSON object, got ", m.dump());
  QTUNE_CHECK(m.contains("backend") && m["backend"] == "int8",
              "int8 state: meta.backend must be \"int8\", got ",
              m.contains("backend") ? m["backend"].dump() : std::string("nothing"));
  QTUNE_CHECK(m.contains("format_version") && m["format_version"] == kFormatVersion,
              "int8 state: meta.format_version must be ", kFormatVersion, ", got ",
              m.contains("format_version") ? m["format_version"].dump() : std::string("nothing"),
              " (re-quantize the model with this qtune)");
  const Json shape = m.contains("shape") ? m["shape"] : Json();
  QTUNE_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
                  shape[1].is_number_integer() && shape[0].get<int64_t>() > 0 &&
                  shape[1].get<int64_t>() > 0,
              "int8 state: meta.shape must be [out, in] with positive integers, got ",
              shape.dump());
  QTUNE_CHECK(m.contains("options"), "int8 state: meta.options is missing");
  const Int8Params p = parse_params(m["options"], "int8 state meta.options");
  const int64_t out = shape[0], in = shape[1];

  for (const auto& [key, _] : state.tensors)
    QTUNE_CHECK(key == "weight" || key == "weight.scale", "int8 state: unexpected tensor \"", key,
                "\" (expected weight, weight.scale)");
  auto get = [&](const std::string& key, torch::ScalarType dtype,
                 std::vector<int64_t> size) -> torch::Tensor {
    auto it = state.tensors.find(key);
    QTUNE_CHECK(it != state.tensors.end() && it->second.defined(), "int8 state: tensor \"", key,
                "\" is missing (expected weight, weight.scale)");
    const torch::Tensor& t = it->second;
    QTUNE_CHECK(t.scalar_type() == dtype, "int8 state: tensor \"", key, "\" must be ",
                c10::toString(dtype), ", got ", c10::toString(t.scalar_type()));
    QTUNE_CHECK(t.sizes() == torch::IntArrayRef(size), "int8 state: tensor \"", key,
                "\" must have shape ", shape_str(size), " for shape ", shape.dump(),
                " and these options, got ", shape_str(t.sizes()));
    return t.contiguous();
  };
  torch::Tensor q = get("weight", torch::kInt8, {out, in});
  torch::Tensor s = get("weight.scale", p.scale_scalar_type(), {out, p.groups_per_row(in)});
  QTUNE_CHECK(q.device() == s.device(), "int8 state: \"weight\" is on ", q.device().str(),
              " but \"weight.scale\" on ", s.device().str(), "; both must be on one device");
  return std::make_unique<Int8Weight>(p, std::move(q), std::move(s));
}

}  // namespace qtune::int8

QTUNE_QUANT_PLUGIN("int8", "1.0.0", qtune::int8::Int8Backend)
