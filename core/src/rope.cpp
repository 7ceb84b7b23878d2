// Rotary inverse frequencies for the rope types of HF config.json (see rope.h). The formulas are
// transformers' (src/transformers/modeling_rope_utils.py: _compute_default_rope_parameters,
// _compute_linear_scaling_rope_parameters, _compute_dynamic_ntk_parameters,
// _compute_llama3_parameters), evaluated in fp64.
#include "qtune/rope.h"

#include <algorithm>
#include <cmath>

namespace qtune {

namespace {

torch::Tensor default_inv_freq(double base, int64_t dim) {
  return 1.0 /
         torch::pow(base, torch::arange(0, dim, 2, torch::kFloat64) / static_cast<double>(dim));
}

}  // namespace

bool rope_depends_on_length(const ModelConfig& config) {
  return config.rope_scaling.type == "dynamic";
}

torch::Tensor rope_inv_freq(const ModelConfig& c, int64_t seq_len) {
  const int64_t dim = c.head_dim();
  const RopeScaling& r = c.rope_scaling;
  if (r.type == "linear") return default_inv_freq(c.rope_theta, dim) / r.factor;
  if (r.type == "dynamic") {
    // NTK-aware: within the trained context nothing changes; beyond it the base grows so the
    // lowest frequency still spans the sequence.
    const double max_pos = static_cast<double>(c.max_position_embeddings);
    const double len = std::max(static_cast<double>(seq_len), max_pos);
    const double base =
        c.rope_theta * std::pow(r.factor * len / max_pos - (r.factor - 1.0),
                                static_cast<double>(dim) / static_cast<double>(dim - 2));
    return default_inv_freq(base, dim);
  }
  torch::Tensor inv = default_inv_freq(c.rope_theta, dim);
  if (r.type != "llama3") return inv;
  // Llama 3.1: wavelengths longer than old_context / low_freq_factor are stretched by `factor`,
  // those shorter than old_context / high_freq_factor kept, and the band between interpolated.
  const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
  const double low_wavelen = old_ctx / r.low_freq_factor;
  const double high_wavelen = old_ctx / r.high_freq_factor;
  const torch::Tensor wavelen = 2.0 * M_PI / inv;
  torch::Tensor scaled = torch::where(wavelen > low_wavelen, inv / r.factor, inv);
  const torch::Tensor smooth =
      (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
  const torch::Tensor smoothed = (1.0 - smooth) * scaled / r.factor + smooth * scaled;
  const torch::Tensor medium = wavelen.ge(high_wavelen).logical_and(wavelen.le(low_wavelen));
  return torch::where(medium, smoothed, scaled);
}

}  // namespace qtune
