// An out-of-tree qtune quantization backend, complete and minimal: symmetric 4-bit absmax
// quantization with one fp32 scale per group of `group_size` input columns (0 = one per row).
// It is built only against the installed SDK (find_package(qtune), qtune_add_plugin) and passes
// the conformance suite unchanged; docs/writing-a-plugin.md walks through it.
//
// Quantization of one group x[0..g): scale = max|x| / 7, q = round(x / scale) clamped to
// [-7, 7] (symmetric: -8 is never used, so q and -q both exist and zero is exact), W ≈ q * scale.
// Codes are stored offset by 8 (1..15) in nibbles, two per byte: column 2j in the low nibble,
// column 2j + 1 in the high one; an odd row is padded with the code for 0.
//
// State (format_version 1), W[out, in], G = ceil(in / group_size) (1 when group_size is 0):
//   "weight"        uint8 [out, ceil(in / 2)]  the packed codes, row-major
//   "weight.scale"  fp32  [out, G]             scale of each group (0 for an all-zero group)
//   meta {"backend": "int4", "format_version": 1, "shape": [out, in], "options": {"group_size"}}
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/plugin.h"
#include "qtune/quantized_weight.h"

namespace int4_example {

using qtune::Json;
using qtune::OptionSpec;
using qtune::shape_str;
using qtune::QuantizedWeight;
using qtune::TensorState;

constexpr const char* kName = "int4";
constexpr int kFormatVersion = 1;
constexpr double kQMax = 7.0;
constexpr int64_t kZeroCode = 8;  // the stored nibble of q = 0
// Rows quantized at a time: about 1M elements of fp32 temporaries whatever the matrix size.
constexpr int64_t kChunkElems = int64_t{1} << 20;

// ---- options
// -------------------------------------------------------------------------------------

std::vector<OptionSpec> option_schema() {
  return {{"group_size", 64,
           "input columns sharing one scale (0 = one scale per output row); the last group of a "
           "row may be shorter"}};
}

/// Resolved, checked group size. `context` prefixes key names in errors ("quant.options").
int64_t parse_group_size(const Json& options, const std::string& context) {
  const Json o = qtune::resolve_options(option_schema(), options, context);
  const int64_t g = o["group_size"].get<int64_t>();
  QTUNE_CHECK(g >= 0 && g <= (int64_t{1} << 30), context,
              ".group_size must be 0 (one scale per row) or a positive integer <= 2^30, got ", g);
  return g;
}

int64_t groups_per_row(int64_t group_size, int64_t in) {
  return group_size > 0 ? (in + group_size - 1) / group_size : 1;
}

// Scales [rows, G] expanded to [rows, in].
torch::Tensor expand_scale(const torch::Tensor& s, int64_t group_size, int64_t in) {
  if (s.size(1) == 1) return s.expand({s.size(0), in});
  return s.repeat_interleave(group_size, 1).slice(1, 0, in);
}

// ---- the weight
// ----------------------------------------------------------------------------------

class Int4Weight final : public QuantizedWeight {
 public:
  /// `packed` uint8 [out, ceil(in / 2)], `scale` fp32 [out, G], same device, already validated.
  Int4Weight(int64_t group_size, int64_t in, torch::Tensor packed, torch::Tensor scale)
      : group_size_(group_size), in_(in), packed_(std::move(packed)), scale_(std::move(scale)) {}

  std::string backend() const override { return kName; }
  int64_t out_features() const override { return packed_.size(0); }
  int64_t in_features() const override { return in_; }

  torch::Tensor dequantize(torch::ScalarType dtype, torch::Device device) const override {
    return dequantize_rows(0, out_features(), dtype, device);
  }

  // The whole backend in one place: unpack the nibbles of rows [begin, end), subtract the offset,
  // multiply by the expanded scale in fp32, then round once to `dtype`. dequantize() and the
  // default tiled linear/linear_grad_input all go through here, so they agree bit for bit.
  torch::Tensor dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                torch::Device device) const override {
    TORCH_CHECK(0 <= begin && begin <= end && end <= out_features(), "int4: rows [", begin, ", ",
                end, ") outside [0, ", out_features(), ")");
    const torch::Tensor b = packed_.slice(0, begin, end);
    const torch::Tensor codes =
        torch::stack({b.bitwise_and(15), b.bitwise_right_shift(4)}, -1)  // [rows, in/2, 2]
            .view({end - begin, 2 * packed_.size(1)})
            .slice(1, 0, in_);
    torch::Tensor w = codes.to(torch::kFloat32).sub_(static_cast<double>(kZeroCode));
    w.mul_(expand_scale(scale_.slice(0, begin, end), group_size_, in_));
    return w.to(device, dtype);
  }

  TensorState state() const override {
    TensorState st;
    st.tensors = {{"weight", packed_}, {"weight.scale", scale_}};
    st.meta = Json{{"backend", kName},
                   {"format_version", kFormatVersion},
                   {"shape", {out_features(), in_}},
                   {"options", {{"group_size", group_size_}}}};
    return st;
  }

  void to(torch::Device device) override {
    // set_data keeps the TensorImpl, so the handles state() gave out (module buffers) move too.
    for (torch::Tensor* t : {&packed_, &scale_})
      if (t->device() != device) t->set_data(t->to(device));
  }
  torch::Device device() const override { return packed_.device(); }

 private:
  int64_t group_size_;
  int64_t in_;
  torch::Tensor packed_;  // uint8 [out, ceil(in / 2)]
  torch::Tensor scale_;   // fp32 [out, G]
};

// ---- the backend (the plugin's factory)
// ----------------------------------------------------------

class Int4Backend final : public qtune::QuantBackend {
 public:
  std::string name() const override { return kName; }
  std::vector<OptionSpec> option_schema() const override { return int4_example::option_schema(); }

  double error_bound(const Json& options) const override {
    const int64_t g = parse_group_size(options, "quant.options");
    // The absmax of n Gaussian values is at most about sqrt(2 ln n) standard deviations and
    // rounding to a step of absmax / 7 adds noise of step / sqrt(12), so the relative error is
    // about sqrt(2 ln n) / (7 sqrt(12)). Per-row scales are bounded for rows up to 2^20 columns.
    // Measured on N(0, 1) 256x512 (tests/sdk/test_int4_example.cpp): 0.097 / 0.107 / 0.117 for
    // groups of 32 / 64 / 128, against bounds of 0.119 / 0.131 / 0.141.
    const double n = g > 0 ? static_cast<double>(g) : std::ldexp(1.0, 20);
    return 1.1 * std::sqrt(2.0 * std::log(std::max(n, 2.0))) / (kQMax * std::sqrt(12.0));
  }

  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w,
                                            const Json& options) const override {
    QTUNE_CHECK(w.defined() && w.dim() == 2,
                "int4: the weight must be a 2-D matrix [out, in], got ",
                w.defined() ? shape_str(w.sizes()) : std::string("an undefined tensor"));
    QTUNE_CHECK(w.is_floating_point(), "int4: the weight must be floating point, got ",
                c10::toString(w.scalar_type()));
    QTUNE_CHECK(w.numel() > 0, "int4: the weight ", shape_str(w.sizes()), " is empty");
    const int64_t group_size = parse_group_size(options, "quant.options");
    torch::NoGradGuard no_grad;
    const int64_t out = w.size(0), in = w.size(1), groups = groups_per_row(group_size, in);
    const int64_t gsz = group_size > 0 ? group_size : in, half = (in + 1) / 2;
    torch::Tensor packed = torch::empty({out, half}, w.options().dtype(torch::kUInt8));
    torch::Tensor scale = torch::empty({out, groups}, w.options().dtype(torch::kFloat32));

    const int64_t rows = std::max<int64_t>(1, kChunkElems / in);
    for (int64_t r = 0; r < out; r += rows) {
      const int64_t e = std::min(out, r + rows);
      const torch::Tensor x = w.slice(0, r, e).to(torch::kFloat32);
      QTUNE_CHECK(torch::isfinite(x).all().item<bool>(), "int4: the weight contains NaN or Inf ",
                  "(rows ", r, "..", e - 1, "); cannot quantize it");
      // Zero padding cannot change an absmax.
      const torch::Tensor a = torch::constant_pad_nd(x.abs(), {0, groups * gsz - in});
      const torch::Tensor s = a.view({e - r, groups, gsz}).amax(2).div_(kQMax);
      // An all-zero group has scale 0: divide by 1 instead (its values are 0 anyway).
      const torch::Tensor s_safe = torch::where(s > 0, s, torch::ones_like(s));
      torch::Tensor u = (x / expand_scale(s_safe, gsz, in))
                            .round_()
                            .clamp_(-kQMax, kQMax)
                            .add_(static_cast<double>(kZeroCode))
                            .to(torch::kUInt8);
      if (in % 2) u = torch::constant_pad_nd(u, {0, 1}, static_cast<double>(kZeroCode));
      const torch::Tensor pairs = u.view({e - r, half, 2});
      packed.slice(0, r, e).copy_(pairs.select(2, 0).bitwise_or(pairs.select(2, 1).mul(16)));
      scale.slice(0, r, e).copy_(s);
    }
    return std::make_unique<Int4Weight>(group_size, in, std::move(packed), std::move(scale));
  }

  std::unique_ptr<QuantizedWeight> load(const TensorState& state) const override {
    const Json& m = state.meta;
    auto field = [&](const char* key) {
      return m.is_object() && m.contains(key) ? m[key].dump() : std::string("nothing");
    };
    QTUNE_CHECK(m.is_object() && m.value("backend", Json()) == kName,
                "int4 state: meta.backend must be \"int4\", got ", field("backend"));
    QTUNE_CHECK(m.value("format_version", Json()) == kFormatVersion,
                "int4 state: meta.format_version must be ", kFormatVersion, ", got ",
                field("format_version"), " (re-quantize the model with this plugin)");
    const Json shape = m.value("shape", Json());
    QTUNE_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
                    shape[1].is_number_integer() && shape[0].get<int64_t>() > 0 &&
                    shape[1].get<int64_t>() > 0,
                "int4 state: meta.shape must be [out, in] with positive integers, got ",
                shape.dump());
    QTUNE_CHECK(m.contains("options"), "int4 state: meta.options is missing");
    const int64_t group_size = parse_group_size(m["options"], "int4 state meta.options");
    const int64_t out = shape[0], in = shape[1];

    for (const auto& [key, _] : state.tensors)
      QTUNE_CHECK(key == "weight" || key == "weight.scale", "int4 state: unexpected tensor \"", key,
                  "\" (expected weight, weight.scale)");
    auto get = [&](const std::string& key, torch::ScalarType dtype,
                   std::vector<int64_t> size) -> torch::Tensor {
      auto it = state.tensors.find(key);
      QTUNE_CHECK(it != state.tensors.end() && it->second.defined(), "int4 state: tensor \"", key,
                  "\" is missing (expected weight, weight.scale)");
      const torch::Tensor& t = it->second;
      QTUNE_CHECK(t.scalar_type() == dtype, "int4 state: tensor \"", key, "\" must be ",
                  c10::toString(dtype), ", got ", c10::toString(t.scalar_type()));
      QTUNE_CHECK(t.sizes() == torch::IntArrayRef(size), "int4 state: tensor \"", key,
                  "\" must have shape ", shape_str(size), " for shape ", shape.dump(),
                  " and group_size ", group_size, ", got ", shape_str(t.sizes()));
      return t.contiguous();
    };
    torch::Tensor packed = get("weight", torch::kUInt8, {out, (in + 1) / 2});
    torch::Tensor scale =
        get("weight.scale", torch::kFloat32, {out, groups_per_row(group_size, in)});
    QTUNE_CHECK(packed.device() == scale.device(), "int4 state: \"weight\" is on ",
                packed.device().str(), " but \"weight.scale\" on ", scale.device().str(),
                "; both must be on one device");
    return std::make_unique<Int4Weight>(group_size, in, std::move(packed), std::move(scale));
  }
};

}  // namespace int4_example

// The two exported symbols: the info record (ABI version, kind, name, version, LibTorch version,
// C++ ABI) that the registry checks first, and the factory.
QTUNE_QUANT_PLUGIN("int4", "1.0.0", int4_example::Int4Backend)
