// Manual measurement of the nf4 CPU kernels (not a test; nothing here asserts on time):
// dequantization throughput of a 4096 x 4096 weight into fp32 and bf16, the QLoRA-style linear
// forward + input-gradient against the same dense matmuls, and the memory and time of
// quantizing a 32000 x 4096 output head. Usage: nf4_measure [tokens=512] [threads=1]
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include <ATen/Parallel.h>

#include "nf4_backend.h"
#include "nf4_codec.h"

using namespace qtune::nf4;

namespace {

double seconds(const std::function<void()>& f, int reps) {
  f();  // warm-up (page faults, caches)
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

double max_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t tokens = argc > 1 ? std::atol(argv[1]) : 512;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  at::set_num_threads(threads);
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const Nf4Backend backend;
  const int64_t n = 4096;
  torch::Tensor w = torch::randn({n, n}) * 0.02;
  std::printf("threads %d, tokens %ld, CPU kernel %s\n", at::get_num_threads(), (long)tokens,
              cpu_kernel_name().c_str());

  const double tq = seconds([&] { backend.quantize(w, qtune::Json()); }, 2);
  std::printf("quantize 4096x4096 fp32 (double quant): %.1f ms\n", tq * 1e3);
  auto q = backend.quantize_with(w, qtune::Json(), true);

  for (bool scalar : {false, true}) {
    set_force_scalar_kernel(scalar);
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      torch::Tensor out = torch::empty({n, n}, torch::dtype(dt));
      const double t = seconds([&] { dequantize_rows_cpu(q->packed(), q->layout(), 0, n, out); }, 10);
      const double out_gb = out.numel() * out.element_size() / 1e9;
      std::printf("dequantize 4096x4096 -> %-8s %-6s kernel: %6.2f ms  %6.2f GB/s written  "
                  "%6.2f Gelem/s\n",
                  c10::toString(dt), scalar ? "scalar" : cpu_kernel_name().c_str(), t * 1e3,
                  out_gb / t, n * n / t / 1e9);
    }
  }
  set_force_scalar_kernel(false);
  {
    const double t = seconds(
        [&] { dequantize_rows_torch(q->packed(), q->layout(), 0, n, torch::kFloat); }, 3);
    std::printf("dequantize 4096x4096 -> float32 tensor-op path: %.2f ms\n", t * 1e3);
  }

  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    torch::Tensor x = torch::randn({tokens, n}).to(dt), g = torch::randn({tokens, n}).to(dt);
    torch::Tensor wd = w.to(dt);
    const double dense = seconds([&] { torch::mm(x, wd.t()); torch::mm(g, wd); }, 3);
    const double nf4 = seconds([&] { q->linear(x); q->linear_grad_input(g); }, 3);
    const double deq_default = seconds([&] {
      q->QuantizedWeight::linear(x);
      q->QuantizedWeight::linear_grad_input(g);
    }, 3);
    std::printf("linear fwd+bwd(input) %-8s [%ld x 4096] x [4096 x 4096]: dense %.1f ms, nf4 %.1f "
                "ms (ratio %.3f), core default tiling %.1f ms (ratio %.3f)\n",
                c10::toString(dt), (long)tokens, dense * 1e3, nf4 * 1e3, nf4 / dense,
                deq_default * 1e3, deq_default / dense);
  }

  {
    torch::Tensor head = torch::randn({32000, 4096}).to(torch::kBFloat16);
    const double before = max_rss_mb();
    const auto t0 = std::chrono::steady_clock::now();
    auto qh = backend.quantize(head, qtune::Json());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("quantize 32000x4096 bf16 head: %.2f s, peak RSS +%.1f MB (packed state %.1f MB)\n",
                t, max_rss_mb() - before, qh->nbytes() / 1e6);
  }
  return 0;
}
