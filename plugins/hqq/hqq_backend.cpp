// HqqWeight and HqqBackend: the weight's tensors and dequantization (CPU kernel or tensor ops),
// quantize in parallel chunks of groups, state and load (layout in hqq_codec.h).
#include "hqq_backend.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "hqq_kernels.h"
#include "qtune/error.h"
#include "qtune/plugin_kit.h"
#include "qtune/state_layout.h"

namespace qtune::hqq {
namespace {

constexpr int kFormatVersion = 1;
// Elements of W handled per solver chunk (about 1 MB of fp32 per temporary): bounds the solver's
// memory whatever the matrix size, and is the unit of CPU parallelism.
constexpr int64_t kChunkElems = int64_t{1} << 18;

}  // namespace

// ---------------------------------------------------------------------------------------------
// HqqWeight

namespace {

// The tensors of a weight with these options, given G groups and Np padded elements.
std::vector<TensorSpec> key_specs(const HqqParams& p, int64_t groups, int64_t padded) {
  std::vector<TensorSpec> keys{{"W_q", torch::kUInt8, {packed_bytes(padded, p.nbits)}}};
  const int64_t nb = ceil_div(groups, kMetaGroup);
  for (const std::string name : {"scale", "zero"}) {
    const bool q = name == "scale" ? p.quant_scale : p.quant_zero;
    if (q) {
      keys.push_back({name + "_q", torch::kUInt8, {groups}});
      keys.push_back({name + "_q.scale", torch::kFloat32, {nb}});
      keys.push_back({name + "_q.zero", torch::kFloat32, {nb}});
    } else {
      keys.push_back({name, p.meta_scalar_type(), {groups}});
    }
  }
  return keys;
}

}  // namespace

HqqWeight::HqqWeight(int64_t out, int64_t in, HqqParams params,
                     std::map<std::string, torch::Tensor> t)
    : out_(out), in_(in), params_(std::move(params)), tensors_(std::move(t)) {
  group_ = params_.effective_group(out_, in_);
  groups_ = ceil_div(out_ * in_, group_);
}

torch::Tensor HqqWeight::decode_meta(const std::string& key, int64_t k0, int64_t k1) const {
  auto it = tensors_.find(key);
  if (it != tensors_.end()) return it->second.slice(0, k0, k1).to(torch::kFloat32);
  const int64_t b0 = k0 / kMetaGroup, b1 = ceil_div(k1, kMetaGroup);
  const int64_t off = k0 - b0 * kMetaGroup;
  auto expand = [&](const torch::Tensor& t) {
    return t.slice(0, b0, b1).repeat_interleave(kMetaGroup).slice(0, off, off + (k1 - k0));
  };
  // Same fp32 expression as store_q8, so the decoded values are bit-identical.
  return (tensors_.at(key + "_q").slice(0, k0, k1).to(torch::kFloat32) -
          expand(tensors_.at(key + "_q.zero"))) *
         expand(tensors_.at(key + "_q.scale"));
}

std::pair<torch::Tensor, torch::Tensor> HqqWeight::group_params(int64_t k0, int64_t k1) const {
  return {decode_meta("scale", k0, k1), decode_meta("zero", k0, k1)};
}

torch::Tensor HqqWeight::dequantize_flat(int64_t f0, int64_t f1) const {
  const torch::Tensor& wq = tensors_.at("W_q");
  const int nbits = params_.nbits;
  if (params_.axis == 1) {
    // Widen to whole groups (the padded stream always holds them), dequantize as [groups, g].
    const int64_t k0 = f0 / group_, k1 = ceil_div(f1, group_);
    torch::Tensor w = unpack_codes(wq, nbits, k0 * group_, k1 * group_)
                          .to(torch::kFloat32)
                          .view({k1 - k0, group_});
    auto [s, z] = group_params(k0, k1);
    w.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1));
    return w.view(-1).slice(0, f0 - k0 * group_, f1 - k0 * group_);
  }
  // axis 0: flat element f belongs to group f % G. Split [f0, f1) at multiples of G: whole
  // stretches of G broadcast the full scale/zero vectors, the partial ends slice them.
  const int64_t G = groups_;
  // Not a structured binding: clang before 16 cannot capture one in the lambda below.
  const auto params = group_params(0, G);
  const torch::Tensor& s = params.first;
  const torch::Tensor& z = params.second;
  std::vector<torch::Tensor> parts;
  int64_t f = f0;
  auto partial = [&](int64_t a, int64_t b) {
    const int64_t c = a % G;
    parts.push_back(unpack_codes(wq, nbits, a, b)
                        .to(torch::kFloat32)
                        .sub_(z.slice(0, c, c + (b - a)))
                        .mul_(s.slice(0, c, c + (b - a))));
  };
  if (f % G != 0) {
    const int64_t e = std::min(f1, (f / G + 1) * G);
    partial(f, e);
    f = e;
  }
  const int64_t full = (f1 - f) / G;
  if (full > 0) {
    parts.push_back(unpack_codes(wq, nbits, f, f + full * G)
                        .to(torch::kFloat32)
                        .view({full, G})
                        .sub_(z.unsqueeze(0))
                        .mul_(s.unsqueeze(0))
                        .view(-1));
    f += full * G;
  }
  if (f < f1) partial(f, f1);
  if (parts.empty()) return torch::empty({0}, torch::kFloat32);  // an empty range of rows
  return parts.size() == 1 ? parts[0] : torch::cat(parts);
}

torch::Tensor HqqWeight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                         torch::Device device) const {
  TORCH_CHECK(0 <= begin && begin <= end && end <= out_, "hqq: rows [", begin, ", ", end,
              ") outside [0, ", out_, ")");
  const int64_t f0 = begin * in_, f1 = end * in_;
  if (!use_cpu_kernel() || f0 == f1)
    return dequantize_flat(f0, f1).view({end - begin, in_}).to(device, dtype);
  const int64_t k0 = f0 / group_, k1 = ceil_div(f1, group_);
  auto [s, z] = group_params(k0, k1);
  s = s.contiguous();
  z = z.contiguous();
  const bool bf16 = dtype == torch::kBFloat16;
  torch::Tensor w = torch::empty(
      {end - begin, in_}, torch::TensorOptions().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const torch::Tensor& wq = tensors_.at("W_q");
  const uint8_t* packed = wq.data_ptr<uint8_t>();
  if (bf16)
    dequant_axis1_cpu(packed, wq.numel(), params_.nbits, group_, s.data_ptr<float>(),
                      z.data_ptr<float>(), f0, f1, simd_, w.data_ptr<c10::BFloat16>());
  else
    dequant_axis1_cpu(packed, wq.numel(), params_.nbits, group_, s.data_ptr<float>(),
                      z.data_ptr<float>(), f0, f1, simd_, w.data_ptr<float>());
  return w.to(device, dtype);
}

bool HqqWeight::use_cpu_kernel() const {
  return params_.axis == 1 && device().is_cpu() && !force_tensor_ops_;
}

torch::Tensor HqqWeight::dequantize(torch::ScalarType dtype, torch::Device device) const {
  // The CPU kernel writes fp32/bf16 straight into the result; otherwise row tiles bound the
  // fp32 temporary to one tile beside the result.
  const bool direct = use_cpu_kernel() && (dtype == torch::kFloat32 || dtype == torch::kBFloat16);
  const int64_t tile = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, in_));
  if (direct || tile >= out_) return dequantize_rows(0, out_, dtype, device);
  torch::Tensor w = torch::empty({out_, in_}, tensors_.at("W_q").options().dtype(dtype));
  for (int64_t r = 0; r < out_; r += tile) {
    const int64_t e = std::min(out_, r + tile);
    w.slice(0, r, e).copy_(dequantize_rows(r, e, dtype, w.device()));
  }
  return w.to(device);
}

TensorState HqqWeight::state() const {
  TensorState st;
  st.tensors = tensors_;
  st.meta = Json{{"backend", "hqq"},      {"format_version", kFormatVersion},
                 {"shape", {out_, in_}},  {"options", params_.to_json()},
                 {"num_groups", groups_}, {"padded_numel", groups_ * group_}};
  return st;
}

void HqqWeight::to(torch::Device device) {
  // set_data keeps each TensorImpl, so handles taken from state() (module buffers) move too.
  for (auto& [_, t] : tensors_)
    if (t.device() != device) t.set_data(t.to(device));
}

// ---------------------------------------------------------------------------------------------
// HqqBackend

Json HqqBackend::check_options(const Json& user, const std::string& context) const {
  return parse_params(user, context).to_json();
}

double HqqBackend::error_bound(const Json& options) const {
  const HqqParams p = parse_params(options);
  // Min/max quantization of a group of g Gaussian values has a range of about 2*sqrt(2 ln g)
  // standard deviations, and uniform rounding noise of range / (2^nbits - 1) / sqrt(12); so the
  // relative error is about k * sqrt(2 ln g) with k = 2 / ((2^nbits - 1) sqrt(12)). Measured on
  // N(0,1) 256x4096 (HqqMeasure.DISABLED_GroupTable, g = 8..4096) the ratio error/sqrt(2 ln g)
  // grows towards that k from below (4-bit: 0.024 at g=8, 0.031 at g=64, 0.034 at g=4096;
  // k = 0.0385). 2-bit is past the uniform-noise regime: measured up to 0.174, we use 0.19.
  // The solver only lowers the error; 8-bit meta codes add < 1%. Margin: 10% over k.
  // group_size 0 (whole rows or columns of unknown length) is bounded for up to 2^20 elements.
  const double k = p.nbits == 2 ? 0.19 : 2.0 / (p.max_code() * std::sqrt(12.0));
  const double g = p.group_size > 0 ? static_cast<double>(p.group_size) : std::ldexp(1.0, 20);
  return 1.1 * k * std::sqrt(2.0 * std::log(std::max(g, 2.0)));
}

std::unique_ptr<QuantizedWeight> HqqBackend::quantize(const torch::Tensor& w,
                                                      const Json& options) const {
  check_input_matrix(w, "hqq");
  const HqqParams p = parse_params(options);
  const int64_t out = w.size(0), in = w.size(1), n = out * in;
  const int64_t g = p.effective_group(out, in), groups = ceil_div(n, g), padded = groups * g;
  const auto dev = w.device();
  torch::NoGradGuard no_grad;

  // Output tensors, filled chunk by chunk (chunks start at multiples of kMetaGroup groups, so
  // 8-bit meta blocks and packing blocks never straddle two chunks). Chunks run in parallel and
  // only read the map (.at(), never operator[]), each writing its own slices.
  std::map<std::string, torch::Tensor> t;
  for (const auto& k : key_specs(p, groups, padded))
    t[k.key] = torch::zeros(k.shape, torch::TensorOptions().dtype(k.dtype).device(dev));
  auto store = [&](const std::string& name, const MetaStore& m, int64_t k0, int64_t k1) {
    if (m.plain.defined()) {
      t.at(name).slice(0, k0, k1).copy_(m.plain);
      return;
    }
    t.at(name + "_q").slice(0, k0, k1).copy_(m.q);
    const int64_t b0 = k0 / kMetaGroup;
    t.at(name + "_q.scale").slice(0, b0, b0 + m.scale.numel()).copy_(m.scale);
    t.at(name + "_q.zero").slice(0, b0, b0 + m.zero.numel()).copy_(m.zero);
  };
  auto finite = [](const torch::Tensor& x) {
    QTUNE_CHECK(torch::isfinite(x).all().item<bool>(),
                "hqq: the weight contains NaN or Inf values; cannot quantize it");
  };

  const int64_t chunk =
      std::max<int64_t>(1, kChunkElems / (g * kMetaGroup)) * kMetaGroup;  // groups per chunk
  const int64_t nchunks = ceil_div(groups, chunk);
  const torch::Tensor flat = w.reshape(-1);
  torch::Tensor padded_view;  // axis 0: the [g, G] reshape of the padded stream
  torch::Tensor codes_all;    // axis 0: unpacked codes, packed at the end
  if (p.axis == 0) {
    if (padded == n) {
      padded_view = flat.view({g, groups});
    } else {
      // Pad element f with element f - G (same column of the reshape, hence the same group).
      torch::Tensor xp = torch::empty({padded}, flat.options().dtype(torch::kFloat32));
      xp.slice(0, 0, n).copy_(flat);
      for (int64_t f = n; f < padded; f += groups) {
        const int64_t e = std::min(padded, f + groups);
        xp.slice(0, f, e).copy_(xp.slice(0, f - groups, e - groups));
      }
      padded_view = xp.view({g, groups});
    }
    codes_all = torch::empty({padded}, torch::TensorOptions().dtype(torch::kUInt8).device(dev));
  }

  auto run_chunk = [&](int64_t i) {
    const int64_t k0 = i * chunk, k1 = std::min(groups, k0 + chunk);
    torch::Tensor x;
    if (p.axis == 1) {
      x = flat.slice(0, k0 * g, std::min(n, k1 * g)).to(torch::kFloat32);
      if (k1 * g > n)  // the last group: pad with its last real element
        x = torch::cat({x, x.slice(0, x.numel() - 1).expand({k1 * g - n})});
      x = x.view({k1 - k0, g});
    } else {
      x = padded_view.slice(1, k0, k1).to(torch::kFloat32).t().contiguous();
    }
    finite(x);
    const GroupQuant gq = quantize_groups(x, p);
    store("scale", gq.scale, k0, k1);
    store("zero", gq.zero, k0, k1);
    if (p.axis == 1) {
      const PackBlock blk = pack_block(p.nbits);
      const torch::Tensor packed = pack_codes(gq.codes, p.nbits);
      const int64_t off = k0 * g / blk.codes * blk.bytes;
      t.at("W_q").slice(0, off, off + packed.numel()).copy_(packed);
    } else {
      codes_all.view({g, groups}).slice(1, k0, k1).copy_(gq.codes.t());
    }
  };
  if (dev.is_cpu()) {
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) run_chunk(i);
    });
  } else {
    for (int64_t i = 0; i < nchunks; ++i) run_chunk(i);
  }
  if (p.axis == 0) t["W_q"] = pack_codes(codes_all, p.nbits);
  return std::make_unique<HqqWeight>(out, in, p, std::move(t));
}

std::unique_ptr<QuantizedWeight> HqqBackend::load(const TensorState& state) const {
  const StateHeader h = check_state_meta(state, "hqq", kFormatVersion);
  const HqqParams p = parse_params(h.options, "hqq state meta.options");
  const int64_t g = p.effective_group(h.out, h.in), groups = ceil_div(h.out * h.in, g);
  const std::string context = h.describe(p.to_json());
  check_state_meta_int(state, "hqq", "num_groups", groups, context);
  check_state_meta_int(state, "hqq", "padded_numel", groups * g, context);
  auto t = check_state_tensors(state, "hqq", key_specs(p, groups, groups * g), context);
  return std::make_unique<HqqWeight>(h.out, h.in, p, std::move(t));
}

}  // namespace qtune::hqq
