// The conformance suite every quantization plugin must pass unchanged (installed as
// <prefix>/bin/qtune_conformance). It goes through the registry like users do, so it tests every
// quant plugin it finds (the plugin folder beside it, QTUNE_PLUGIN_PATH), over option sets built
// from each schema: the defaults; each boolean flipped; each number halved and doubled; 0 and the
// schema's declared min/max; every declared choice; plus the sets given with
// --quant_sets 'name:{json};...' (qtune-bench's syntax). Nothing here names a backend.
//
// A set the backend rejects (check_options, error_bound or quantize) must be rejected with a
// qtune::UserError naming an option, by check_options and quantize alike; its cases then skip.
// What an accepted set must do (tolerances are documented where they are used):
//  - relative Frobenius round-trip error <= error_bound() on Gaussian matrices, and at least
//    kTightFraction of it (a vacuous bound is a bug too); <= kHeavyTailFactor * bound on
//    Student-t (df = 3) matrices; "[ bound    ]" lines print measured error against the bound;
//  - linear(x) == x @ dequantize()^T and linear_grad_input(g) == g @ dequantize() in fp32 and
//    bf16, also across its internal row tiles; dequantize_rows == slices of dequantize;
//  - through QuantizedLinearFunction: the right grad_x and no gradient anywhere else;
//  - state() hands out the tensors the weight holds (the same storage on every call), nbytes()
//    counts them all, and state() -> load() is bit-exact, also through a safetensors file;
//  - load() rejects a state with a tensor missing, truncated, of another dtype, an unexpected
//    tensor, or meta of another backend, with a UserError;
//  - quantizing is deterministic, also across intra-op thread counts (data-parallel ranks
//    quantize the same file independently and must agree bit for bit);
//  - odd shapes quantize correctly or raise UserError; non-2-D, integer input and bad options
//    (unknown keys, wrong types, values outside the declared range) raise UserError naming them;
//  - to(cpu) keeps working.
// Every failure is reported with the check, the plugin and the option set (see FailureNamer).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>

#include "qtune/error.h"
#include "qtune/options.h"
#include "qtune/quantized_linear.h"
#include "qtune/registry.h"
#include "qtune/safetensors.h"
#include "test_util.h"

using qtune::Json;
using qtune::QuantBackend;
using qtune::QuantizedWeight;
using qtune::TensorState;
using qtune::UserError;

namespace {

// Student-t (df = 3) has infinite kurtosis: a few huge values per block inflate every
// absmax/range-based scale, the more the larger the block. A backend may be this much worse
// than its Gaussian bound there (measured on 256x512: nf4 block_size 4096 4.4x, hqq group_size
// 16384 3.6x; blocks of 64 stay under 2x). What it catches is a backend that breaks on outliers
// (overflow, NaN, one range for the whole tensor), and a result worse than all zeros.
constexpr double kHeavyTailFactor = 5.0;
// Tiny or odd matrices have few blocks, so their error is a noisier statistic.
constexpr double kSmallShapeFactor = 1.5;
// The measured Gaussian error must be at least this fraction of the declared bound: the bound is
// what benchmarks and users compare backends by, so one far above the truth misleads them.
constexpr double kTightFraction = 0.25;
// Normalized error between our reference matmul and the backend's linear.
constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 1e-2;  // two bf16 roundings (2^-8 each) of differently summed results
// state() may build small tensors on each call (a serialised record, like NF4's quant_state);
// anything bigger must be the weight's own storage, or memory reports undercount the weight.
constexpr int64_t kMaxDerivedBytes = 4096;

// ---- option sets -----------------------------------------------------------------------------

std::string g_quant_sets;  // --quant_sets, parsed in main() before the cases are generated

qtune::Registry& registry() {
  static qtune::Registry* reg = [] {
    auto* r = new qtune::Registry();  // leaked: plugins are never unloaded
    r->scan(qtune::Registry::default_dirs(""));
    return r;
  }();
  return *reg;
}

struct Case {
  std::string backend;
  Json options;       // user options (unresolved)
  std::string label;  // for the test name
};

std::string sanitize(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

std::string value_label(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer() && v.get<int64_t>() < 0) return "m" + std::to_string(-v.get<int64_t>());
  return v.dump();
}

bool within_declared(const qtune::OptionSpec& spec, const Json& v) {
  if (!spec.choices.empty())
    return std::find(spec.choices.begin(), spec.choices.end(), v) != spec.choices.end();
  if (!v.is_number()) return true;
  if (spec.min.is_number() && v.get<double>() < spec.min.get<double>()) return false;
  if (spec.max.is_number() && v.get<double>() > spec.max.get<double>()) return false;
  return true;
}

// The values tried for one option besides its default: derived, boundary and declared ones.
std::vector<Json> values_to_try(const qtune::OptionSpec& spec) {
  const Json& d = spec.default_value;
  std::vector<Json> out;
  if (d.is_boolean()) out.push_back(!d.get<bool>());
  if (d.is_number_integer()) {
    const int64_t v = d.get<int64_t>();
    for (int64_t alt : {v / 2, v * 2, int64_t{0}}) out.push_back(alt);
  } else if (d.is_number_float()) {
    for (double alt : {d.get<double>() / 2, d.get<double>() * 2, 0.0}) out.push_back(alt);
  }
  if (spec.min.is_number()) out.push_back(spec.min);
  if (spec.max.is_number()) out.push_back(spec.max);
  for (const auto& c : spec.choices) out.push_back(c);
  std::vector<Json> kept;
  for (const auto& v : out)
    if (v != d && within_declared(spec, v) && std::find(kept.begin(), kept.end(), v) == kept.end())
      kept.push_back(v);
  return kept;
}

std::vector<Case> discover_cases() {
  std::vector<Case> cases;
  std::set<std::string> seen;
  auto add = [&](Case c) {
    if (!seen.insert(c.backend + " " + c.options.dump()).second) return;
    std::string label = c.label;
    for (int i = 2; !seen.insert("label " + c.backend + "_" + label).second; ++i)
      label = c.label + "_" + std::to_string(i);
    c.label = label;
    cases.push_back(std::move(c));
  };
  for (const auto& rec : registry().plugins()) {
    if (rec.kind != "quant") continue;
    add({rec.name, Json::object(), "default"});
    for (const auto& spec : registry().quant(rec.name)->option_schema())
      for (const Json& v : values_to_try(spec))
        add({rec.name, Json{{spec.name, v}}, spec.name + "_" + value_label(v)});
  }
  if (!g_quant_sets.empty()) {
    int i = 0;
    for (const auto& s : qtune::parse_option_sets(g_quant_sets, "--quant_sets")) {
      std::string label = "given" + std::to_string(++i);
      for (const auto& k : s.key_order) label += "_" + k + "_" + value_label(s.options[k]);
      add({s.name, s.options, label});
    }
  }
  return cases;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.backend << " " << c.options.dump(); }

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return sanitize(info.param.backend + "_" + info.param.label);
}

// ---- helpers ---------------------------------------------------------------------------------

double rel_error(const torch::Tensor& ref, const torch::Tensor& got) {
  const torch::Tensor r = ref.to(torch::kDouble), g = got.to(torch::kDouble);
  const double denom = r.norm().item<double>();
  return (r - g).norm().item<double>() / (denom > 0 ? denom : 1.0);
}

torch::Tensor student_t(int64_t rows, int64_t cols, int df) {
  torch::Tensor chi2 = torch::zeros({rows, cols});
  for (int i = 0; i < df; ++i) chi2 += torch::randn({rows, cols}).square();
  return torch::randn({rows, cols}) / (chi2 / df).sqrt();
}

bool tensors_identical(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.to(torch::kCPU).equal(b.to(torch::kCPU));
}

std::string describe(const torch::Tensor& t) {
  std::ostringstream os;
  os << c10::toString(t.scalar_type()) << " " << t.sizes();
  return os.str();
}

// "" when the two states are identical, else what differs.
std::string state_difference(const TensorState& a, const TensorState& b) {
  for (const auto& [key, t] : a.tensors) {
    auto it = b.tensors.find(key);
    if (it == b.tensors.end()) return "tensor \"" + key + "\" is missing from the second";
    if (!tensors_identical(t, it->second))
      return "tensor \"" + key + "\" differs (" + describe(t) + " vs " + describe(it->second) + ")";
  }
  for (const auto& [key, _] : b.tensors)
    if (!a.tensors.count(key)) return "tensor \"" + key + "\" is only in the second";
  if (a.meta != b.meta) return "meta differs: " + a.meta.dump() + " vs " + b.meta.dump();
  return "";
}

// A state through a real safetensors file (core's writer and reader): tensors under their state
// keys, meta as a "__metadata__" string, every tensor read back into fresh memory.
TensorState through_safetensors(const TensorState& s) {
  static const std::string dir = qtune::test::temp_dir("conformance");
  static int counter = 0;
  const std::string path = dir + "/state" + std::to_string(counter++) + ".safetensors";
  qtune::write_safetensors(path, s.tensors, {{"qtune.meta", s.meta.dump()}});
  auto file = qtune::SafetensorsFile::open(path);
  TensorState out;
  for (const auto& name : file->names()) out.tensors[name] = file->tensor(name).clone();
  out.meta = Json::parse(file->metadata().at("qtune.meta"));
  return out;
}

// What `fn` threw: "" for nothing, "UserError: ..." or "<other>: ..." (a non-UserError is a
// conformance failure wherever a user-caused problem is being reported).
template <typename Fn>
std::string thrown_by(Fn&& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return std::string("UserError: ") + e.what();
  } catch (const c10::Error& e) {
    return std::string("c10::Error (not a qtune::UserError): ") + e.what_without_backtrace();
  } catch (const std::exception& e) {
    return std::string("std::exception (not a qtune::UserError): ") + e.what();
  }
  return "";
}
bool is_user_error(const std::string& thrown) { return thrown.rfind("UserError: ", 0) == 0; }

// Restores the intra-op thread count on scope exit.
struct ThreadCount {
  explicit ThreadCount(int n) : saved(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadCount() { at::set_num_threads(saved); }
  int saved;
};

// ---- fixture ---------------------------------------------------------------------------------

class Conformance : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    backend_ = registry().quant(GetParam().backend);
    const Json& user = GetParam().options;
    const torch::Tensor probe = torch::randn({64, 256});
    // check_options decides; quantize() must agree with it (it may be called with options from
    // anywhere), and every rejection must be a UserError naming what is wrong.
    const std::string by_check = thrown_by([&] {
      options_ = backend_->check_options(user, "quant.options");
      bound_ = backend_->error_bound(options_);
    });
    if (!by_check.empty()) {
      ASSERT_TRUE(is_user_error(by_check))
          << "option set " << user.dump() << " was rejected by check_options()/error_bound() "
          << "with " << by_check << "; a rejected option set must raise qtune::UserError";
      const std::string by_quantize = thrown_by([&] { backend_->quantize(probe, user); });
      ASSERT_TRUE(is_user_error(by_quantize))
          << "check_options() rejects " << user.dump() << " (" << by_check
          << ") but quantize() with the same options "
          << (by_quantize.empty() ? "accepted them" : "threw " + by_quantize)
          << "; quantize() must reject them with a UserError too";
      GTEST_SKIP() << "option set " << user.dump() << " rejected: " << by_check;
    }
    const std::string by_quantize = thrown_by([&] { backend_->quantize(probe, options_); });
    ASSERT_TRUE(by_quantize.empty())
        << "check_options() accepts " << user.dump() << " but quantize() of a 64x256 Gaussian "
        << "matrix with them threw " << by_quantize
        << "; reject such options in check_options(), so a run fails before allocating anything";
    ASSERT_GT(bound_, 0.0) << "error_bound(" << options_.dump() << ") must be positive";
    ASSERT_LT(bound_, 1.0) << "error_bound(" << options_.dump() << ") must be below 1";
    torch::manual_seed(1234);
  }

  std::unique_ptr<QuantizedWeight> quantize(const torch::Tensor& w) const {
    return backend_->quantize(w, options_);
  }

  // Backend-level consistency of one weight against its own dequantize().
  void check_consistency(const QuantizedWeight& q) const {
    const int64_t out = q.out_features(), in = q.in_features();
    const torch::Tensor deq = q.dequantize(torch::kFloat, torch::kCPU);
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      SCOPED_TRACE(c10::toString(dt));
      const double tol = dt == torch::kFloat ? kFp32Tol : kBf16Tol;
      const torch::Tensor wd = q.dequantize(dt, torch::kCPU);
      torch::Tensor x = torch::randn({2, 3, in}).to(dt);
      torch::Tensor y = q.linear(x);
      ASSERT_EQ(y.sizes(), torch::IntArrayRef({2, 3, out})) << "linear(x) has the wrong shape";
      EXPECT_EQ(y.scalar_type(), dt) << "linear(x) must return x's dtype";
      EXPECT_LT(rel_error(torch::matmul(x.to(torch::kFloat), wd.to(torch::kFloat).t()), y), tol)
          << "linear(x) must equal x @ dequantize()^T";
      torch::Tensor g = torch::randn({5, out}).to(dt);
      torch::Tensor gx = q.linear_grad_input(g);
      ASSERT_EQ(gx.sizes(), torch::IntArrayRef({5, in}))
          << "linear_grad_input(g) has the wrong shape";
      EXPECT_EQ(gx.scalar_type(), dt) << "linear_grad_input(g) must return g's dtype";
      EXPECT_LT(rel_error(torch::matmul(g.to(torch::kFloat), wd.to(torch::kFloat)), gx), tol)
          << "linear_grad_input(g) must equal g @ dequantize() (the input gradient of linear)";
    }
    const std::vector<std::pair<int64_t, int64_t>> ranges = {
        {0, out},
        {0, 1},
        {out - 1, out},
        {out / 3, out / 3 + std::min<int64_t>(out, 5)},
        {out / 2, out / 2}};
    for (auto [b, e] : ranges) {
      e = std::min(e, out);
      torch::Tensor rows = q.dequantize_rows(b, e, torch::kFloat, torch::kCPU);
      EXPECT_TRUE(tensors_identical(rows, deq.slice(0, b, e)))
          << "dequantize_rows(" << b << ", " << e << ") must be bit-identical to rows [" << b
          << ", " << e << ") of dequantize()";
    }
  }

  std::shared_ptr<QuantBackend> backend_;
  Json options_;
  double bound_ = 0.0;
};

// ---- error and bound -------------------------------------------------------------------------

TEST_P(Conformance, GaussianRoundTripWithinDeclaredBound) {
  torch::Tensor w = torch::randn({256, 512}) * 0.02;
  auto q = quantize(w);
  EXPECT_EQ(q->backend(), GetParam().backend) << "backend() must be the plugin's name";
  EXPECT_EQ(q->out_features(), 256);
  EXPECT_EQ(q->in_features(), 512);
  EXPECT_TRUE(q->device().is_cpu()) << "a weight quantized on CPU must live on CPU";
  torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);
  ASSERT_EQ(d.sizes(), w.sizes()) << "dequantize() must return [out, in]";
  EXPECT_EQ(d.scalar_type(), torch::kFloat) << "dequantize(kFloat) must return fp32";
  const double err = rel_error(w, d);
  std::printf("[ bound    ] %s %s: Gaussian 256x512 error %.5f, declared bound %.5f (ratio %.2f)\n",
              GetParam().backend.c_str(), options_.dump().c_str(), err, bound_, err / bound_);
  EXPECT_LE(err, bound_) << "the round-trip error on a Gaussian matrix exceeds error_bound()";
  EXPECT_GE(err, kTightFraction * bound_)
      << "error_bound() " << bound_ << " is more than " << 1 / kTightFraction
      << "x the measured Gaussian error " << err << "; declare a bound near what the backend "
      << "achieves (it is what users and benchmarks compare)";
  // bf16 input (what models ship in) is held to the same bound against its own values.
  torch::Tensor wb = (torch::randn({128, 256}) * 3).to(torch::kBFloat16);
  EXPECT_LE(rel_error(wb, quantize(wb)->dequantize(torch::kFloat, torch::kCPU)), bound_)
      << "the round-trip error of a bf16 Gaussian matrix exceeds error_bound()";
}

TEST_P(Conformance, HeavyTailedRoundTrip) {
  torch::Tensor w = student_t(256, 512, 3);
  const double err = rel_error(w, quantize(w)->dequantize(torch::kFloat, torch::kCPU));
  EXPECT_LE(err, kHeavyTailFactor * bound_)
      << "the round-trip error on a Student-t (df 3) matrix exceeds " << kHeavyTailFactor
      << "x error_bound()";
  EXPECT_LT(err, 1.0) << "on a Student-t (df 3) matrix the quantized weight is further from W "
                         "than a matrix of zeros";
}

// ---- matmuls and autograd --------------------------------------------------------------------

TEST_P(Conformance, LinearAndGradInputMatchDequantized) {
  check_consistency(*quantize(torch::randn({96, 160})));
}

TEST_P(Conformance, LinearAcrossRowTiles) {
  // Big enough that the default tiling (8 MB of fp32 rows per tile) needs several tiles.
  auto q = quantize(torch::randn({4500, 1024}));
  const torch::Tensor wd = q->dequantize(torch::kFloat, torch::kCPU);
  torch::Tensor x = torch::randn({4, 1024});
  EXPECT_LT(rel_error(torch::matmul(x, wd.t()), q->linear(x)), kFp32Tol)
      << "linear(x) of a 4500x1024 weight (several row tiles) must equal x @ dequantize()^T";
  torch::Tensor g = torch::randn({4, 4500});
  EXPECT_LT(rel_error(torch::matmul(g, wd), q->linear_grad_input(g)), kFp32Tol)
      << "linear_grad_input(g) of a 4500x1024 weight (several row tiles) must equal "
         "g @ dequantize()";
}

TEST_P(Conformance, AutogradGivesGradXOnly) {
  std::shared_ptr<QuantizedWeight> q = quantize(torch::randn({48, 80}));
  const torch::Tensor wd = q->dequantize(torch::kFloat, torch::kCPU);
  torch::Tensor x = torch::randn({3, 7, 80}, torch::requires_grad());
  torch::Tensor y = qtune::QuantizedLinearFunction::run(x, q);
  EXPECT_LT(rel_error(torch::matmul(x.detach(), wd.t()), y.detach()), kFp32Tol)
      << "QuantizedLinearFunction forward (the backend's linear) must equal x @ dequantize()^T";
  torch::Tensor g = torch::randn({3, 7, 48});
  y.backward(g);
  ASSERT_TRUE(x.grad().defined()) << "no input gradient through QuantizedLinearFunction";
  EXPECT_LT(rel_error(torch::matmul(g, wd), x.grad()), kFp32Tol)
      << "the input gradient (the backend's linear_grad_input) must equal g @ dequantize()";
  for (const auto& [key, t] : q->state().tensors) {
    EXPECT_FALSE(t.requires_grad()) << "state tensor \"" << key << "\" requires grad";
    EXPECT_FALSE(t.grad().defined()) << "state tensor \"" << key << "\" received a gradient";
  }
  // The module form: the tensors the weight holds are buffers, never parameters.
  qtune::QuantizedLinear module(q);
  EXPECT_TRUE(module->parameters().empty()) << "a quantized weight must have no parameters";
  EXPECT_EQ(module->buffers().size(), held_tensors(*q).size())
      << "every held state tensor must become a module buffer";
  EXPECT_FALSE(held_tensors(*q).empty()) << "state() holds no tensor of the weight";
  torch::Tensor x2 = torch::randn({5, 80}, torch::requires_grad());
  module->forward(x2).sum().backward();
  EXPECT_LT(rel_error(wd.sum(0).expand({5, 80}), x2.grad()), kFp32Tol)
      << "QuantizedLinear's input gradient must equal ones @ dequantize()";
}

TEST_P(Conformance, DequantizeDtypesAgree) {
  auto q = quantize(torch::randn({50, 70}));
  const torch::Tensor f = q->dequantize(torch::kFloat, torch::kCPU);
  const torch::Tensor b = q->dequantize(torch::kBFloat16, torch::kCPU);
  EXPECT_EQ(b.scalar_type(), torch::kBFloat16) << "dequantize(kBFloat16) must return bf16";
  EXPECT_LE((b.to(torch::kFloat) - f).abs().max().item<float>(),
            f.abs().max().item<float>() / 128.0f)
      << "dequantize(bf16) must be within one bf16 rounding of dequantize(fp32)";
}

// ---- state, nbytes, load ---------------------------------------------------------------------

TEST_P(Conformance, StateIsTheWeightsOwnStorage) {
  auto q = quantize(torch::randn({256, 512}));
  const TensorState a = q->state(), b = q->state();
  ASSERT_FALSE(a.tensors.empty()) << "state() has no tensors";
  int64_t derived = 0;
  for (const auto& [key, t] : a.tensors) {
    ASSERT_TRUE(t.defined()) << "state tensor \"" << key << "\" is undefined";
    auto it = b.tensors.find(key);
    ASSERT_NE(it, b.tensors.end())
        << "two calls of state() gave different keys (\"" << key << "\" only in the first)";
    if (t.data_ptr() == it->second.data_ptr()) continue;
    const int64_t bytes = t.numel() * t.element_size();
    derived += bytes;
    EXPECT_LE(bytes, kMaxDerivedBytes)
        << "state tensor \"" << key << "\" (" << describe(t) << ", " << bytes
        << " bytes) is a new copy on every call of state(); state() must hand out the tensors "
        << "the weight holds (same storage on every call), or the trainer, checkpoints and "
        << "qtune-bench count the wrong memory (only records of at most " << kMaxDerivedBytes
        << " bytes may be rebuilt on each call)";
  }
  EXPECT_LE(derived, kMaxDerivedBytes) << "state() rebuilds " << derived << " bytes per call";
  EXPECT_EQ(a.tensors.size(), b.tensors.size()) << "two calls of state() gave different keys";
}

TEST_P(Conformance, NbytesCoversTheState) {
  auto a = quantize(torch::randn({256, 512}));
  auto b = quantize(torch::randn({256, 512}));
  // Tensors whose storage two independent weights share are process-wide constants (code
  // tables); a backend may leave them out of nbytes. Everything else it holds must be counted.
  std::set<const void*> shared;
  for (const auto& [_, t] : b->state().tensors) shared.insert(t.data_ptr());
  int64_t own = 0, all = 0;
  const TensorState s = a->state();
  for (const auto& [key, t] : s.tensors) all += t.numel() * t.element_size();
  for (const auto& [key, t] : held_tensors(*a))
    if (!shared.count(t.data_ptr())) own += t.numel() * t.element_size();
  EXPECT_GE(a->nbytes(), own) << "nbytes() " << a->nbytes() << " is less than the " << own
                              << " bytes of the tensors state() hands out";
  EXPECT_LE(a->nbytes(), all + static_cast<int64_t>(s.meta.dump().size()) + 65536)
      << "nbytes() is far more than the state holds";
  EXPECT_LT(a->nbytes(), 256 * 512 * 2) << "a quantized weight must be smaller than fp16";
}

TEST_P(Conformance, SaveLoadIsBitExact) {
  auto q = quantize(torch::randn({70, 130}));
  const TensorState s = q->state();
  EXPECT_EQ(s.meta.value("backend", ""), GetParam().backend) << "state meta.backend";
  EXPECT_EQ(s.meta.value("shape", Json()), Json({70, 130})) << "state meta.shape";
  EXPECT_TRUE(s.meta.contains("options")) << "state meta has no \"options\"";
  const torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);

  auto direct = backend_->load(s);
  EXPECT_TRUE(tensors_identical(d, direct->dequantize(torch::kFloat, torch::kCPU)))
      << "load(state()) dequantizes differently";
  EXPECT_EQ(state_difference(s, direct->state()), "") << "load(state()).state() != state()";

  const TensorState parsed = through_safetensors(s);
  auto reloaded = backend_->load(parsed);
  EXPECT_EQ(reloaded->out_features(), 70);
  EXPECT_EQ(reloaded->in_features(), 130);
  EXPECT_TRUE(tensors_identical(d, reloaded->dequantize(torch::kFloat, torch::kCPU)))
      << "a state written to and read from a safetensors file dequantizes differently";
  EXPECT_TRUE(tensors_identical(q->dequantize(torch::kBFloat16, torch::kCPU),
                                reloaded->dequantize(torch::kBFloat16, torch::kCPU)))
      << "a state read from a safetensors file dequantizes differently in bf16";
  EXPECT_EQ(state_difference(s, reloaded->state()), "")
      << "a state read from a safetensors file reloads to another state";
  torch::Tensor x = torch::randn({4, 130});
  EXPECT_TRUE(tensors_identical(q->linear(x), reloaded->linear(x)))
      << "a reloaded weight's linear differs";
}

// A corrupt state in each way a file can be corrupt; load() must refuse each with a UserError.
TEST_P(Conformance, LoadRejectsCorruptStates) {
  auto q = quantize(torch::randn({70, 130}));
  const TensorState good = through_safetensors(q->state());
  auto expect_refused = [&](const TensorState& bad, const std::string& what) {
    const std::string thrown = thrown_by([&] { backend_->load(bad); });
    EXPECT_TRUE(is_user_error(thrown))
        << "load() " << (thrown.empty() ? "accepted" : "threw " + thrown + " for")
        << " a state whose " << what << "; load() must check every tensor's presence, dtype "
        << "and shape against the layout its meta implies, and refuse with a qtune::UserError "
        << "naming the key (a checkpoint is user input)";
  };
  for (const auto& [key, t] : good.tensors) {
    TensorState missing = good;
    missing.tensors.erase(key);
    expect_refused(missing, "tensor \"" + key + "\" is missing");

    TensorState truncated = good;
    torch::Tensor cut = t.dim() >= 1 && t.size(0) > 1 ? t.slice(0, 0, t.size(0) - 1)
                                                      : t.flatten().slice(0, 0, t.numel() - 1);
    truncated.tensors[key] = cut.clone();
    expect_refused(truncated, "tensor \"" + key + "\" was truncated from " + describe(t) + " to " +
                                  describe(cut));

    const torch::ScalarType other = t.scalar_type() == torch::kFloat   ? torch::kDouble
                                    : t.is_floating_point()            ? torch::kFloat
                                    : t.scalar_type() == torch::kShort ? torch::kInt
                                                                       : torch::kShort;
    TensorState retyped = good;
    retyped.tensors[key] = t.to(other);
    expect_refused(retyped, "tensor \"" + key + "\" was converted from " + describe(t) + " to " +
                                c10::toString(other));
  }
  TensorState extra = good;
  extra.tensors["weight.conformance_extra"] = torch::zeros({3});
  expect_refused(extra, "has an unexpected tensor \"weight.conformance_extra\"");
  TensorState other_backend = good;
  other_backend.meta["backend"] = "not_" + GetParam().backend;
  expect_refused(other_backend, "meta.backend is \"not_" + GetParam().backend + "\"");
  if (good.meta.contains("format_version") && good.meta["format_version"].is_number_integer()) {
    TensorState future = good;
    future.meta["format_version"] = good.meta["format_version"].get<int64_t>() + 1;
    expect_refused(future, "meta.format_version is one more than this plugin writes");
  }
}

// ---- determinism, shapes, options ------------------------------------------------------------

TEST_P(Conformance, QuantizeIsDeterministic) {
  torch::Tensor w = torch::randn({64, 192});
  EXPECT_EQ(state_difference(quantize(w)->state(), quantize(w)->state()), "")
      << "quantizing the same matrix twice gave different states";
  // Ranks and machines differ in their intra-op thread count; the result must not. Large enough
  // that chunked or parallel quantizers split it.
  torch::Tensor big = torch::randn({1100, 1024});
  TensorState one, three;
  {
    ThreadCount t(1);
    one = quantize(big)->state();
  }
  {
    ThreadCount t(3);
    three = quantize(big)->state();
  }
  EXPECT_EQ(state_difference(one, three), "")
      << "quantizing a 1100x1024 matrix with 1 and with 3 intra-op threads "
         "(at::set_num_threads) gave different states; data-parallel ranks must agree bit for bit";
}

TEST_P(Conformance, OddShapesWorkOrRaiseUserError) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{33, 17},  {1, 1}, {127, 65},
                                                           {1, 4097}, {5, 1}, {3, 1000}};
  for (auto [out, in] : shapes) {
    SCOPED_TRACE(testing::Message() << "a " << out << "x" << in << " matrix");
    torch::Tensor w = torch::randn({out, in});
    std::unique_ptr<QuantizedWeight> q;
    const std::string thrown = thrown_by([&] { q = quantize(w); });
    if (!thrown.empty()) {
      EXPECT_TRUE(is_user_error(thrown))
          << "quantize() threw " << thrown << "; a shape it cannot take must raise a UserError";
      EXPECT_GT(thrown.size(), 21u) << "a rejection must say why";
      continue;
    }
    ASSERT_EQ(q->out_features(), out);
    ASSERT_EQ(q->in_features(), in);
    torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);
    ASSERT_EQ(d.sizes(), w.sizes()) << "dequantize() must return [out, in]";
    EXPECT_TRUE(torch::isfinite(d).all().item<bool>()) << "dequantize() gave NaN or Inf";
    EXPECT_LE(rel_error(w, d), kSmallShapeFactor * bound_)
        << "round-trip error above " << kSmallShapeFactor << "x error_bound()";
    check_consistency(*q);
    auto reloaded = backend_->load(through_safetensors(q->state()));
    EXPECT_TRUE(tensors_identical(d, reloaded->dequantize(torch::kFloat, torch::kCPU)))
        << "state() -> safetensors -> load() is not bit-exact";
  }
}

TEST_P(Conformance, NonMatrixInputRaisesUserError) {
  for (const auto& input : std::vector<std::pair<torch::Tensor, std::string>>{
           {torch::randn({64}), "a 1-D tensor"},
           {torch::randn({2, 8, 64}), "a 3-D tensor"},
           {torch::ones({8, 64}, torch::kLong), "an integer matrix"},
           {torch::full({8, 64}, std::nan("")), "a matrix of NaN"}}) {
    const std::string thrown = thrown_by([&] { quantize(input.first); });
    EXPECT_TRUE(is_user_error(thrown))
        << "quantize() of " << input.second << " "
        << (thrown.empty() ? "was accepted" : "threw " + thrown) << "; it must raise a UserError";
  }
  // An empty matrix is either rejected or round-trips as empty.
  std::unique_ptr<QuantizedWeight> q;
  const std::string thrown = thrown_by([&] { q = quantize(torch::randn({0, 64})); });
  if (thrown.empty())
    EXPECT_EQ(q->dequantize(torch::kFloat, torch::kCPU).numel(), 0)
        << "an empty matrix must round-trip as empty";
  else
    EXPECT_TRUE(is_user_error(thrown)) << "quantize() of a 0x64 matrix threw " << thrown;
}

TEST_P(Conformance, BadOptionsRaiseUserErrorNamingTheKey) {
  const auto schema = backend_->option_schema();
  torch::Tensor w = torch::randn({16, 256});
  auto message_of = [&](const Json& user, bool through_quantize) -> std::string {
    const std::string thrown = thrown_by([&] {
      if (through_quantize)
        backend_->quantize(w, user);
      else
        backend_->check_options(user, "quant.options");
    });
    if (thrown.empty()) return "<accepted>";
    return is_user_error(thrown) ? thrown : "<not a UserError> " + thrown;
  };
  auto expect_named = [&](const Json& user, const std::string& key, const std::string& what) {
    const std::string checked = message_of(user, false), quantized = message_of(user, true);
    EXPECT_NE(checked.find("UserError: "), std::string::npos)
        << "check_options() with " << what << ": " << checked;
    EXPECT_NE(checked.find("quant.options." + key), std::string::npos)
        << "check_options() with " << what << " must name quant.options." << key << ", got "
        << checked;
    EXPECT_NE(quantized.find(key), std::string::npos)
        << "quantize() with " << what << " must raise a UserError naming " << key
        << " (it must check its options too), got " << quantized;
  };
  expect_named(Json{{"no_such_option", 1}}, "no_such_option", "an unknown option");
  // check_options of its own result changes nothing (resolved options are passed around).
  EXPECT_EQ(backend_->check_options(options_, "quant.options"), options_)
      << "check_options() of resolved options must return them unchanged";
  for (const auto& spec : schema) {
    const Json& d = spec.default_value;
    std::vector<std::pair<Json, std::string>> bad = {
        {d.is_string() ? Json(42) : Json("not-a-" + spec.name), "a value of the wrong type"}};
    if (spec.min.is_number() && d.is_number_integer())
      bad.push_back({spec.min.get<int64_t>() - 1, "a value below its declared min"});
    if (spec.max.is_number() && d.is_number_integer())
      bad.push_back({spec.max.get<int64_t>() + 1, "a value above its declared max"});
    if (spec.min.is_number() && d.is_number_float())
      bad.push_back({spec.min.get<double>() - 1.0, "a value below its declared min"});
    if (!spec.choices.empty())
      bad.push_back({d.is_string() ? Json("not-a-choice") : Json(1234567), "an undeclared choice"});
    for (const auto& [value, what] : bad) {
      Json user = options_;
      user[spec.name] = value;
      expect_named(user, spec.name, spec.name + " = " + value.dump() + " (" + what + ")");
    }
  }
}

TEST_P(Conformance, ToCpuKeepsWorking) {
  std::shared_ptr<QuantizedWeight> q = quantize(torch::randn({40, 96}));
  const torch::Tensor before = q->dequantize(torch::kFloat, torch::kCPU);
  q->to(torch::kCPU);
  EXPECT_TRUE(q->device().is_cpu());
  EXPECT_TRUE(tensors_identical(before, q->dequantize(torch::kFloat, torch::kCPU)))
      << "to(cpu) changed the weight";
  for (const auto& [key, t] : q->state().tensors)
    EXPECT_TRUE(t.is_cpu()) << "state tensor \"" << key << "\" is not on CPU after to(cpu)";
  qtune::QuantizedLinear module(q);
  module->to(torch::kCPU);
  torch::Tensor x = torch::randn({2, 96});
  EXPECT_LT(rel_error(torch::matmul(x, before.t()), module->forward(x)), kFp32Tol)
      << "QuantizedLinear after to(cpu) must equal x @ dequantize()^T";
}

std::vector<Case> all_cases() {
  static const std::vector<Case> cases = discover_cases();
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Plugins, Conformance, testing::ValuesIn(all_cases()), case_name);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Conformance);

// Not parameterized: the suite is pointless when it finds nothing, and a plugin that failed to
// load would otherwise just be missing from the list.
TEST(ConformanceDiscovery, FindsQuantPluginsAndLoadsThemAll) {
  int quant = 0;
  for (const auto& rec : registry().plugins()) quant += rec.kind == "quant";
  EXPECT_GT(quant, 0) << "no quantization plugin found in the default plugin folder or "
                         "QTUNE_PLUGIN_PATH";
  for (const auto& e : registry().errors()) ADD_FAILURE() << "plugin failed to load: " << e;
  if (!g_quant_sets.empty())
    for (const auto& s : qtune::parse_option_sets(g_quant_sets, "--quant_sets"))
      EXPECT_NO_THROW(registry().quant(s.name))
          << "--quant_sets names plugin \"" << s.name << "\", which was not found";
}

// Each failed check is also reported as one line naming the check, the plugin and the option
// set, so a failure reads without the suite's source.
class FailureNamer : public testing::EmptyTestEventListener {
  // The names are kept from OnTestStart: asking UnitTest::current_test_info() from inside
  // OnTestPartResult deadlocks (gtest holds its own mutex while it reports a result).
  void OnTestStart(const testing::TestInfo& t) override {
    name_ = t.name();
    who_ = t.value_param() != nullptr ? t.value_param() : "-";
  }
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed() || name_.empty()) return;
    std::printf("conformance: FAIL check %s for plugin %s: %s\n", name_.c_str(), who_.c_str(),
                r.summary());
  }
  std::string name_, who_;
};

}  // namespace

int main(int argc, char** argv) {
  // --quant_sets 'name:{json};...' (or --quant_sets=...): extra option sets, read before gtest
  // generates the cases.
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quant_sets" && i + 1 < argc) {
      g_quant_sets = argv[++i];
    } else if (a.rfind("--quant_sets=", 0) == 0) {
      g_quant_sets = a.substr(std::strlen("--quant_sets="));
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (!g_quant_sets.empty()) {
    try {
      qtune::parse_option_sets(g_quant_sets, "--quant_sets");
    } catch (const UserError& e) {
      std::fprintf(stderr, "qtune_conformance: error: %s\n", e.what());
      return 2;
    }
  }
  int n = static_cast<int>(rest.size());
  rest.push_back(nullptr);  // argv[argc] is null
  testing::InitGoogleTest(&n, rest.data());
  testing::UnitTest::GetInstance()->listeners().Append(new FailureNamer);
  return RUN_ALL_TESTS();
}
