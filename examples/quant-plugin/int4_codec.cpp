// The int4 example's codec (format in int4_codec.h): plain tensor ops, one pass per row block.
#include "int4_codec.h"

#include "qtune/plugin_kit.h"

namespace int4_example {

std::pair<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x, int64_t group_size) {
  const int64_t rows = x.size(0), in = x.size(1);
  const torch::Tensor s = qtune::group_absmax(x, group_size).div_(kQMax);
  // An all-zero group has scale 0: divide by 1 instead (its values are 0 anyway).
  const torch::Tensor s_safe = torch::where(s > 0, s, torch::ones_like(s));
  torch::Tensor u = (x / qtune::expand_groups(s_safe, group_size, in))
                        .round_()
                        .clamp_(-kQMax, kQMax)
                        .add_(static_cast<double>(kZeroCode))
                        .to(torch::kUInt8);
  if (in % 2) u = torch::constant_pad_nd(u, {0, 1}, static_cast<double>(kZeroCode));
  const torch::Tensor pairs = u.view({rows, packed_cols(in), 2});
  return {pairs.select(2, 0).bitwise_or(pairs.select(2, 1).mul(16)), s};
}

torch::Tensor dequantize_rows(const torch::Tensor& packed, const torch::Tensor& scale,
                              int64_t group_size, int64_t in) {
  const int64_t rows = packed.size(0);
  const torch::Tensor codes =
      torch::stack({packed.bitwise_and(15), packed.bitwise_right_shift(4)}, -1)  // [rows, in/2, 2]
          .view({rows, 2 * packed.size(1)})
          .slice(1, 0, in);
  torch::Tensor w = codes.to(torch::kFloat32).sub_(static_cast<double>(kZeroCode));
  return w.mul_(qtune::expand_groups(scale, group_size, in));
}

}  // namespace int4_example
