// Generation with a KV cache (see generate.h).
#include "qtune/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "qtune/error.h"

namespace qtune {

namespace {

int64_t sample(const torch::Tensor& logits, const GenerateOptions& o, at::Generator& gen) {
  if (o.temperature <= 0) return logits.argmax().item<int64_t>();
  auto probs = torch::softmax(logits.to(torch::kFloat64) / o.temperature, -1);
  if (o.top_p < 1.0) {
    auto [sorted, idx] = probs.sort(/*dim=*/-1, /*descending=*/true);
    auto cum = sorted.cumsum(-1);
    // keep tokens whose preceding mass is below top_p (the first token is always kept)
    auto keep = (cum - sorted) < o.top_p;
    sorted = sorted * keep.to(sorted.scalar_type());
    auto choice = torch::multinomial(sorted / sorted.sum(), 1, false, gen);
    return idx[choice.item<int64_t>()].item<int64_t>();
  }
  return torch::multinomial(probs, 1, false, gen).item<int64_t>();
}

}  // namespace

std::vector<int64_t> generate(LlamaForCausalLMImpl& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& o, const std::function<void(int64_t)>& on_token) {
  QTUNE_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token (e.g. BOS)");
  QTUNE_CHECK(o.top_p > 0 && o.top_p <= 1.0, "top_p must be in (0, 1], got ", o.top_p);
  QTUNE_CHECK(o.temperature >= 0, "temperature must be >= 0, got ", o.temperature);
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + o.max_new_tokens;
  KVCache cache = model.new_cache(1, capacity);
  auto logits = model.forward(torch::tensor(prompt, torch::kLong).unsqueeze(0), &cache);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < o.max_new_tokens; ++i) {
    const int64_t next = sample(logits[0][-1], o, gen);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), next) != o.stop_tokens.end()) break;
    out.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 == o.max_new_tokens) break;
    logits = model.forward(torch::tensor({next}, torch::kLong).unsqueeze(0), &cache);
  }
  model.train(was_training);
  return out;
}

}  // namespace qtune
