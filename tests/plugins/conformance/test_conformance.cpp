// The conformance suite every quantization plugin must pass unchanged. It is parameterized over
// every quant plugin the registry finds (the build's plugin folder, plus QTUNE_PLUGIN_PATH for
// out-of-tree plugins) and over option sets derived from each plugin's schema: the defaults, each
// boolean option flipped, and each integer option halved and doubled (a set the plugin rejects
// with a UserError is skipped). Nothing here names a backend.
//
// What a backend must do (tolerances are documented where they are used):
//  - relative Frobenius round-trip error <= error_bound() on Gaussian matrices, and
//    <= kHeavyTailFactor * error_bound() on Student-t (df = 3) matrices;
//  - linear(x) == x @ dequantize()^T and linear_grad_input(g) == g @ dequantize() in fp32 and
//    bf16, also across its internal row tiles;
//  - through QuantizedLinearFunction: the right grad_x and no gradient anywhere else;
//  - state() -> load() is bit-exact, also through a safetensors file;
//  - nbytes() covers every tensor it does not share with other weights, and is below fp16 size;
//  - odd shapes (33x17, 1x1, 127x65, ...) quantize correctly or raise UserError, never crash;
//    non-2-D input and bad options raise UserError naming the problem;
//  - quantizing is deterministic (data-parallel ranks quantize the same file independently);
//  - to(cpu) keeps working; dequantize_rows agrees with slices of dequantize.
#include <gtest/gtest.h>

#include <cctype>
#include <cstring>
#include <functional>
#include <set>

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
// absmax/range-based scale. A backend may be this much worse than its Gaussian bound there.
constexpr double kHeavyTailFactor = 2.0;
// Tiny or odd matrices have few blocks, so their error is a noisier statistic.
constexpr double kSmallShapeFactor = 1.5;
// Normalized error between our reference matmul and the backend's linear.
constexpr double kFp32Tol = 1e-5;
constexpr double kBf16Tol = 1e-2;  // two bf16 roundings (2^-8 each) of differently summed results

// ---- discovery ----------------------------------------------------------------------------------

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

std::vector<Case> discover_cases() {
  std::vector<Case> cases;
  for (const auto& rec : registry().plugins()) {
    if (rec.kind != "quant") continue;
    cases.push_back({rec.name, Json::object(), "default"});
    for (const auto& spec : registry().quant(rec.name)->option_schema()) {
      const Json& d = spec.default_value;
      if (d.is_boolean()) {
        cases.push_back({rec.name, Json{{spec.name, !d.get<bool>()}},
                         spec.name + (d.get<bool>() ? "_false" : "_true")});
      } else if (d.is_number_integer()) {
        const int64_t v = d.get<int64_t>();
        for (int64_t alt : {v / 2, v * 2})
          if (alt != v && alt != 0)
            cases.push_back(
                {rec.name, Json{{spec.name, alt}}, spec.name + "_" + std::to_string(alt)});
      }
    }
  }
  return cases;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.backend << " " << c.options.dump(); }

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return sanitize(info.param.backend + "_" + info.param.label);
}

// ---- helpers
// ---------------------------------------------------------------------------------------

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

void expect_states_identical(const TensorState& a, const TensorState& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [key, t] : a.tensors) {
    auto it = b.tensors.find(key);
    ASSERT_NE(it, b.tensors.end()) << "missing " << key;
    EXPECT_TRUE(tensors_identical(t, it->second)) << key;
  }
  EXPECT_EQ(a.meta, b.meta);
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

// ---- fixture
// ---------------------------------------------------------------------------------------

class Conformance : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    backend_ = registry().quant(GetParam().backend);
    // A derived option set the backend rejects (in its schema check, error_bound or quantize)
    // is skipped: halving or doubling an integer need not give a valid value.
    try {
      options_ =
          qtune::resolve_options(backend_->option_schema(), GetParam().options, "quant.options");
      bound_ = backend_->error_bound(options_);
      backend_->quantize(torch::randn({64, 256}), options_);
    } catch (const UserError& e) {
      GTEST_SKIP() << "option set " << GetParam().options.dump() << " rejected: " << e.what();
    }
    ASSERT_GT(bound_, 0.0);
    ASSERT_LT(bound_, 1.0);
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
      ASSERT_EQ(y.sizes(), torch::IntArrayRef({2, 3, out}));
      EXPECT_EQ(y.scalar_type(), dt);
      EXPECT_LT(rel_error(torch::matmul(x.to(torch::kFloat), wd.to(torch::kFloat).t()), y), tol);
      torch::Tensor g = torch::randn({5, out}).to(dt);
      torch::Tensor gx = q.linear_grad_input(g);
      ASSERT_EQ(gx.sizes(), torch::IntArrayRef({5, in}));
      EXPECT_EQ(gx.scalar_type(), dt);
      EXPECT_LT(rel_error(torch::matmul(g.to(torch::kFloat), wd.to(torch::kFloat)), gx), tol);
    }
    // dequantize_rows == slices of dequantize, bit for bit.
    const std::vector<std::pair<int64_t, int64_t>> ranges = {
        {0, out},
        {0, 1},
        {out - 1, out},
        {out / 3, out / 3 + std::min<int64_t>(out, 5)},
        {out / 2, out / 2}};
    for (auto [b, e] : ranges) {
      e = std::min(e, out);
      torch::Tensor rows = q.dequantize_rows(b, e, torch::kFloat, torch::kCPU);
      EXPECT_TRUE(tensors_identical(rows, deq.slice(0, b, e))) << "rows [" << b << ", " << e << ")";
    }
  }

  std::shared_ptr<QuantBackend> backend_;
  Json options_;
  double bound_ = 0.0;
};

// ---- tests
// -----------------------------------------------------------------------------------------

TEST_P(Conformance, GaussianRoundTripWithinDeclaredBound) {
  torch::Tensor w = torch::randn({256, 512}) * 0.02;
  auto q = quantize(w);
  EXPECT_EQ(q->backend(), GetParam().backend);
  EXPECT_EQ(q->out_features(), 256);
  EXPECT_EQ(q->in_features(), 512);
  EXPECT_TRUE(q->device().is_cpu());
  torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);
  ASSERT_EQ(d.sizes(), w.sizes());
  EXPECT_EQ(d.scalar_type(), torch::kFloat);
  EXPECT_LE(rel_error(w, d), bound_);
  // bf16 input (what models ship in) is held to the same bound against its own values.
  torch::Tensor wb = (torch::randn({128, 256}) * 3).to(torch::kBFloat16);
  EXPECT_LE(rel_error(wb, quantize(wb)->dequantize(torch::kFloat, torch::kCPU)), bound_);
}

TEST_P(Conformance, HeavyTailedRoundTrip) {
  torch::Tensor w = student_t(256, 512, 3);
  EXPECT_LE(rel_error(w, quantize(w)->dequantize(torch::kFloat, torch::kCPU)),
            kHeavyTailFactor * bound_);
}

TEST_P(Conformance, LinearAndGradInputMatchDequantized) {
  check_consistency(*quantize(torch::randn({96, 160})));
}

TEST_P(Conformance, LinearAcrossRowTiles) {
  // Big enough that the default tiling (8 MB of fp32 rows per tile) needs several tiles.
  auto q = quantize(torch::randn({4500, 1024}));
  const torch::Tensor wd = q->dequantize(torch::kFloat, torch::kCPU);
  torch::Tensor x = torch::randn({4, 1024});
  EXPECT_LT(rel_error(torch::matmul(x, wd.t()), q->linear(x)), kFp32Tol);
  torch::Tensor g = torch::randn({4, 4500});
  EXPECT_LT(rel_error(torch::matmul(g, wd), q->linear_grad_input(g)), kFp32Tol);
}

TEST_P(Conformance, AutogradGivesGradXOnly) {
  std::shared_ptr<QuantizedWeight> q = quantize(torch::randn({48, 80}));
  const torch::Tensor wd = q->dequantize(torch::kFloat, torch::kCPU);
  torch::Tensor x = torch::randn({3, 7, 80}, torch::requires_grad());
  torch::Tensor y = qtune::QuantizedLinearFunction::run(x, q);
  EXPECT_LT(rel_error(torch::matmul(x.detach(), wd.t()), y.detach()), kFp32Tol);
  torch::Tensor g = torch::randn({3, 7, 48});
  y.backward(g);
  ASSERT_TRUE(x.grad().defined());
  EXPECT_LT(rel_error(torch::matmul(g, wd), x.grad()), kFp32Tol);
  for (const auto& [key, t] : q->state().tensors) {
    EXPECT_FALSE(t.requires_grad()) << key;
    EXPECT_FALSE(t.grad().defined()) << key;
  }
  // The module form: the tensors the weight holds are buffers, never parameters.
  qtune::QuantizedLinear module(q);
  EXPECT_TRUE(module->parameters().empty());
  EXPECT_EQ(module->buffers().size(), held_tensors(*q).size());
  EXPECT_FALSE(held_tensors(*q).empty());
  torch::Tensor x2 = torch::randn({5, 80}, torch::requires_grad());
  module->forward(x2).sum().backward();
  EXPECT_LT(rel_error(wd.sum(0).expand({5, 80}), x2.grad()), kFp32Tol);
}

TEST_P(Conformance, SaveLoadIsBitExact) {
  auto q = quantize(torch::randn({70, 130}));
  const TensorState s = q->state();
  EXPECT_EQ(s.meta.value("backend", ""), GetParam().backend);
  EXPECT_EQ(s.meta.value("shape", Json()), Json({70, 130}));
  EXPECT_TRUE(s.meta.contains("options"));
  const torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);

  auto direct = backend_->load(s);
  EXPECT_TRUE(tensors_identical(d, direct->dequantize(torch::kFloat, torch::kCPU)));
  expect_states_identical(s, direct->state());

  const TensorState parsed = through_safetensors(s);
  auto reloaded = backend_->load(parsed);
  EXPECT_EQ(reloaded->out_features(), 70);
  EXPECT_EQ(reloaded->in_features(), 130);
  EXPECT_TRUE(tensors_identical(d, reloaded->dequantize(torch::kFloat, torch::kCPU)));
  EXPECT_TRUE(tensors_identical(q->dequantize(torch::kBFloat16, torch::kCPU),
                                reloaded->dequantize(torch::kBFloat16, torch::kCPU)));
  expect_states_identical(s, reloaded->state());
  // The reloaded weight behaves the same.
  torch::Tensor x = torch::randn({4, 130});
  EXPECT_TRUE(tensors_identical(q->linear(x), reloaded->linear(x)));
}

TEST_P(Conformance, NbytesCoversTheState) {
  auto a = quantize(torch::randn({256, 512}));
  auto b = quantize(torch::randn({256, 512}));
  // Tensors whose storage two independent weights share are process-wide constants (code
  // tables), and tensors state() rebuilds on every call (serialised records) are derived, not
  // held (held_tensors); a backend may leave both out of nbytes. Everything else must be counted.
  std::set<const void*> shared;
  for (const auto& [_, t] : b->state().tensors) shared.insert(t.data_ptr());
  int64_t own = 0, all = 0;
  const TensorState s = a->state();
  for (const auto& [key, t] : s.tensors) all += t.numel() * t.element_size();
  for (const auto& [key, t] : held_tensors(*a))
    if (!shared.count(t.data_ptr())) own += t.numel() * t.element_size();
  EXPECT_GE(a->nbytes(), own);
  EXPECT_LE(a->nbytes(), all + static_cast<int64_t>(s.meta.dump().size()) + 65536);
  EXPECT_LT(a->nbytes(), 256 * 512 * 2) << "a quantized weight must be smaller than fp16";
}

TEST_P(Conformance, QuantizeIsDeterministic) {
  torch::Tensor w = torch::randn({64, 192});
  expect_states_identical(quantize(w)->state(), quantize(w)->state());
}

TEST_P(Conformance, OddShapesWorkOrRaiseUserError) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{33, 17},  {1, 1}, {127, 65},
                                                           {1, 4097}, {5, 1}, {3, 1000}};
  for (auto [out, in] : shapes) {
    SCOPED_TRACE(testing::Message() << out << "x" << in);
    torch::Tensor w = torch::randn({out, in});
    std::unique_ptr<QuantizedWeight> q;
    try {
      q = quantize(w);
    } catch (const UserError& e) {
      EXPECT_GT(std::strlen(e.what()), 10u) << "a rejection must say why";
      continue;
    }  // anything else propagates and fails the test
    ASSERT_EQ(q->out_features(), out);
    ASSERT_EQ(q->in_features(), in);
    torch::Tensor d = q->dequantize(torch::kFloat, torch::kCPU);
    ASSERT_EQ(d.sizes(), w.sizes());
    EXPECT_TRUE(torch::isfinite(d).all().item<bool>());
    EXPECT_LE(rel_error(w, d), kSmallShapeFactor * bound_);
    check_consistency(*q);
    auto reloaded = backend_->load(through_safetensors(q->state()));
    EXPECT_TRUE(tensors_identical(d, reloaded->dequantize(torch::kFloat, torch::kCPU)));
  }
}

TEST_P(Conformance, NonMatrixInputRaisesUserError) {
  EXPECT_THROW(quantize(torch::randn({64})), UserError);
  EXPECT_THROW(quantize(torch::randn({2, 8, 64})), UserError);
  EXPECT_THROW(quantize(torch::ones({8, 64}, torch::kLong)), UserError);
  // An empty matrix is either rejected or round-trips as empty.
  try {
    auto q = quantize(torch::randn({0, 64}));
    EXPECT_EQ(q->dequantize(torch::kFloat, torch::kCPU).numel(), 0);
  } catch (const UserError&) {
  }
}

TEST_P(Conformance, BadOptionsRaiseUserErrorNamingTheKey) {
  const auto schema = backend_->option_schema();
  torch::Tensor w = torch::randn({16, 256});
  auto message_of = [&](const Json& user, bool through_quantize) -> std::string {
    try {
      if (through_quantize)
        backend_->quantize(w, user);
      else
        qtune::resolve_options(schema, user, "quant.options");
    } catch (const UserError& e) {
      return e.what();
    }
    return "<accepted>";
  };
  const Json unknown = {{"no_such_option", 1}};
  EXPECT_NE(message_of(unknown, false).find("quant.options.no_such_option"), std::string::npos);
  EXPECT_NE(message_of(unknown, true).find("no_such_option"), std::string::npos)
      << "quantize() must check its options too";
  for (const auto& spec : schema) {
    const Json& d = spec.default_value;
    const Json wrong = d.is_string() ? Json(42) : Json("not-a-" + spec.name);
    Json user = options_;
    user[spec.name] = wrong;
    EXPECT_NE(message_of(user, false).find("quant.options." + spec.name), std::string::npos)
        << spec.name;
    EXPECT_NE(message_of(user, true).find(spec.name), std::string::npos)
        << "quantize() with a " << wrong.dump() << " " << spec.name;
  }
}

TEST_P(Conformance, ToCpuKeepsWorking) {
  std::shared_ptr<QuantizedWeight> q = quantize(torch::randn({40, 96}));
  const torch::Tensor before = q->dequantize(torch::kFloat, torch::kCPU);
  q->to(torch::kCPU);
  EXPECT_TRUE(q->device().is_cpu());
  EXPECT_TRUE(tensors_identical(before, q->dequantize(torch::kFloat, torch::kCPU)));
  for (const auto& [key, t] : q->state().tensors) EXPECT_TRUE(t.is_cpu()) << key;
  qtune::QuantizedLinear module(q);
  module->to(torch::kCPU);
  torch::Tensor x = torch::randn({2, 96});
  EXPECT_LT(rel_error(torch::matmul(x, before.t()), module->forward(x)), kFp32Tol);
}

TEST_P(Conformance, DequantizeDtypesAgree) {
  auto q = quantize(torch::randn({50, 70}));
  const torch::Tensor f = q->dequantize(torch::kFloat, torch::kCPU);
  const torch::Tensor b = q->dequantize(torch::kBFloat16, torch::kCPU);
  EXPECT_EQ(b.scalar_type(), torch::kBFloat16);
  // Within one bf16 rounding of the fp32 result.
  EXPECT_LE((b.to(torch::kFloat) - f).abs().max().item<float>(),
            f.abs().max().item<float>() / 128.0f);
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
}

}  // namespace
