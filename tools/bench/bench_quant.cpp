// qtune-bench quant: every quantization option set on real and synthetic matrices. Size from
// nbytes(), error against the original, quantize time, dequantize throughput against a memcpy of
// the same bytes, and the frozen-base linear (forward + input gradient) against dense matmuls.
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "bench_internal.h"
#include "bench.h"
#include "qtune/error.h"
#include "qtune/model_files.h"
#include "qtune/recipe.h"
#include "qtune/weight_source.h"

namespace fs = std::filesystem;

namespace qtune {

using namespace bench_detail;

namespace {

// Heavy tails: Student-t with 3 degrees of freedom has finite variance but a kurtosis that is
// infinite, the regime outlier-aware schemes are built for.
constexpr int kStudentTDof = 3;
// The scale of trained Llama weights (and of their usual initialisation).
constexpr double kWeightStd = 0.02;
// The quantizer runs at most this many timed repeats: HQQ on an 11008 x 4096 matrix takes
// seconds, and quantizing is a one-off cost, unlike dequantize and linear.
constexpr int kMaxQuantizeRepeats = 3;
constexpr double kSingleQuantizeSeconds = 1.0;

struct Matrix {
  std::string name;                  // "gaussian 4096x4096", "stories260K (36 matrices)"
  std::string shape;                 // "4096x4096" or "mixed"
  std::vector<torch::Tensor> parts;  // fp32 on the bench device (released after its sets)
  int64_t numel = 0;
};

Matrix make_matrix(const std::string& spec, const BenchOptions& o, size_t index) {
  Matrix m;
  if (spec == "model") {
    const std::string path = resolve_data_path(o.model_path, "--model");
    ModelFiles files = open_model(path);
    for (const auto& [name, shape] : llama_weight_shapes(files.config)) {
      if (shape.size() != 2 || !files.weights->has(name)) continue;
      m.parts.push_back(files.weights->get(name, torch::kFloat32).to(o.device));
    }
    m.name = fs::path(path).stem().string() + " (" + std::to_string(m.parts.size()) + " matrices)";
    m.shape = "mixed";
    for (const auto& p : m.parts) m.numel += p.numel();
    return m;
  }
  const MatrixSpec ms = parse_matrix_spec(spec);
  const std::string kind = ms.kind;
  const int64_t out = ms.out, in = ms.in;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed * 1000003 + index);
  torch::Tensor w = torch::randn({out, in}, gen, torch::kFloat32);
  if (kind == "student_t") {
    // t = z / sqrt(chi2_nu / nu), chi2_nu the sum of nu squared normals; scaled to unit variance
    // (Var t = nu / (nu - 2)) before the common kWeightStd.
    torch::Tensor chi2 = torch::zeros_like(w);
    for (int i = 0; i < kStudentTDof; ++i) chi2.add_(torch::randn({out, in}, gen).square_());
    w.div_(chi2.div_(kStudentTDof).sqrt_());
    w.mul_(std::sqrt((kStudentTDof - 2.0) / kStudentTDof));
  }
  w.mul_(kWeightStd);
  m.name = (kind == "student_t" ? "student_t" + std::to_string(kStudentTDof) : kind) + " " +
           std::to_string(out) + "x" + std::to_string(in);
  m.shape = std::to_string(out) + "x" + std::to_string(in);
  m.parts.push_back(w.to(o.device));
  m.numel = out * in;
  return m;
}

// A plain memcpy split over the intra-op threads: the reference a dequantizer writing the same
// bytes with the same threads is compared to.
void parallel_memcpy(torch::Tensor& dst, const torch::Tensor& src) {
  if (!dst.is_cpu()) {
    dst.copy_(src);
    return;
  }
  const int64_t bytes = src.numel() * src.element_size();
  constexpr int64_t kChunk = 1 << 20;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  auto* d = static_cast<char*>(dst.data_ptr());
  const auto* s = static_cast<const char*>(src.data_ptr());
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    const int64_t from = b * kChunk, to = std::min(bytes, e * kChunk);
    std::memcpy(d + from, s + from, static_cast<size_t>(to - from));
  });
}

// Inputs of the linear timing for one part, both dtypes.
struct LinearInputs {
  torch::Tensor x32, g32, x16, g16, w16;
};

std::vector<BenchColumn> quant_columns() {
  return {
      {"matrix", 4, true},
      {"shape", 4, false},
      {"set", 4, true},
      {"short_set", 4, false},
      {"backend", 4, false},
      {"numel", 4, false},
      {"nbytes", 4, false},
      {"bits_per_param", 4, true},
      {"rel_frob_err", 3, true},
      {"nmse", 3, false},
      {"max_abs_err", 3, true},
      {"error_bound", 3, false},
      {"quantize_ms", 3, true},
      {"dequant_fp32_ms", 3, false},
      {"dequant_fp32_gbs", 3, true},
      {"memcpy_fp32_gbs", 3, false},
      {"dequant_fp32_vs_memcpy", 3, true},
      {"dequant_bf16_ms", 3, false},
      {"dequant_bf16_gbs", 3, false},
      {"memcpy_bf16_gbs", 3, false},
      {"dequant_bf16_vs_memcpy", 3, false},
      {"linear_fp32_ms", 3, false},
      {"dense_fp32_ms", 3, false},
      {"linear_fp32_ratio", 3, true},
      {"linear_bf16_ms", 3, false},
      {"dense_bf16_ms", 3, false},
      {"linear_bf16_ratio", 3, true},
      {"tokens", 4, false},
      {"threads", 4, false},
      {"device", 4, false},
      // Free text last: gnuplot's comma separator does not honour CSV quotes.
      {"status", 4, true},
      {"options", 4, false},
  };
}

struct LabelPoint {
  double x, y;        // data coordinates (y on a log axis)
  std::string label;  // empty: an obstacle only
};

// gnuplot has no label placement, and option sets crowd around 4 and 8 bits. Each label tries
// spots around its point (right, left, above, below, further out) in pixel space and takes the
// first that overlaps no point and no label placed before it.
std::string place_labels(const std::vector<LabelPoint>& points, double xmin, double xmax,
                         double ymin, double ymax, double width_px, double height_px) {
  struct Box {
    double x0, y0, x1, y1;
    bool hits(const Box& o) const { return x0 < o.x1 && o.x0 < x1 && y0 < o.y1 && o.y0 < y1; }
  };
  const double lmin = std::log10(ymin), lmax = std::log10(ymax);
  auto px = [&](double x) { return (x - xmin) / (xmax - xmin) * width_px; };
  auto py = [&](double y) { return (std::log10(y) - lmin) / (lmax - lmin) * height_px; };
  std::vector<Box> taken;
  for (const auto& p : points)
    taken.push_back({px(p.x) - 5, py(p.y) - 5, px(p.x) + 5, py(p.y) + 5});
  constexpr double kCharPx = 6.0, kLinePx = 12.0;  // pngcairo 8 pt
  std::ostringstream out;
  int n = 0;
  for (const auto& p : points) {
    if (p.label.empty()) continue;
    const double w = kCharPx * static_cast<double>(p.label.size()) + 4, cx = px(p.x), cy = py(p.y);
    const std::vector<std::pair<double, double>> spots = {
        {8, 0},       {8, 13},       {8, -13}, {-8 - w, 0}, {-8 - w, 13}, {-8 - w, -13},
        {-w / 2, 15}, {-w / 2, -15}, {8, 26},  {8, -26},    {-8 - w, 26}, {-8 - w, -26},
        {-w / 2, 28}, {-w / 2, -28}, {20, 39}, {20, -39}};
    Box chosen{};
    bool found = false;
    for (const auto& [dx, dy] : spots) {
      const Box b{cx + dx, cy + dy - kLinePx / 2, cx + dx + w, cy + dy + kLinePx / 2};
      if (b.x0 < 0 || b.x1 > width_px || b.y0 < 0 || b.y1 > height_px) continue;
      bool free = true;
      for (const auto& o : taken) free = free && !o.hits(b);
      if (free) {
        chosen = b;
        found = true;
        break;
      }
    }
    if (!found) chosen = {cx + 8, cy - kLinePx / 2, cx + 8 + w, cy + kLinePx / 2};
    taken.push_back(chosen);
    const double lx = xmin + chosen.x0 / width_px * (xmax - xmin);
    const double ly = std::pow(10, lmin + (chosen.y0 + kLinePx / 2) / height_px * (lmax - lmin));
    out << "set label " << ++n << " " << gp_quote(p.label) << " at " << lx << "," << ly
        << " left font ',8'\n";
  }
  return out.str();
}

std::vector<BenchPlot> quant_plots(const BenchTable& t, const std::vector<Matrix>& matrices) {
  std::vector<BenchPlot> plots;
  auto ok = [&](size_t r) { return t.at(r, "status") == "ok"; };
  {
    std::ostringstream gp;
    gp << gp_preamble("quant_error.png", 1000, 640);
    std::vector<std::string> names;
    size_t labelled = 0;  // the matrix whose points carry the set names: the first Gaussian
    for (size_t i = 0; i < matrices.size(); ++i) {
      const std::string n = matrices[i].name;
      if (n.rfind("gaussian", 0) == 0 && matrices[labelled].name.rfind("gaussian", 0) != 0)
        labelled = i;
      gp << gp_datablock("m" + std::to_string(i), t, {"bits_per_param", "rel_frob_err"},
                         [&](size_t r) { return ok(r) && t.at(r, "matrix") == n; });
      names.push_back(n);
    }
    // Fixed axes and margins, so label positions can be planned in pixels.
    std::vector<LabelPoint> points;
    double x0 = 1e30, x1 = -1e30, y0 = 1e30, y1 = -1e30;
    for (size_t r = 0; r < t.rows().size(); ++r) {
      if (!ok(r)) continue;
      const double x = t.at(r, "bits_per_param").get<double>();
      const double y = t.at(r, "rel_frob_err").get<double>();
      if (!(y > 0)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      const bool label = !matrices.empty() && t.at(r, "matrix") == matrices[labelled].name;
      points.push_back({x, y, label ? t.at(r, "short_set").get<std::string>() : ""});
    }
    if (points.empty()) x0 = 0, x1 = 8, y0 = 1e-3, y1 = 1;
    const double xmin = std::floor(x0) - 0.5, xmax = std::ceil(x1) + 1.5;
    const double ymin = std::pow(10, std::floor(std::log10(y0))),
                 ymax = std::pow(10, std::ceil(std::log10(y1)));
    gp << "set title 'Size vs error: relative Frobenius error ||W - deq(q(W))|| / ||W||'\n"
       << "set xlabel 'bits per parameter (nbytes x 8 / numel)'\n"
       << "set ylabel 'relative error (log)'\nset logscale y\nset key top right box opaque\n"
       << "set lmargin at screen 0.08\nset rmargin at screen 0.97\n"
       << "set tmargin at screen 0.92\nset bmargin at screen 0.09\n"
       << "set xrange [" << xmin << ":" << xmax << "]\nset yrange [" << ymin << ":" << ymax << "]\n"
       << place_labels(points, xmin, xmax, ymin, ymax, 0.89 * 1000, 0.83 * 640);
    gp << "plot ";
    for (size_t i = 0; i < names.size(); ++i)
      gp << (i ? ", \\\n     " : "") << "$m" << i << " using 1:2 with points pt " << 5 + 2 * i
         << " ps 1.4 title " << gp_quote(names[i]);
    if (names.empty()) gp << "NaN notitle";
    gp << "\n";
    plots.push_back({"quant_error", "bits per parameter vs relative error", gp.str()});
  }
  {
    // Speed on the largest matrix, where it matters.
    size_t big = 0;
    for (size_t i = 1; i < matrices.size(); ++i)
      if (matrices[i].numel > matrices[big].numel) big = i;
    if (!matrices.empty()) {
      const std::string n = matrices[big].name;
      size_t count = 0;
      for (size_t r = 0; r < t.rows().size(); ++r) count += ok(r) && t.at(r, "matrix") == n;
      std::ostringstream gp;
      gp << gp_preamble("quant_speed.png", 1000, 600);
      gp << gp_datablock(
          "s", t, {"short_set", "dequant_fp32_vs_memcpy", "linear_fp32_ratio", "linear_bf16_ratio"},
          [&](size_t r) { return ok(r) && t.at(r, "matrix") == n; });
      gp << "set title " << gp_quote("Speed on " + n + " (ratios measured in the same run)")
         << "\nset style data histograms\nset style histogram clustered gap 1\n"
         << "set style fill solid 0.85 border -1\nset boxwidth 0.9\n"
         << "set xtics rotate by -30 left font ',9'\nset ylabel 'ratio (log)'\nset logscale y\n"
         << "set key outside top center horizontal\nset xrange [-0.6:"
         << (count == 0 ? 0.6 : count - 0.4) << "]\nset bmargin 6\n"
         << "plot $s using 2:xtic(1) title 'dequantize to fp32: GB/s / memcpy GB/s', \\\n"
         << "     '' using 3 title 'linear fwd+bwd fp32: time / dense fp32', \\\n"
         << "     '' using 4 title 'linear fwd+bwd bf16: time / dense bf16', \\\n"
         << "     1 with lines dt 2 lc rgb 'black' notitle\n";
      plots.push_back({"quant_speed", "dequantize and linear speed ratios", gp.str()});
    }
  }
  return plots;
}

}  // namespace

namespace bench_detail {

MatrixSpec parse_matrix_spec(const std::string& spec) {
  MatrixSpec m;
  if (spec == "model") {
    m.kind = spec;
    return m;
  }
  const auto colon = spec.find(':');
  m.kind = spec.substr(0, colon);
  QTUNE_CHECK(m.kind == "gaussian" || m.kind == "student_t", "--matrices: unknown matrix '", spec,
              "', expected model, gaussian:OUTxIN or student_t:OUTxIN");
  QTUNE_CHECK(colon != std::string::npos, "--matrices: entry '", spec, "' needs a shape, as in ",
              m.kind, ":4096x4096");
  const std::string shape = spec.substr(colon + 1);
  const auto x = shape.find('x');
  try {
    size_t used = 0;
    m.out = std::stoll(shape.substr(0, x), &used);
    if (used != x) m.out = 0;
    m.in = std::stoll(shape.substr(x + 1), &used);
    if (used != shape.size() - x - 1) m.in = 0;
  } catch (...) {
    m.out = m.in = 0;
  }
  QTUNE_CHECK(x != std::string::npos && m.out > 0 && m.in > 0, "--matrices: entry '", spec,
              "' needs a shape OUTxIN like 4096x11008, got '", shape, "'");
  return m;
}

}  // namespace bench_detail

BenchResult bench_quant(const BenchOptions& o, const Registry& registry) {
  const auto t_start = std::chrono::steady_clock::now();
  torch::NoGradGuard no_grad;
  const int threads = apply_threads(o.threads);
  const torch::Device dev = o.device;
  const int reps = std::max(1, o.repeats), warm = std::max(0, o.warmup);
  const int q_reps = std::min(reps, kMaxQuantizeRepeats);
  QTUNE_CHECK(o.linear_tokens > 0, "--tokens must be > 0, got ", o.linear_tokens);
  QTUNE_CHECK(!o.matrices.empty(), "--matrices: no matrix given");

  BenchTable table("quant", "Quantization: size, error and speed per option set and matrix",
                   quant_columns());
  std::vector<Matrix> kept;  // names and sizes only, for the plots
  std::vector<std::string> timed_shapes;

  for (size_t mi = 0; mi < o.matrices.size(); ++mi) {
    Matrix m = make_matrix(o.matrices[mi], o, mi);
    const int64_t numel = m.numel;
    spdlog::info("bench quant: {} ({} parameters)", m.name, numel);

    // Inputs and the dense baselines, once per matrix.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 17 * mi + 1);
    std::vector<LinearInputs> in(m.parts.size());
    for (size_t p = 0; p < m.parts.size(); ++p) {
      const auto& w = m.parts[p];
      in[p].x32 = torch::randn({o.linear_tokens, w.size(1)}, gen).to(dev);
      in[p].g32 = torch::randn({o.linear_tokens, w.size(0)}, gen).to(dev);
      in[p].x16 = in[p].x32.to(torch::kBFloat16);
      in[p].g16 = in[p].g32.to(torch::kBFloat16);
      in[p].w16 = w.to(torch::kBFloat16);
    }
    // The references each backend is compared to: dense matmuls and a memcpy of the output's
    // bytes. They are timed interleaved with the backend (see paired_medians), so a ratio never
    // compares a quiet moment of a shared machine with a busy one.
    std::vector<torch::Tensor> src32(m.parts.size()), dst32(m.parts.size()), dst16(m.parts.size());
    for (size_t p = 0; p < m.parts.size(); ++p) {
      src32[p] = m.parts[p].clone();
      dst32[p] = torch::empty_like(m.parts[p]);
      dst16[p] = torch::empty_like(in[p].w16);
    }
    auto dense = [&](bool bf16) {
      for (size_t p = 0; p < m.parts.size(); ++p) {
        const auto& w = bf16 ? in[p].w16 : m.parts[p];
        torch::mm(bf16 ? in[p].x16 : in[p].x32, w.t());
        torch::mm(bf16 ? in[p].g16 : in[p].g32, w);
      }
    };
    auto copy = [&](bool bf16) {
      for (size_t p = 0; p < m.parts.size(); ++p)
        parallel_memcpy(bf16 ? dst16[p] : dst32[p], bf16 ? in[p].w16 : src32[p]);
    };
    // Speed does not depend on the values: a second matrix of a shape already timed gets its
    // size and error measured, not its speed again.
    const bool timed = m.shape == "mixed" || std::find(timed_shapes.begin(), timed_shapes.end(),
                                                       m.shape) == timed_shapes.end();
    if (timed) timed_shapes.push_back(m.shape);
    const double bytes32 = 4.0 * numel, bytes16 = 2.0 * numel;

    for (const auto& set : o.quant_sets) {
      Json row = {{"matrix", m.name},          {"shape", m.shape},
                  {"set", set.label()},        {"short_set", set.short_label()},
                  {"backend", set.backend},    {"numel", numel},
                  {"tokens", o.linear_tokens}, {"threads", threads},
                  {"device", dev.str()},       {"options", set.options.dump()}};
      auto backend = registry.quant(set.backend);
      Json resolved;
      std::vector<std::shared_ptr<QuantizedWeight>> qs;
      double first_quantize_s = 0;
      try {
        resolved = backend->check_options(set.options, set.backend);
        row["options"] = resolved.dump();
        const auto t0 = std::chrono::steady_clock::now();
        for (const auto& w : m.parts) qs.push_back(backend->quantize(w, resolved));
        sync(dev);
        first_quantize_s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } catch (const std::exception& e) {
        // A UserError is the backend refusing the options or the shape; anything else is a
        // failure. Either way it is recorded and the other sets still run.
        row["status"] =
            (dynamic_cast<const UserError*>(&e) ? "rejected: " : "failed: ") + first_line(e);
        spdlog::warn("bench quant: {} on {}: {}", set.label(), m.name,
                     row["status"].get<std::string>());
        table.add(row);
        continue;
      }
      try {
        int64_t nbytes = 0;
        double se = 0, ss = 0, max_abs = 0;
        for (size_t p = 0; p < m.parts.size(); ++p) {
          nbytes += qs[p]->nbytes();
          torch::Tensor diff = qs[p]->dequantize(torch::kFloat32, dev) - m.parts[p];
          se += diff.square().sum(torch::kDouble).item<double>();
          ss += m.parts[p].square().sum(torch::kDouble).item<double>();
          max_abs = std::max(max_abs, diff.abs().max().item<double>());
        }
        row["nbytes"] = nbytes;
        row["bits_per_param"] = 8.0 * static_cast<double>(nbytes) / static_cast<double>(numel);
        row["rel_frob_err"] = std::sqrt(se / ss);
        row["nmse"] = se / ss;
        row["max_abs_err"] = max_abs;
        try {
          row["error_bound"] = backend->error_bound(resolved);
        } catch (const std::exception&) {
        }

        // The first quantize call (whose result is measured above) is one of the samples: the
        // median discards it when it paid for cold caches.
        // A call of over a second is timed once: seconds are not what a shared machine's noise
        // distorts, and HQQ on an 11008 x 4096 matrix would otherwise dominate the whole run.
        const int calls = first_quantize_s > kSingleQuantizeSeconds ? 1 : q_reps;
        std::vector<double> t_quant(static_cast<size_t>(calls), 0.0);
        t_quant[0] = first_quantize_s;
        for (int r = 1; r < calls; ++r)
          for (const auto& w : m.parts)
            t_quant[static_cast<size_t>(r)] +=
                median_seconds([&] { backend->quantize(w, resolved); }, 0, 1, dev);
        row["quantize_ms"] = 1e3 * median(t_quant);
        if (!timed) {
          row["status"] = "ok";
          table.add(row);
          continue;
        }

        auto deq = [&](torch::ScalarType dt) {
          for (auto& q : qs) q->dequantize(dt, dev);
        };
        auto lin = [&](bool bf16) {
          for (size_t p = 0; p < qs.size(); ++p) {
            qs[p]->linear(bf16 ? in[p].x16 : in[p].x32);
            qs[p]->linear_grad_input(bf16 ? in[p].g16 : in[p].g32);
          }
        };
        const auto [deq32, memcpy32] =
            paired_medians([&] { deq(torch::kFloat32); }, [&] { copy(false); }, warm, reps, dev);
        const auto [deq16, memcpy16] =
            paired_medians([&] { deq(torch::kBFloat16); }, [&] { copy(true); }, warm, reps, dev);
        row["dequant_fp32_ms"] = 1e3 * deq32;
        row["dequant_fp32_gbs"] = bytes32 / deq32 / 1e9;
        row["memcpy_fp32_gbs"] = bytes32 / memcpy32 / 1e9;
        row["dequant_fp32_vs_memcpy"] = memcpy32 / deq32;
        row["dequant_bf16_ms"] = 1e3 * deq16;
        row["dequant_bf16_gbs"] = bytes16 / deq16 / 1e9;
        row["memcpy_bf16_gbs"] = bytes16 / memcpy16 / 1e9;
        row["dequant_bf16_vs_memcpy"] = memcpy16 / deq16;

        const auto [lin32, dense32] =
            paired_medians([&] { lin(false); }, [&] { dense(false); }, warm, reps, dev);
        const auto [lin16, dense16] =
            paired_medians([&] { lin(true); }, [&] { dense(true); }, warm, reps, dev);
        row["linear_fp32_ms"] = 1e3 * lin32;
        row["dense_fp32_ms"] = 1e3 * dense32;
        row["linear_fp32_ratio"] = lin32 / dense32;
        row["linear_bf16_ms"] = 1e3 * lin16;
        row["dense_bf16_ms"] = 1e3 * dense16;
        row["linear_bf16_ratio"] = lin16 / dense16;
        row["status"] = "ok";
        spdlog::info(
            "bench quant: {} on {}: {:.3f} bits/param, rel err {:.4f}, quantize {:.1f} ms, "
            "dequant {:.2f} GB/s, linear x{:.2f} fp32 x{:.2f} bf16",
            set.label(), m.name, row["bits_per_param"].get<double>(),
            row["rel_frob_err"].get<double>(), row["quantize_ms"].get<double>(),
            row["dequant_fp32_gbs"].get<double>(), lin32 / dense32, lin16 / dense16);
      } catch (const std::exception& e) {
        // A backend that fails on one matrix must not end the whole benchmark.
        row["status"] = "failed: " + first_line(e);
        spdlog::warn("bench quant: {} on {}: {}", set.label(), m.name,
                     row["status"].get<std::string>());
      }
      table.add(row);
    }
    m.parts.clear();
    kept.push_back(std::move(m));
  }

  table.notes = {
      "*bits_per_param* = `nbytes()` x 8 / parameters: everything the quantized weight holds "
      "(codes, scales, zero-points, code tables, nested statistics). Dense bf16 is 16, fp32 32.",
      "*rel_frob_err* = ||W - deq(q(W))||_F / ||W||_F; *nmse* (CSV) = its square, ggml "
      "test-backend-ops' normalised MSE; *max_abs_err* = max |W - deq(q(W))| with weights of std "
      "0.02. Matrices: the model's own 2-D weights (errors aggregated over all of them), "
      "Gaussian, and Student-t with 3 degrees of freedom (heavy tails), all std 0.02; "
      "Llama-2-7B's projection shapes are 4096x4096, 11008x4096 and 4096x11008. "
      "*error_bound* (CSV) is the backend's own promise for Gaussian matrices.",
      "Timings are medians of " + std::to_string(reps) + " repeats after " + std::to_string(warm) +
          " warm-up run(s), each reference (memcpy, dense matmul) timed "
          "alternately with the backend it is compared to; quantize: median of " +
          std::to_string(q_reps) +
          " calls (one when it takes over a second). Speed columns are left empty for a matrix "
          "whose shape "
          "was already timed (speed does not depend on the values). *dequant_fp32_gbs*: GB/s of "
          "fp32 output written by `dequantize()`; "
          "*dequant_fp32_vs_memcpy*: that over a memcpy of the same bytes on the same threads "
          "in the same run (1 = as fast as copying the output).",
      "*linear_fp32_ratio*: time of `linear(x)` + `linear_grad_input(g)` (the forward and the "
      "input gradient a frozen base computes in training) for x of " +
          std::to_string(o.linear_tokens) +
          " tokens, over the same two matmuls with a dense fp32 W; *linear_bf16_ratio* likewise "
          "in bf16. Rows whose status is not ok are option sets the backend rejected.",
  };

  BenchResult result;
  result.command = "quant";
  result.plots = quant_plots(table, kept);
  result.tables.push_back(std::move(table));
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return result;
}

}  // namespace qtune
