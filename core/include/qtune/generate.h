// Text generation with a KV cache: greedy (temperature 0), temperature and top-p (nucleus)
// sampling, for looking at what a fine-tune learned and for the loader/model parity test.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "qtune/export.h"
#include "qtune/model.h"

namespace qtune {

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  double temperature = 0.0;  // 0 = greedy (argmax)
  double top_p = 1.0;        // sample from the smallest set of tokens whose mass reaches top_p
  uint64_t seed = 0;         // sampling RNG seed
  /// Stop when one of these is generated (not included in the output). llama2.c stops at BOS;
  /// chat-style use stops at EOS.
  std::vector<int64_t> stop_tokens;
};

/// Continues `prompt` (token ids, BOS included if wanted; must not be empty). Returns the new
/// tokens only. `on_token` (optional) sees each token as it is produced.
QTUNE_API std::vector<int64_t> generate(LlamaForCausalLMImpl& model,
                                        const std::vector<int64_t>& prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(int64_t)>& on_token = {});

}  // namespace qtune
