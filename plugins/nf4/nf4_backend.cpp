// Nf4Weight and Nf4Backend: options, quantize, state in bitsandbytes' key layout, load with
// validation, and the CPU linear that multiplies dequantized row tiles straight into its output.
#include "nf4_backend.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/plugin_kit.h"

namespace qtune::nf4 {

// ================================================================================================
// Helpers
// ================================================================================================

namespace {

constexpr const char* kOptionsContext = "quant.options";

bool is_pow2_in(int64_t v, int64_t lo, int64_t hi) {
  return v >= lo && v <= hi && (v & (v - 1)) == 0;
}

std::string dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kHalf:
      return "float16";
    case torch::kDouble:
      return "float64";
    default:
      return c10::toString(t);
  }
}

bool supported_float(torch::ScalarType t) {
  return t == torch::kFloat || t == torch::kBFloat16 || t == torch::kHalf || t == torch::kDouble;
}

std::vector<OptionSpec> schema() {
  return {
      {"block_size", 64, "elements per absmax block (a power of two; bitsandbytes' default is 64)",
       32, 4096},
      {"double_quant", true,
       "quantize the per-block absmax values again with the 8-bit dynamic code (QLoRA's double "
       "quantization, bitsandbytes compress_statistics)"},
      {"double_quant_block_size", 256,
       "absmax values per block of the double quantization (a power of two; 256 in "
       "bitsandbytes)",
       32, 4096},
  };
}

// Resolves (idempotent for resolved options) and checks the options: the schema declares the
// ranges, the powers of two are checked here.
Json checked_options(const Json& user, const std::string& context = kOptionsContext) {
  Json o = resolve_options(schema(), user, context);
  const int64_t bs = o["block_size"].get<int64_t>();
  QTUNE_CHECK(is_pow2_in(bs, 32, 4096), context,
              ".block_size must be a power of two in [32, 4096], got ", bs);
  const int64_t nbs = o["double_quant_block_size"].get<int64_t>();
  QTUNE_CHECK(is_pow2_in(nbs, 32, 4096), context,
              ".double_quant_block_size must be a power of two in [32, 4096], got ", nbs);
  return o;
}

torch::Tensor json_bytes(const Json& j) {
  const std::string s = j.dump();
  return torch::from_blob(const_cast<char*>(s.data()), {static_cast<int64_t>(s.size())},
                          torch::kUInt8)
      .clone();
}

bool same_storage(const torch::Tensor& a, const torch::Tensor& b) {
  return a.defined() && b.defined() && a.device() == b.device() && a.data_ptr() == b.data_ptr();
}

bool is_shared_table(const torch::Tensor& t) {
  return same_storage(t, shared_nf4_map()) || same_storage(t, shared_dynamic_map());
}

}  // namespace

// ================================================================================================
// Nf4Weight
// ================================================================================================

Nf4Weight::Nf4Weight(const Layout& layout, Packed packed, Json options, std::string source_dtype)
    : layout_(layout),
      packed_(std::move(packed)),
      options_(std::move(options)),
      source_dtype_(std::move(source_dtype)) {}

torch::Tensor Nf4Weight::quant_state_bytes() const {
  // bitsandbytes QuantState.as_dict(packed=True): the non-tensor items as JSON bytes. Rebuilt on
  // each call from a few scalars rather than held: per weight it would cost more than the
  // absmax codes of a small matrix.
  Json qs = {{"quant_type", "nf4"},
             {"blocksize", layout_.block_size},
             {"dtype", source_dtype_},
             {"shape", {layout_.out, layout_.in}}};
  if (layout_.double_quant) {
    qs["nested_blocksize"] = layout_.nested_block_size;
    qs["nested_dtype"] = "float32";
    qs["nested_offset"] = static_cast<double>(packed_.offset);
  }
  return json_bytes(qs).to(packed_.data.device());
}

bool Nf4Weight::cpu_kernel_ok(torch::ScalarType dtype) const {
  return packed_.data.is_cpu() && supported_float(dtype) && packed_.data.is_contiguous() &&
         packed_.absmax.is_contiguous() && packed_.quant_map.is_contiguous() &&
         (!layout_.double_quant ||
          (packed_.nested_absmax.is_contiguous() && packed_.nested_quant_map.is_contiguous()));
}

torch::Tensor Nf4Weight::dequantize(torch::ScalarType dtype, torch::Device device) const {
  return dequantize_rows(0, layout_.out, dtype, device);
}

torch::Tensor Nf4Weight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                         torch::Device device) const {
  QTUNE_CHECK(0 <= begin && begin <= end && end <= layout_.out, "nf4: rows [", begin, ", ", end,
              ") are out of range for a weight with ", layout_.out, " rows");
  QTUNE_CHECK(supported_float(dtype),
              "nf4: can dequantize to float32, bfloat16, float16 or "
              "float64, not ",
              c10::toString(dtype));
  if (cpu_kernel_ok(dtype)) {
    torch::Tensor out = torch::empty({end - begin, layout_.in}, torch::dtype(dtype));
    dequantize_rows_cpu(packed_, layout_, begin, end, out);
    return out.to(device);
  }
  return dequantize_rows_torch(packed_, layout_, begin, end, dtype).to(device);
}

torch::Tensor Nf4Weight::linear(const torch::Tensor& x) const {
  // The in-place mm_out below is not differentiable; QuantizedLinearFunction calls this with
  // grad mode off, a direct differentiable call takes the default (autograd-friendly) path.
  if (!x.is_cpu() || !cpu_kernel_ok(x.scalar_type()) ||
      (torch::GradMode::is_enabled() && x.requires_grad()))
    return QuantizedWeight::linear(x);
  QTUNE_CHECK(x.dim() >= 1 && x.size(-1) == layout_.in,
              "nf4 linear: input's last dimension must be ", layout_.in, ", got shape ", x.sizes());
  const int64_t out = layout_.out, tile = std::min(out, tile_rows());
  torch::Tensor x2 = x.reshape({-1, layout_.in});
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  // One reused tile buffer: no per-tile allocation (and no page faults on fresh memory).
  torch::Tensor buf = torch::empty({tile, layout_.in}, x.options());
  if (tile == out) {
    dequantize_rows_cpu(packed_, layout_, 0, out, buf);
    return torch::mm(x2, buf.t()).view(sizes);
  }
  torch::Tensor y = torch::empty({x2.size(0), out}, x.options());
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    torch::Tensor w = buf.narrow(0, 0, e - r);
    dequantize_rows_cpu(packed_, layout_, r, e, w);
    torch::Tensor y_cols = y.narrow(1, r, e - r);
    torch::mm_out(y_cols, x2, w.t());  // BLAS writes the column block in place (ldc = out)
  }
  return y.view(sizes);
}

torch::Tensor Nf4Weight::linear_grad_input(const torch::Tensor& g) const {
  // LibTorch's CPU bf16 GEMM without native bf16 support (no AVX-512 BF16) accumulates g @ W
  // in bf16: ~1% error on a 256-wide product. fp32 is as fast there and rounds once.
  if (g.is_cpu() && g.scalar_type() == torch::kBFloat16)
    return linear_grad_input(g.to(torch::kFloat32)).to(torch::kBFloat16);
  if (!g.is_cpu() || !cpu_kernel_ok(g.scalar_type()) ||
      (torch::GradMode::is_enabled() && g.requires_grad()))
    return QuantizedWeight::linear_grad_input(g);
  QTUNE_CHECK(g.dim() >= 1 && g.size(-1) == layout_.out,
              "nf4 linear_grad_input: gradient's last "
              "dimension must be ",
              layout_.out, ", got shape ", g.sizes());
  const int64_t out = layout_.out, tile = std::min(out, tile_rows());
  torch::Tensor g2 = g.reshape({-1, out});
  auto sizes = g.sizes().vec();
  sizes.back() = layout_.in;
  torch::Tensor buf = torch::empty({tile, layout_.in}, g.options());
  torch::Tensor gx;
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    torch::Tensor w = buf.narrow(0, 0, e - r);
    dequantize_rows_cpu(packed_, layout_, r, e, w);
    torch::Tensor g_cols = g2.narrow(1, r, e - r);
    if (gx.defined())
      gx.addmm_(g_cols, w);
    else
      gx = torch::mm(g_cols, w);
  }
  return gx.view(sizes);
}

TensorState Nf4Weight::state() const {
  TensorState s;
  s.tensors["weight"] = packed_.data;
  s.tensors["weight.absmax"] = packed_.absmax;
  s.tensors["weight.quant_map"] = packed_.quant_map;
  if (layout_.double_quant) {
    s.tensors["weight.nested_absmax"] = packed_.nested_absmax;
    s.tensors["weight.nested_quant_map"] = packed_.nested_quant_map;
  }
  s.tensors[kQuantStateKey] = quant_state_bytes();
  s.meta = {{"backend", "nf4"}, {"shape", {layout_.out, layout_.in}}, {"options", options_}};
  return s;
}

int64_t Nf4Weight::nbytes() const {
  // What this weight holds: its packed codes and absmax tensors and the double-quantization
  // offset. Not counted: the code tables every NF4 weight of the process shares (held once, like
  // the constants in bitsandbytes' kernels), and the quant_state JSON / meta, which state()
  // derives on demand from the layout.
  int64_t total = layout_.double_quant ? static_cast<int64_t>(sizeof(packed_.offset)) : 0;
  for (const auto& [key, t] : held_tensors(*this))
    if (!is_shared_table(t)) total += t.numel() * t.element_size();
  return total;
}

void Nf4Weight::to(torch::Device device) {
  // set_data swaps the storage of the very TensorImpl that state() handed out (and that a
  // QuantizedLinear registered as a buffer), so every handle sees the move.
  for (torch::Tensor* t : {&packed_.data, &packed_.absmax, &packed_.quant_map,
                           &packed_.nested_absmax, &packed_.nested_quant_map})
    if (t->defined() && t->device() != device) t->set_data(t->to(device));
}

// ================================================================================================
// Nf4Backend
// ================================================================================================

std::vector<OptionSpec> Nf4Backend::option_schema() const { return schema(); }

Json Nf4Backend::check_options(const Json& user, const std::string& context) const {
  return checked_options(user, context);
}

double Nf4Backend::error_bound(const Json& options) const {
  // Measured relative Frobenius error on N(0, 1) matrices (256 x 1024: 0.0874 at block 32,
  // 0.0919 at 64, ... 0.1095 at 4096; see tests/plugins/nf4) plus ~8% headroom. Larger blocks have
  // larger absmax relative to the bulk of the values, hence coarser steps. Double quantization adds
  // < 0.2% relative error.
  const Json o = checked_options(options);
  const int64_t bs = o["block_size"].get<int64_t>();
  const int lg = static_cast<int>(std::lround(std::log2(static_cast<double>(bs))));
  static const double kBound[8] = {0.095, 0.100, 0.104, 0.107, 0.110, 0.113, 0.116, 0.119};
  return kBound[std::clamp(lg - 5, 0, 7)];
}

std::unique_ptr<QuantizedWeight> Nf4Backend::quantize(const torch::Tensor& w,
                                                      const Json& options) const {
  return quantize_with(w, options, w.defined() && w.is_cpu());
}

std::unique_ptr<Nf4Weight> Nf4Backend::quantize_with(const torch::Tensor& w, const Json& options,
                                                     bool use_cpu_kernel,
                                                     int64_t chunk_elems) const {
  const Json o = checked_options(options);
  check_input_matrix(w, "nf4");
  QTUNE_CHECK(supported_float(w.scalar_type()),
              "nf4: the weight must be float32, bfloat16, float16 or float64, got ",
              c10::toString(w.scalar_type()));
  const Layout l =
      Layout::make(w.size(0), w.size(1), o["block_size"].get<int64_t>(),
                   o["double_quant"].get<bool>(), o["double_quant_block_size"].get<int64_t>());
  torch::NoGradGuard no_grad;
  const torch::Tensor src = w.detach();
  Packed p =
      use_cpu_kernel && src.is_cpu() ? quantize_cpu(src, l) : quantize_torch(src, l, chunk_elems);
  return std::make_unique<Nf4Weight>(l, std::move(p), o, dtype_name(w.scalar_type()));
}

namespace {

// Validation of one state tensor: present, right dtype and element count.
const torch::Tensor& expect_tensor(const TensorState& s, const std::string& key,
                                   torch::ScalarType dtype, int64_t numel, const std::string& why) {
  auto it = s.tensors.find(key);
  QTUNE_CHECK(it != s.tensors.end(), "nf4 state: missing tensor '", key, "' (", why, ")");
  const torch::Tensor& t = it->second;
  QTUNE_CHECK(t.defined(), "nf4 state: tensor '", key, "' is undefined");
  QTUNE_CHECK(t.scalar_type() == dtype, "nf4 state: tensor '", key, "' must be ",
              c10::toString(dtype), ", got ", c10::toString(t.scalar_type()));
  QTUNE_CHECK(t.numel() == numel, "nf4 state: tensor '", key, "' must hold ", numel, " elements (",
              why, "), got shape ", t.sizes());
  return t;
}

template <typename T>
T json_field(const Json& j, const char* key, const char* type_name) {
  QTUNE_CHECK(j.contains(key), "nf4 state: ", kQuantStateKey, " has no '", key, "'");
  try {
    return j.at(key).get<T>();
  } catch (const Json::exception&) {
    throw UserError(detail::concat("nf4 state: ", kQuantStateKey, ": '", key, "' must be ",
                                   type_name, ", got ", j.at(key).dump()));
  }
}

}  // namespace

std::unique_ptr<QuantizedWeight> Nf4Backend::load(const TensorState& state) const {
  const auto& tensors = state.tensors;
  // The packed JSON first: it says what the other tensors must be.
  auto qs_it = tensors.find(kQuantStateKey);
  if (qs_it == tensors.end()) {
    for (const auto& [key, _] : tensors)
      QTUNE_CHECK(key.rfind("weight.quant_state.", 0) != 0, "nf4 state: '", key,
                  "' is not an NF4 state (the nf4 backend reads ", kQuantStateKey, ")");
    throw UserError(detail::concat("nf4 state: missing tensor '", kQuantStateKey,
                                   "' (the packed quant_state JSON bitsandbytes writes)"));
  }
  const torch::Tensor qs_bytes = qs_it->second.to(torch::kCPU).contiguous();
  QTUNE_CHECK(qs_bytes.scalar_type() == torch::kUInt8 && qs_bytes.dim() == 1, "nf4 state: '",
              kQuantStateKey, "' must be a 1-D uint8 tensor of JSON bytes, got ",
              c10::toString(qs_bytes.scalar_type()), " ", qs_bytes.sizes());
  Json qs;
  try {
    qs = Json::parse(std::string(reinterpret_cast<const char*>(qs_bytes.data_ptr<uint8_t>()),
                                 static_cast<size_t>(qs_bytes.numel())));
  } catch (const Json::exception& e) {
    throw UserError(
        detail::concat("nf4 state: '", kQuantStateKey, "' is not valid JSON: ", e.what()));
  }
  QTUNE_CHECK(qs.is_object(), "nf4 state: '", kQuantStateKey, "' must hold a JSON object");
  const std::string quant_type = json_field<std::string>(qs, "quant_type", "a string");
  QTUNE_CHECK(quant_type == "nf4", "nf4 state: quant_type is '", quant_type, "', expected 'nf4'");
  const int64_t bs = json_field<int64_t>(qs, "blocksize", "an integer");
  QTUNE_CHECK(is_pow2_in(bs, 32, 4096),
              "nf4 state: blocksize must be a power of two in "
              "[32, 4096], got ",
              bs);
  const auto shape = json_field<std::vector<int64_t>>(qs, "shape", "a list of integers");
  QTUNE_CHECK(shape.size() == 2 && shape[0] > 0 && shape[1] > 0,
              "nf4 state: shape must be "
              "[out, in] with positive sizes, got ",
              qs["shape"].dump());
  const std::string source_dtype = json_field<std::string>(qs, "dtype", "a string");
  const bool dq = qs.contains("nested_blocksize") || qs.contains("nested_offset");
  int64_t nbs = 256;
  float offset = 0.0f;
  if (dq) {
    nbs = json_field<int64_t>(qs, "nested_blocksize", "an integer");
    QTUNE_CHECK(is_pow2_in(nbs, 32, 4096),
                "nf4 state: nested_blocksize must be a power of two "
                "in [32, 4096], got ",
                nbs);
    const double off = json_field<double>(qs, "nested_offset", "a number");
    QTUNE_CHECK(std::isfinite(off), "nf4 state: nested_offset must be finite, got ", off);
    offset = static_cast<float>(off);
    if (qs.contains("nested_dtype"))
      QTUNE_CHECK(qs["nested_dtype"] == "float32",
                  "nf4 state: nested_dtype must be 'float32', "
                  "got ",
                  qs["nested_dtype"].dump());
  }

  // Our own metadata, when present, must agree with bitsandbytes' quant_state.
  Json options = {{"block_size", bs}, {"double_quant", dq}, {"double_quant_block_size", nbs}};
  const Json& meta = state.meta;
  if (meta.is_object()) {
    if (meta.contains("backend"))
      QTUNE_CHECK(meta["backend"] == "nf4", "nf4 state: meta.backend is ", meta["backend"].dump(),
                  ", expected \"nf4\"");
    if (meta.contains("shape"))
      QTUNE_CHECK(meta["shape"] == Json(shape), "nf4 state: meta.shape ", meta["shape"].dump(),
                  " disagrees with the quant_state shape ", Json(shape).dump());
    if (meta.contains("options")) {
      const Json o = checked_options(meta["options"], "nf4 state meta.options");
      QTUNE_CHECK(o["block_size"] == bs && o["double_quant"] == dq &&
                      (!dq || o["double_quant_block_size"] == nbs),
                  "nf4 state: meta.options ", o.dump(), " disagree with the quant_state ",
                  qs.dump());
      options = o;
    }
  }

  const Layout l = Layout::make(shape[0], shape[1], bs, dq, nbs);
  std::set<std::string> expected = {"weight", "weight.absmax", "weight.quant_map", kQuantStateKey};
  if (dq) expected.insert({"weight.nested_absmax", "weight.nested_quant_map"});
  for (const auto& [key, _] : tensors) {
    if (expected.count(key)) continue;
    std::string list;
    for (const auto& k : expected) list += (list.empty() ? "" : ", ") + k;
    throw UserError(
        detail::concat("nf4 state: unexpected tensor '", key, "' (expected ", list, ")"));
  }

  const auto layout_why = detail::concat("shape [", l.out, ", ", l.in, "], blocksize ", bs);
  const torch::Tensor& data =
      expect_tensor(state, "weight", torch::kUInt8, l.packed_bytes(), "two 4-bit codes a byte");
  const torch::Device dev = data.device();
  // alias(): our own TensorImpl on the same storage, so to() on this weight moves only it.
  auto own = [&](const torch::Tensor& t) { return t.to(dev).contiguous().alias(); };
  Packed p;
  p.data = own(data).view({l.packed_bytes(), 1});
  p.absmax = own(expect_tensor(state, "weight.absmax", dq ? torch::kUInt8 : torch::kFloat, l.blocks,
                               "one per block of " + layout_why));
  const torch::Tensor& qmap =
      expect_tensor(state, "weight.quant_map", torch::kFloat, 16, "the 16 NF4 values");
  const float max_diff = (qmap.to(torch::kCPU) - shared_nf4_map()).abs().max().item<float>();
  // bitsandbytes' NF4 kernels ignore the stored map and use the constants; a map that is not
  // NF4 therefore means a corrupt or mislabelled file.
  QTUNE_CHECK(max_diff <= 1e-6f,
              "nf4 state: weight.quant_map does not hold the NF4 values "
              "(largest difference ",
              max_diff, ")");
  p.quant_map = dev.is_cpu() ? shared_nf4_map().alias() : shared_nf4_map().to(dev);
  if (dq) {
    p.nested_absmax = own(expect_tensor(state, "weight.nested_absmax", torch::kFloat,
                                        l.nested_blocks, "one per nested block"));
    QTUNE_CHECK(torch::isfinite(p.nested_absmax).all().item<bool>(),
                "nf4 state: weight.nested_absmax holds NaN or Inf");
    const torch::Tensor& code2 = expect_tensor(state, "weight.nested_quant_map", torch::kFloat, 256,
                                               "the 256-entry dynamic code");
    const bool canonical = code2.to(torch::kCPU).equal(shared_dynamic_map());
    p.nested_quant_map = canonical && dev.is_cpu() ? shared_dynamic_map().alias() : own(code2);
    p.offset = offset;
  } else {
    QTUNE_CHECK(torch::isfinite(p.absmax).all().item<bool>(),
                "nf4 state: weight.absmax holds NaN or Inf");
  }
  return std::make_unique<Nf4Weight>(l, std::move(p), options, source_dtype);
}

}  // namespace qtune::nf4
