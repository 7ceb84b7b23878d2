// The plugin author's kit: input checks, chunked quantization, group helpers and the
// scalar-reference harness (see qtune/plugin_kit.h).
#include "qtune/plugin_kit.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "qtune/error.h"

namespace qtune {

void check_input_matrix(const torch::Tensor& w, const std::string& backend, bool allow_empty) {
  QTUNE_CHECK(w.defined(), backend, ": the weight to quantize is an undefined tensor");
  QTUNE_CHECK(w.dim() == 2, backend, ": the weight must be a 2-D matrix [out, in], got a ",
              w.dim(), "-D tensor ", shape_str(w.sizes()));
  QTUNE_CHECK(w.is_floating_point(), backend,
              ": the weight must be floating point (float32, bfloat16, float16 or float64), got ",
              c10::toString(w.scalar_type()));
  QTUNE_CHECK(allow_empty || w.numel() > 0, backend, ": the weight ", shape_str(w.sizes()),
              " is empty");
}

void for_each_row_chunk(
    const torch::Tensor& w, const std::string& backend,
    const std::function<void(int64_t begin, int64_t end, const torch::Tensor& rows)>& fn,
    int64_t chunk_elems, int64_t row_multiple) {
  torch::NoGradGuard no_grad;
  const int64_t out = w.size(0), in = std::max<int64_t>(1, w.size(1));
  const int64_t step = std::max<int64_t>(1, row_multiple);
  const int64_t rows = std::max<int64_t>(1, chunk_elems / in / step) * step;
  for (int64_t r = 0; r < out; r += rows) {
    const int64_t e = std::min(out, r + rows);
    const torch::Tensor x = w.slice(0, r, e).to(torch::kFloat32).contiguous();
    QTUNE_CHECK(torch::isfinite(x).all().item<bool>(), backend,
                ": the weight contains NaN or Inf (rows ", r, "..", e - 1, "); cannot quantize it");
    fn(r, e, x);
  }
}

int64_t groups_per_row(int64_t in, int64_t group_size) {
  return group_size > 0 ? (in + group_size - 1) / group_size : 1;
}

torch::Tensor group_absmax(const torch::Tensor& x, int64_t group_size) {
  const int64_t rows = x.size(0), in = x.size(1), groups = groups_per_row(in, group_size);
  if (groups == 1) return x.abs().amax(1, /*keepdim=*/true);
  // Zero padding cannot change an absmax.
  torch::Tensor a = x.abs();
  if (groups * group_size != in) a = torch::constant_pad_nd(a, {0, groups * group_size - in});
  return a.view({rows, groups, group_size}).amax(2);
}

torch::Tensor expand_groups(const torch::Tensor& s, int64_t group_size, int64_t in) {
  if (s.size(1) == 1) return s.expand({s.size(0), in});
  return s.repeat_interleave(group_size, 1).slice(1, 0, in);
}

namespace {

double normalised_error(const torch::Tensor& ref, const torch::Tensor& got) {
  const torch::Tensor r = ref.to(torch::kDouble), g = got.to(torch::kDouble);
  const double denom = r.norm().item<double>();
  return (r - g).norm().item<double>() / (denom > 0 ? denom : 1.0);
}

// "" when `got` equals `want` element by element within `tol`, else the first difference.
std::string first_difference(const std::string& what, const torch::Tensor& want,
                             const torch::Tensor& got, double tol) {
  if (got.sizes() != want.sizes())
    return detail::concat(what, " has shape ", shape_str(got.sizes()), ", the reference ",
                          shape_str(want.sizes()));
  const torch::Tensor diff = (got.to(torch::kDouble) - want.to(torch::kDouble)).abs();
  const torch::Tensor bad = diff.gt(tol).logical_or(diff.isnan());
  if (!bad.any().item<bool>()) return "";
  const torch::Tensor idx = bad.nonzero()[0];
  std::ostringstream os;
  os.precision(9);
  os << what << "[" << idx[0].item<int64_t>() << ", " << idx[1].item<int64_t>()
     << "] = " << got.index({idx[0], idx[1]}).item<double>() << ", the reference says "
     << want.index({idx[0], idx[1]}).item<double>() << " (" << bad.sum().item<int64_t>()
     << " elements differ";
  if (tol > 0) os << " by more than " << tol;
  os << ")";
  return os.str();
}

}  // namespace

std::string compare_to_reference(const QuantizedWeight& w, const torch::Tensor& expected,
                                 double tol) {
  torch::NoGradGuard no_grad;
  const torch::Tensor ref = expected.to(torch::kCPU, torch::kFloat32);
  const int64_t out = w.out_features(), in = w.in_features();
  if (ref.dim() != 2 || ref.size(0) != out || ref.size(1) != in)
    return detail::concat("the reference has shape ", shape_str(ref.sizes()), ", the weight is [",
                          out, ", ", in, "]");
  const torch::Tensor deq = w.dequantize(torch::kFloat32, torch::kCPU);
  if (auto d = first_difference("dequantize(fp32)", ref, deq, tol); !d.empty()) return d;
  const torch::Tensor deq_bf16 = w.dequantize(torch::kBFloat16, torch::kCPU);
  if (deq_bf16.scalar_type() != torch::kBFloat16) return "dequantize(bf16) is not bfloat16";
  // bf16 is the fp32 result rounded once (to within tol when tol > 0).
  if (auto d =
          first_difference("dequantize(bf16)", deq.to(torch::kBFloat16), deq_bf16,
                           tol > 0 ? tol + std::ldexp(deq.abs().max().item<double>(), -8) : 0.0);
      !d.empty())
    return d + " (bf16 must be the fp32 dequantization rounded once)";
  for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{
           {0, out}, {0, std::min<int64_t>(out, 1)}, {out / 2, out}, {out / 3, out / 3}}) {
    const torch::Tensor rows = w.dequantize_rows(b, e, torch::kFloat32, torch::kCPU);
    if (!(rows.sizes() == deq.slice(0, b, e).sizes() && rows.equal(deq.slice(0, b, e))))
      return detail::concat("dequantize_rows(", b, ", ", e,
                            ") differs from rows [b, e) of dequantize()");
  }
  const torch::Tensor x = torch::randn({3, in});
  const double ey = normalised_error(torch::matmul(x, ref.t()), w.linear(x));
  if (!(ey <= 1e-5 + tol))
    return detail::concat("linear(x) differs from x @ reference^T: normalised error ", ey);
  const torch::Tensor g = torch::randn({3, out});
  const double eg = normalised_error(torch::matmul(g, ref), w.linear_grad_input(g));
  if (!(eg <= 1e-5 + tol))
    return detail::concat("linear_grad_input(g) differs from g @ reference: normalised error ", eg);
  return "";
}

}  // namespace qtune
