// Manual measurement of the nf4 CPU kernels (not a test; nothing here asserts on time):
// dequantization throughput of a 4096 x 4096 weight into fp32 and bf16, the QLoRA-style linear
// forward + input-gradient against the same dense matmuls, and the memory and time of
// quantizing a 32000 x 4096 output head. With "step", a whole LoRA vs QLoRA training step
// (forward + backward) of a random Llama model instead.
// Usage: nf4_measure [tokens=512] [threads=1] [step]
#include <ATen/Parallel.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "nf4_backend.h"
#include "nf4_codec.h"
#include "qtune/model.h"
#include "qtune/registry.h"

using namespace qtune::nf4;

namespace {

// Best of `reps` runs after a warm-up: the machine is shared, so the minimum is the most
// repeatable estimate of what the code itself costs.
double seconds(const std::function<void()>& f, int reps) {
  f();  // warm-up (page faults, caches)
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

double max_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

// Forward + backward of one batch of `tokens` tokens through a random 2-layer Llama (hidden
// 2048, SwiGLU 5632, vocab 8000) with LoRA (r=8, all linear layers) on a dense frozen base and on
// an NF4 base, at fp32 and bf16 compute. The optimizer step is left out: it touches only the
// adapters, the same in both.
void measure_step(int64_t tokens) {
  qtune::Registry reg;
  reg.scan(qtune::Registry::default_dirs(""));
  qtune::ModelConfig c;
  c.hidden_size = 2048;
  c.intermediate_size = 5632;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.vocab_size = 8000;
  auto weights = qtune::random_weights(c, 1);
  const int64_t seq = 128, batch = std::max<int64_t>(1, tokens / seq);
  torch::Tensor ids = torch::randint(c.vocab_size, {batch, seq}, torch::kLong);
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    double best[2] = {1e30, 1e30};
    std::vector<qtune::LlamaForCausalLM> models;
    for (auto type : {qtune::TrainType::kLora, qtune::TrainType::kQlora}) {
      qtune::TuningSpec spec;
      spec.train_type = type;
      spec.dtype = dt;
      spec.adapter = reg.adapter("lora");
      spec.adapter_options =
          qtune::resolve_options(spec.adapter->option_schema(), qtune::Json(), "adapter.options");
      spec.target_modules = qtune::parse_target_modules({"all-linear"}, "target_modules");
      if (type == qtune::TrainType::kQlora) {
        spec.quant = std::make_shared<Nf4Backend>();
        spec.quant_options =
            qtune::resolve_options(spec.quant->option_schema(), qtune::Json(), "quant.options");
      }
      models.emplace_back(c, *weights, spec);
    }
    for (int rep = 0; rep < 4; ++rep)
      for (int m = 0; m < 2; ++m) {
        const double t = seconds(
            [&] {
              models[m]->zero_grad();
              models[m]->loss(ids, ids).first.backward();
            },
            1);
        if (rep > 0) best[m] = std::min(best[m], t);  // rep 0 warms up both
      }
    std::printf(
        "train step fwd+bwd %-8s %ld tokens, random Llama 2x(2048, 5632), LoRA r8 all-linear:"
        " LoRA %.0f ms, QLoRA-nf4 %.0f ms (ratio %.3f)\n",
        c10::toString(dt), (long)(batch * seq), best[0] * 1e3, best[1] * 1e3, best[1] / best[0]);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t tokens = argc > 1 ? std::atol(argv[1]) : 512;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  at::set_num_threads(threads);
  if (argc > 3 && std::string(argv[3]) == "step") {
    measure_step(tokens);
    return 0;
  }
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const Nf4Backend backend;
  {
    // First, while the peak RSS is still the input's: what quantizing adds to it.
    torch::Tensor head = torch::randn({32000, 4096}, torch::kBFloat16);
    const double before = max_rss_mb();
    const auto t0 = std::chrono::steady_clock::now();
    auto qh = backend.quantize(head, qtune::Json());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("quantize 32000x4096 bf16 head: %.2f s, peak RSS +%.1f MB (packed state %.1f MB)\n",
                t, max_rss_mb() - before, qh->nbytes() / 1e6);
  }
  const int64_t n = 4096;
  torch::Tensor w = torch::randn({n, n}) * 0.02;
  std::printf("threads %d, tokens %ld, CPU kernel %s\n", at::get_num_threads(), (long)tokens,
              cpu_kernel_name().c_str());

  const double tq = seconds([&] { backend.quantize(w, qtune::Json()); }, 2);
  std::printf("quantize 4096x4096 fp32 (double quant): %.1f ms\n", tq * 1e3);
  auto q = backend.quantize_with(w, qtune::Json(), true);

  for (const char* kernel : {"avx512", "avx2", "scalar"}) {
    if (!set_cpu_kernel(kernel)) continue;
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      torch::Tensor out = torch::empty({n, n}, torch::dtype(dt));
      const double t =
          seconds([&] { dequantize_rows_cpu(q->packed(), q->layout(), 0, n, out); }, 10);
      const double out_gb = out.numel() * out.element_size() / 1e9;
      std::printf(
          "dequantize 4096x4096 -> %-8s %-6s kernel: %6.2f ms  %6.2f GB/s written  "
          "%6.2f Gelem/s\n",
          c10::toString(dt), kernel, t * 1e3, out_gb / t, n * n / t / 1e9);
    }
  }
  set_cpu_kernel("auto");
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    // The unit the CPU linear works in: one 512-row tile into a reused (cache-warm) buffer.
    torch::Tensor tile = torch::empty({512, n}, torch::dtype(dt));
    const double t = seconds(
        [&] {
          for (int64_t r = 0; r < n; r += 512)
            dequantize_rows_cpu(q->packed(), q->layout(), r, r + 512, tile);
        },
        10);
    std::printf(
        "dequantize 4096x4096 -> %-8s in 512-row tiles into one buffer: %6.2f ms  %6.2f "
        "GB/s written\n",
        c10::toString(dt), t * 1e3, double(n) * n * tile.element_size() / 1e9 / t);
  }
  {
    const double t =
        seconds([&] { dequantize_rows_torch(q->packed(), q->layout(), 0, n, torch::kFloat); }, 3);
    std::printf("dequantize 4096x4096 -> float32 tensor-op path: %.2f ms\n", t * 1e3);
  }

  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    torch::Tensor x = torch::randn({tokens, n}).to(dt), g = torch::randn({tokens, n}).to(dt);
    torch::Tensor wd = w.to(dt);
    // Interleaved, best of 7 each: other processes share this machine.
    double dense = 1e30, nf4 = 1e30, deq_default = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      dense = std::min(dense, seconds(
                                  [&] {
                                    torch::mm(x, wd.t());
                                    torch::mm(g, wd);
                                  },
                                  1));
      nf4 = std::min(nf4, seconds(
                              [&] {
                                q->linear(x);
                                q->linear_grad_input(g);
                              },
                              1));
      deq_default = std::min(deq_default, seconds(
                                              [&] {
                                                q->QuantizedWeight::linear(x);
                                                q->QuantizedWeight::linear_grad_input(g);
                                              },
                                              1));
    }
    std::printf(
        "linear fwd+bwd(input) %-8s [%ld x 4096] x [4096 x 4096]: dense %.1f ms, nf4 %.1f "
        "ms (ratio %.3f), core default tiling %.1f ms (ratio %.3f)\n",
        c10::toString(dt), (long)tokens, dense * 1e3, nf4 * 1e3, nf4 / dense, deq_default * 1e3,
        deq_default / dense);
  }

  if (std::getenv("NF4_TILE_SWEEP")) {
    // GEMM cost of the tiling alone (dense tiles, no dequantization).
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      torch::Tensor x = torch::randn({tokens, n}).to(dt), g = torch::randn({tokens, n}).to(dt);
      torch::Tensor wd = w.to(dt);
      for (int64_t tile : {256, 512, 1024, 2048, 4096}) {
        const double fwd_out = seconds(
            [&] {
              torch::Tensor y = torch::empty({tokens, n}, x.options());
              for (int64_t r = 0; r < n; r += tile) {
                torch::Tensor yc = y.narrow(1, r, tile);
                torch::mm_out(yc, x, wd.narrow(0, r, tile).t());
              }
            },
            3);
        const double fwd_copy = seconds(
            [&] {
              torch::Tensor y = torch::empty({tokens, n}, x.options());
              for (int64_t r = 0; r < n; r += tile)
                y.narrow(1, r, tile).copy_(torch::mm(x, wd.narrow(0, r, tile).t()));
            },
            3);
        const double bwd = seconds(
            [&] {
              torch::Tensor gx;
              for (int64_t r = 0; r < n; r += tile) {
                if (gx.defined())
                  gx.addmm_(g.narrow(1, r, tile), wd.narrow(0, r, tile));
                else
                  gx = torch::mm(g.narrow(1, r, tile), wd.narrow(0, r, tile));
              }
            },
            3);
        std::printf("tile %-5ld %-8s fwd mm_out %.1f ms, fwd mm+copy %.1f ms, bwd addmm %.1f ms\n",
                    (long)tile, c10::toString(dt), fwd_out * 1e3, fwd_copy * 1e3, bwd * 1e3);
      }
    }
  }

  return 0;
}
