// Default QuantizedWeight methods: row-tiled dequantize-then-matmul, and nbytes from state().
#include "qtune/quantized_weight.h"

#include <algorithm>

namespace qtune {

int64_t QuantizedWeight::tile_rows() const {
  // ~8 MB of fp32 W per tile: big enough for an efficient GEMM, small enough that the transient
  // copy is noise next to activations. A small matrix is one tile.
  const int64_t per_row = std::max<int64_t>(1, in_features()) * 4;
  return std::max<int64_t>(64, (int64_t{8} << 20) / per_row);
}

torch::Tensor QuantizedWeight::dequantize_rows(int64_t begin, int64_t end, torch::ScalarType dtype,
                                               torch::Device device) const {
  return dequantize(dtype, device).slice(0, begin, end).contiguous();
}

namespace {

// The dtype the default products are computed in. On the CPU a bf16/fp16 GEMM without native
// support rounds along the way (1.1% relative error on a 5x256x256 product on a machine without
// AVX-512), more than one rounding of the result; fp32 there is as fast and rounds once. GPUs
// accumulate reduced-precision products in fp32 themselves.
torch::ScalarType compute_dtype(const torch::Tensor& x) {
  return x.device().is_cpu() ? torch::promote_types(x.scalar_type(), torch::kFloat32)
                             : x.scalar_type();
}

}  // namespace

torch::Tensor QuantizedWeight::linear(const torch::Tensor& x) const {
  const int64_t out = out_features(), tile = tile_rows();
  const auto dt = compute_dtype(x);
  const torch::Tensor xc = x.to(dt);
  if (tile >= out) return torch::matmul(xc, dequantize(dt, x.device()).t()).to(x.scalar_type());
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  torch::Tensor y = torch::empty(sizes, x.options());
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    y.narrow(-1, r, e - r).copy_(torch::matmul(xc, dequantize_rows(r, e, dt, x.device()).t()));
  }
  return y;
}

torch::Tensor QuantizedWeight::linear_grad_input(const torch::Tensor& g) const {
  const int64_t out = out_features(), tile = tile_rows();
  const auto dt = compute_dtype(g);
  const torch::Tensor gc = g.to(dt);
  if (tile >= out) return torch::matmul(gc, dequantize(dt, g.device())).to(g.scalar_type());
  // The tiles' partial products are summed in the compute dtype, and rounded once at the end.
  torch::Tensor gx;
  for (int64_t r = 0; r < out; r += tile) {
    const int64_t e = std::min(out, r + tile);
    auto part = torch::matmul(gc.narrow(-1, r, e - r), dequantize_rows(r, e, dt, g.device()));
    if (gx.defined())
      gx.add_(part);
    else
      gx = part;
  }
  return gx.to(g.scalar_type());
}

std::map<std::string, torch::Tensor> held_tensors(const QuantizedWeight& w) {
  TensorState a = w.state(), b = w.state();
  std::map<std::string, torch::Tensor> out;
  for (auto& [key, t] : a.tensors) {
    auto it = b.tensors.find(key);
    if (it != b.tensors.end() && t.defined() && it->second.defined() &&
        t.storage().unsafeGetStorageImpl() == it->second.storage().unsafeGetStorageImpl())
      out[key] = t;
  }
  return out;
}

int64_t QuantizedWeight::nbytes() const {
  int64_t total = 0;
  for (const auto& [_, t] : held_tensors(*this)) total += t.numel() * t.element_size();
  return total;
}

}  // namespace qtune
