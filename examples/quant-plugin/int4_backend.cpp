// The int4 example backend: options, quantize in row chunks, dequantize through the codec, state
// and a load() that validates everything (the SDK kit does the checking).
#include "int4_backend.h"

#include <cmath>

#include "int4_codec.h"
#include "qtune/plugin_kit.h"
#include "qtune/state_layout.h"

namespace int4_example {

using qtune::Json;

// ---- Int4Weight --------------------------------------------------------------------------------

Int4Weight::Int4Weight(int64_t group_size, int64_t in, torch::Tensor packed, torch::Tensor scale)
    : group_size_(group_size), in_(in), packed_(std::move(packed)), scale_(std::move(scale)) {}

torch::Tensor Int4Weight::dequantize(torch::ScalarType dtype, torch::Device device) const {
  return dequantize_rows(0, out_features(), dtype, device);
}

// The whole backend in one place: dequantize() and the default tiled linear/linear_grad_input
// all go through here (fp32, then one rounding to `dtype`), so they agree bit for bit.
torch::Tensor Int4Weight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                          torch::Device device) const {
  TORCH_CHECK(0 <= begin && begin <= end && end <= out_features(), "int4: rows [", begin, ", ", end,
              ") outside [0, ", out_features(), ")");
  return int4_example::dequantize_rows(packed_.slice(0, begin, end), scale_.slice(0, begin, end),
                                       group_size_, in_)
      .to(device, dtype);
}

qtune::TensorState Int4Weight::state() const {
  qtune::TensorState st;
  st.tensors = {{"weight", packed_}, {"weight.scale", scale_}};  // held, not copies
  st.meta = Json{{"backend", kName},
                 {"format_version", kFormatVersion},
                 {"shape", {out_features(), in_}},
                 {"options", {{"group_size", group_size_}}}};
  return st;
}

void Int4Weight::to(torch::Device device) {
  // set_data keeps the TensorImpl, so the handles state() gave out (module buffers) move too.
  for (torch::Tensor* t : {&packed_, &scale_})
    if (t->device() != device) t->set_data(t->to(device));
}

// ---- Int4Backend -------------------------------------------------------------------------------

std::vector<qtune::OptionSpec> Int4Backend::option_schema() const {
  return {{"group_size", 64,
           "input columns sharing one scale (0 = one scale per output row); the last group of a "
           "row may be shorter",
           0, int64_t{1} << 30}};
}

double Int4Backend::error_bound(const Json& options) const {
  const int64_t g = check_options(options, "quant.options")["group_size"];
  // The absmax of n Gaussian values is at most about sqrt(2 ln n) standard deviations and
  // rounding to a step of absmax / 7 adds noise of step / sqrt(12), so the relative error is
  // about sqrt(2 ln n) / (7 sqrt(12)). Per-row scales are bounded for rows up to 2^20 columns.
  // Measured on N(0, 1) 256x512 (tests/sdk/test_int4_example.cpp): 0.097 / 0.107 / 0.117 for
  // groups of 32 / 64 / 128, against bounds of 0.119 / 0.131 / 0.141.
  const double n = g > 0 ? static_cast<double>(g) : std::ldexp(1.0, 20);
  return 1.1 * std::sqrt(2.0 * std::log(std::max(n, 2.0))) / (kQMax * std::sqrt(12.0));
}

std::unique_ptr<qtune::QuantizedWeight> Int4Backend::quantize(const torch::Tensor& w,
                                                              const Json& options) const {
  qtune::check_input_matrix(w, kName);
  const int64_t group_size = check_options(options, "quant.options")["group_size"];
  const int64_t out = w.size(0), in = w.size(1);
  torch::Tensor packed = torch::empty({out, packed_cols(in)}, w.options().dtype(torch::kUInt8));
  torch::Tensor scale = torch::empty({out, qtune::groups_per_row(in, group_size)},
                                     w.options().dtype(torch::kFloat32));
  // About 1M elements of fp32 temporaries at a time, whatever the matrix size.
  qtune::for_each_row_chunk(w, kName, [&](int64_t r, int64_t e, const torch::Tensor& x) {
    auto [p, s] = quantize_rows(x, group_size);
    packed.slice(0, r, e).copy_(p);
    scale.slice(0, r, e).copy_(s);
  });
  return std::make_unique<Int4Weight>(group_size, in, std::move(packed), std::move(scale));
}

std::unique_ptr<qtune::QuantizedWeight> Int4Backend::load(const qtune::TensorState& state) const {
  const qtune::StateHeader h = qtune::check_state_meta(state, kName, kFormatVersion);
  const Json o = check_options(h.options, "int4 state meta.options");
  const int64_t group_size = o["group_size"];
  auto t = qtune::check_state_tensors(
      state, kName,
      {{"weight", torch::kUInt8, {h.out, packed_cols(h.in)}},
       {"weight.scale", torch::kFloat32, {h.out, qtune::groups_per_row(h.in, group_size)}}},
      h.describe(o));
  return std::make_unique<Int4Weight>(group_size, h.in, t.at("weight"), t.at("weight.scale"));
}

}  // namespace int4_example
