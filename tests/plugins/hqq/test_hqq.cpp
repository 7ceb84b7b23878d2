// Unit tests of the HQQ backend (linked from hqq_objects): options, bit packing, the min/max
// initialisation on hand-checkable groups, the proximal solver, 8-bit meta quantization, state
// round trips, tiled dequantization and error bounds.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>

#include "hqq_backend.h"
#include "qtune/error.h"

using qtune::Json;
using namespace qtune::hqq;

namespace {

torch::Tensor gaussian(int64_t out, int64_t in, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({out, in});
}

// Student-t with 3 degrees of freedom: Z / sqrt(chi2_3 / 3).
torch::Tensor student_t3(int64_t out, int64_t in, uint64_t seed) {
  torch::manual_seed(seed);
  torch::Tensor z = torch::randn({out, in});
  torch::Tensor chi2 = torch::randn({3, out, in}).square().sum(0);
  return z / (chi2 / 3).sqrt();
}

double rel_error(const torch::Tensor& w, const torch::Tensor& r) {
  return ((w - r).norm() / w.norm()).item<double>();
}

std::unique_ptr<qtune::QuantizedWeight> quant(const torch::Tensor& w, const Json& opts) {
  return HqqBackend().quantize(w, opts);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const qtune::UserError& e) {
    return e.what();
  }
  return "";
}

bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         (a.scalar_type() == torch::kUInt8
              ? torch::equal(a, b)
              : torch::equal(a.view(torch::kUInt8), b.view(torch::kUInt8)));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

TEST(HqqOptions, DefaultsAndSchema) {
  const HqqParams p = parse_params(Json::object());
  EXPECT_EQ(p.nbits, 4);
  EXPECT_EQ(p.group_size, 64);
  EXPECT_EQ(p.axis, 1);
  EXPECT_TRUE(p.optimize);
  EXPECT_EQ(p.iterations, 20);
  EXPECT_FALSE(p.quant_scale);
  EXPECT_FALSE(p.quant_zero);
  EXPECT_EQ(p.meta_dtype, "fp16");
  EXPECT_EQ(HqqBackend().name(), "hqq");
  EXPECT_EQ(HqqBackend().option_schema().size(), 8u);
}

TEST(HqqOptions, BadValuesNameTheKeyAndTheAllowedSet) {
  struct Case {
    Json opts;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{{"nbits", 5}}, "quant.options.nbits must be one of 2, 3, 4, 8, got 5"},
      {{{"nbits", 1}}, "quant.options.nbits must be one of 2, 3, 4, 8, got 1"},
      {{{"axis", 2}}, "quant.options.axis must be one of 0, 1, got 2"},
      {{{"group_size", -64}},
       "quant.options.group_size must be an integer in [0, 16384], got -64"},
      {{{"iterations", 0}}, "quant.options.iterations must be an integer in [1, 1000], got 0"},
      {{{"meta_dtype", "bf16"}},
       "quant.options.meta_dtype must be one of \"fp16\", \"fp32\", got \"bf16\""},
      {{{"nbits", "4"}}, "quant.options.nbits must be an integer"},
      {{{"optimise", true}}, "unknown option quant.options.optimise"},
  };
  const torch::Tensor w = torch::randn({4, 64});
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { quant(w, c.opts); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "options " << c.opts.dump() << ": " << msg;
    EXPECT_NE(error_of([&] { HqqBackend().error_bound(c.opts); }), "") << c.opts.dump();
  }
}

TEST(HqqOptions, BadWeights) {
  EXPECT_NE(error_of([] { quant(torch::randn({64}), {}); }).find("2-D matrix [out, in], got a 1-D tensor [64]"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              quant(torch::ones({4, 4}, torch::kInt32), {});
            }).find("floating point"),
            std::string::npos);
  EXPECT_NE(error_of([] { quant(torch::zeros({0, 4}), {}); }).find("empty"), std::string::npos);
  torch::Tensor w = torch::randn({8, 64});
  w[3][5] = std::nan("");
  EXPECT_NE(error_of([&] { quant(w, {}); }).find("NaN or Inf"), std::string::npos);
  EXPECT_NE(error_of([] {
              quant(torch::full({2, 64}, 1e9), {});
            }).find("meta_dtype"),
            std::string::npos);
  // fp32 metadata holds such values.
  auto q = quant(torch::full({2, 64}, 1e9), {{"meta_dtype", "fp32"}});
  EXPECT_TRUE(torch::allclose(q->dequantize(torch::kFloat32, torch::kCPU),
                              torch::full({2, 64}, 1e9), 1e-6));
}

// ---------------------------------------------------------------------------------------------
// Bit packing

TEST(HqqPacking, HandCheckedLayout) {
  auto u8 = [](std::vector<int> v) { return torch::tensor(v, torch::kInt32).to(torch::kUInt8); };
  EXPECT_TRUE(torch::equal(pack_codes(u8({1, 2, 3, 4}), 4), u8({0x21, 0x43})));
  EXPECT_TRUE(torch::equal(pack_codes(u8({1, 2, 3, 0, 3}), 2), u8({0x39, 0x03})));
  EXPECT_TRUE(torch::equal(pack_codes(u8({7, 200}), 8), u8({7, 200})));
  // 3-bit: codes 0..7 -> word sum(i << 3i) = 0xFAC688 -> bytes 88 C6 FA (little-endian).
  EXPECT_TRUE(torch::equal(pack_codes(u8({0, 1, 2, 3, 4, 5, 6, 7}), 3), u8({0x88, 0xC6, 0xFA})));
  EXPECT_EQ(packed_bytes(9, 3), 6);
  EXPECT_EQ(packed_bytes(8, 3), 3);
  EXPECT_EQ(packed_bytes(5, 4), 3);
  EXPECT_EQ(packed_bytes(5, 2), 2);
}

TEST(HqqPacking, RoundTripEveryWidthAndOddCounts) {
  torch::manual_seed(7);
  for (int nbits : {2, 3, 4, 8}) {
    for (int64_t n : {1, 2, 3, 7, 9, 10, 13, 31, 1001, 4099}) {
      const torch::Tensor codes = torch::randint(0, 1 << nbits, {n}).to(torch::kUInt8);
      const torch::Tensor packed = pack_codes(codes, nbits);
      ASSERT_EQ(packed.numel(), packed_bytes(n, nbits));
      ASSERT_EQ(packed.scalar_type(), torch::kUInt8);
      EXPECT_TRUE(torch::equal(unpack_codes(packed, nbits, 0, n), codes)) << nbits << " " << n;
      // Arbitrary sub-ranges, including ones that start and end inside a block.
      for (auto [a, b] : std::vector<std::pair<int64_t, int64_t>>{
               {0, 0}, {1, n}, {n / 3, n / 2 + 1}, {n - 1, n}}) {
        if (a > b) continue;
        EXPECT_TRUE(torch::equal(unpack_codes(packed, nbits, a, b), codes.slice(0, a, b)))
            << nbits << " " << n << " [" << a << "," << b << ")";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Min/max initialisation on hand-checkable groups

// Each group holds the 2^nbits values (k - c) * d, k = 0..maxq, in a shuffled order, with d a
// power of two and c an integer in [0, maxq]: min/max gives scale d and zero c exactly and the
// reconstruction is exact, with or without the solver (the error is already 0).
TEST(HqqMinMax, ExactOnEvenlySpacedGroups) {
  for (int nbits : {2, 3, 4, 8}) {
    for (int axis : {0, 1}) {
      for (bool optimize : {false, true}) {
        const int64_t g = int64_t{1} << nbits, maxq = g - 1, groups = 12;
        const int64_t out = nbits == 8 ? 6 : 4, in = groups * g / out;
        torch::Tensor flat = torch::empty({groups * g});
        std::vector<double> scales, zeros;
        torch::manual_seed(nbits * 10 + axis);
        for (int64_t k = 0; k < groups; ++k) {
          const double d = std::ldexp(1.0, static_cast<int>(k % 5) - 6);
          const int64_t c = (k * 7) % (maxq + 1);
          scales.push_back(d);
          zeros.push_back(static_cast<double>(c));
          const torch::Tensor vals = (torch::randperm(g).to(torch::kFloat32) - c) * d;
          // hqq grouping: axis 1 = consecutive runs, axis 0 = stride `groups`.
          if (axis == 1)
            flat.slice(0, k * g, (k + 1) * g).copy_(vals);
          else
            flat.slice(0, k, groups * g, groups).copy_(vals);
        }
        const torch::Tensor w = flat.view({out, in});
        auto q =
            quant(w, {{"nbits", nbits}, {"group_size", g}, {"axis", axis}, {"optimize", optimize}});
        auto* hw = dynamic_cast<HqqWeight*>(q.get());
        ASSERT_NE(hw, nullptr);
        ASSERT_EQ(hw->num_groups(), groups);
        auto [s, z] = hw->group_params(0, groups);
        for (int64_t k = 0; k < groups; ++k) {
          EXPECT_EQ(s[k].item<double>(), scales[k]) << nbits << " axis " << axis << " group " << k;
          EXPECT_EQ(z[k].item<double>(), zeros[k]) << nbits << " axis " << axis << " group " << k;
        }
        EXPECT_TRUE(torch::equal(q->dequantize(torch::kFloat32, torch::kCPU), w))
            << nbits << " axis " << axis << " optimize " << optimize;
      }
    }
  }
}

TEST(HqqMinMax, ConstantAndZeroGroups) {
  torch::Tensor w = torch::zeros({6, 128});
  w[1].fill_(1.5);
  w[2].fill_(-1000.0);
  w[3].fill_(0.1);
  w[4].fill_(3e-7);
  w[5].slice(0, 0, 64).fill_(2.0);  // one constant group, one zero group
  for (int nbits : {2, 3, 4, 8}) {
    auto q = quant(w, {{"nbits", nbits}});
    const torch::Tensor r = q->dequantize(torch::kFloat32, torch::kCPU);
    EXPECT_TRUE(torch::equal(r[0], w[0])) << nbits;
    EXPECT_TRUE(torch::equal(r[1], w[1])) << nbits;
    EXPECT_TRUE(torch::equal(r[2], w[2])) << nbits;
    EXPECT_TRUE(torch::equal(r[5], w[5])) << nbits;
    EXPECT_TRUE(torch::allclose(r[3], w[3], 1e-3, 0)) << nbits << " " << r[3][0].item<double>();
    EXPECT_TRUE(torch::allclose(r[4], w[4], 0, 1e-7)) << nbits << " " << r[4][0].item<double>();
    EXPECT_FALSE(torch::isnan(r).any().item<bool>());
  }
}

// ---------------------------------------------------------------------------------------------
// The proximal solver

TEST(HqqSolver, NeverWorseThanMinMaxAndBetterOnGaussian) {
  const torch::Tensor x = gaussian(2048, 64, 11);  // 2048 groups of 64
  for (int nbits : {2, 3, 4, 8}) {
    HqqParams p = parse_params({{"nbits", nbits}, {"optimize", false}});
    const GroupQuant plain = quantize_groups(x, p);
    p.optimize = true;
    const GroupQuant opt = quantize_groups(x, p);
    // Same scales (the solver moves zero-points only).
    ASSERT_TRUE(torch::equal(plain.scale.decoded, opt.scale.decoded));
    const torch::Tensor inv = opt.scale.decoded.reciprocal();
    const torch::Tensor e_plain =
        group_sq_error(x, plain.scale.decoded, inv, plain.zero.decoded, p.max_code());
    const torch::Tensor e_opt =
        group_sq_error(x, opt.scale.decoded, inv, opt.zero.decoded, p.max_code());
    EXPECT_TRUE((e_opt <= e_plain).all().item<bool>()) << nbits;
    const double tp = e_plain.sum().item<double>(), to = e_opt.sum().item<double>();
    EXPECT_LT(to, tp * (nbits == 8 ? 0.9999 : 0.99)) << nbits << ": " << to << " vs " << tp;
    // The codes are what the stored scale/zero give.
    const torch::Tensor recon = (opt.codes.to(torch::kFloat32) - opt.zero.decoded.unsqueeze(1)) *
                                opt.scale.decoded.unsqueeze(1);
    EXPECT_NEAR((recon - x).square().sum().item<double>(), to, to * 1e-4);
  }
}

TEST(HqqSolver, HeavyTailsAndWholeMatrix) {
  const torch::Tensor w = student_t3(256, 512, 5);
  for (int nbits : {2, 3, 4}) {
    const double plain = rel_error(w, quant(w, {{"nbits", nbits}, {"optimize", false}})
                                          ->dequantize(torch::kFloat32, torch::kCPU));
    const double opt =
        rel_error(w, quant(w, {{"nbits", nbits}})->dequantize(torch::kFloat32, torch::kCPU));
    EXPECT_LE(opt, plain) << nbits;
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata storage, state, bits per parameter

TEST(HqqState, BitsPerParameterFromNbytes) {
  const torch::Tensor w = gaussian(256, 512, 3);
  const double n = w.numel();
  auto bpp = [&](const Json& o) { return quant(w, o)->nbytes() * 8.0 / n; };
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 4}}), 4.5);
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 3}}), 3.5);
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 2}}), 2.5);
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 8}}), 8.5);
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 4}, {"group_size", 128}}), 4.25);
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 4}, {"meta_dtype", "fp32"}}), 5.0);
  // 8-bit scale and zero: 2 x 8 bits per 64 weights + 2 x 2 fp32 per 128 groups.
  EXPECT_DOUBLE_EQ(bpp({{"nbits", 4}, {"quant_scale", true}, {"quant_zero", true}}),
                   4.25 + 2 * 2 * 32.0 / (128 * 64));
}

TEST(HqqState, QuantizedScaleAndZeroRoundTrip) {
  const torch::Tensor w = gaussian(128, 512, 21);
  const double ref = rel_error(w, quant(w, {})->dequantize(torch::kFloat32, torch::kCPU));
  for (auto [qs, qz] :
       std::vector<std::pair<bool, bool>>{{true, false}, {false, true}, {true, true}}) {
    const Json o{{"quant_scale", qs}, {"quant_zero", qz}};
    auto q = quant(w, o);
    const qtune::TensorState st = q->state();
    EXPECT_EQ(st.tensors.count("scale_q"), qs ? 1u : 0u);
    EXPECT_EQ(st.tensors.count("scale"), qs ? 0u : 1u);
    EXPECT_EQ(st.tensors.count("zero_q"), qz ? 1u : 0u);
    EXPECT_EQ(st.tensors.count("zero"), qz ? 0u : 1u);
    const torch::Tensor r = q->dequantize(torch::kFloat32, torch::kCPU);
    const double err = rel_error(w, r);
    EXPECT_LT(err, ref * 1.10) << o.dump() << " " << err << " vs " << ref;
    auto back = HqqBackend().load(st);
    EXPECT_TRUE(torch::equal(back->dequantize(torch::kFloat32, torch::kCPU), r)) << o.dump();
    // The decoded scales are positive and match the quantizer's own decoding.
    auto [s, z] = dynamic_cast<HqqWeight*>(back.get())->group_params(0, 128 * 512 / 64);
    EXPECT_TRUE((s > 0).all().item<bool>());
  }
}

TEST(HqqState, LoadIsBitExactForEveryLayout) {
  struct Case {
    std::vector<int64_t> shape;
    Json opts;
  };
  const std::vector<Case> cases = {
      {{64, 128}, {{"nbits", 4}}},
      {{64, 128}, {{"nbits", 3}, {"axis", 0}}},
      {{37, 53}, {{"nbits", 3}}},  // groups cross rows, the last group is padded
      {{37, 53}, {{"nbits", 2}, {"axis", 0}}},
      {{2, 3}, {{"nbits", 8}}},  // one padded group bigger than the matrix
      {{2, 3}, {{"nbits", 4}, {"axis", 0}}},
      {{24, 288}, {{"nbits", 4}, {"group_size", 0}}},               // per row
      {{24, 288}, {{"nbits", 4}, {"group_size", 0}, {"axis", 0}}},  // per column
      {{40, 96},
       {{"nbits", 2}, {"quant_scale", true}, {"quant_zero", true}, {"meta_dtype", "fp32"}}},
  };
  for (const auto& c : cases) {
    torch::manual_seed(c.shape[0]);
    const torch::Tensor w = torch::randn(c.shape) * 0.02;
    auto q = quant(w, c.opts);
    const qtune::TensorState st = q->state();
    EXPECT_EQ(st.meta["backend"], "hqq");
    EXPECT_EQ(st.meta["shape"], Json(c.shape));
    const torch::Tensor r = q->dequantize(torch::kFloat32, torch::kCPU);
    // Deep copy through the state: a new weight with identical tensors and output.
    qtune::TensorState copy;
    copy.meta = Json::parse(st.meta.dump());
    for (const auto& [k, t] : st.tensors) copy.tensors[k] = t.clone();
    auto back = HqqBackend().load(copy);
    for (const auto& [k, t] : back->state().tensors)
      EXPECT_TRUE(bit_equal(t, st.tensors.at(k))) << k;
    EXPECT_EQ(back->state().meta, st.meta);
    EXPECT_TRUE(torch::equal(back->dequantize(torch::kFloat32, torch::kCPU), r)) << c.opts.dump();
    EXPECT_LT(rel_error(w, r), HqqBackend().error_bound(c.opts) * 1.5) << c.opts.dump();
    // Rows through the tiled path equal the full matrix, for ranges that cut groups.
    for (auto [a, b] : std::vector<std::pair<int64_t, int64_t>>{{0, c.shape[0]},
                                                                {1, 2},
                                                                {c.shape[0] / 3, c.shape[0] - 1},
                                                                {c.shape[0] - 1, c.shape[0]}}) {
      EXPECT_TRUE(
          torch::equal(q->dequantize_rows(a, b, torch::kFloat32, torch::kCPU), r.slice(0, a, b)))
          << c.opts.dump() << " rows " << a << ".." << b;
    }
    EXPECT_TRUE(torch::equal(q->dequantize(torch::kBFloat16, torch::kCPU), r.to(torch::kBFloat16)));
  }
}

TEST(HqqState, LoadErrorsNameTheProblem) {
  auto q = quant(gaussian(16, 64, 1), {});
  const qtune::TensorState good = q->state();
  auto load_err = [&](const std::function<void(qtune::TensorState&)>& edit) {
    qtune::TensorState st = good;
    edit(st);
    return error_of([&] { HqqBackend().load(st); });
  };
  EXPECT_EQ(load_err([](auto&) {}), "");
  EXPECT_NE(load_err([](auto& s) { s.tensors.erase("zero"); }).find("tensor \"zero\" is missing"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.tensors["scale"] = s.tensors["scale"].to(torch::kFloat32);
            }).find("tensor \"scale\" must be Half, got Float"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.tensors["W_q"] = s.tensors["W_q"].slice(0, 1);
            }).find("tensor \"W_q\" must have shape [512]"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.tensors["extra"] = torch::zeros({1});
            }).find("unexpected tensor \"extra\""),
            std::string::npos);
  EXPECT_NE(
      load_err([](auto& s) { s.meta["backend"] = "nf4"; }).find("meta.backend must be \"hqq\""),
      std::string::npos);
  EXPECT_NE(
      load_err([](auto& s) { s.meta["format_version"] = 7; }).find("format_version must be 1"),
      std::string::npos);
  EXPECT_NE(load_err([](auto& s) { s.meta["shape"] = {16}; }).find("meta.shape must be [out, in]"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.meta["options"]["nbits"] = 6;
            }).find("hqq state meta.options.nbits must be one of 2, 3, 4, 8"),
            std::string::npos);
  // Options that change the layout are caught by the tensor checks.
  EXPECT_NE(load_err([](auto& s) { s.meta["options"]["quant_zero"] = true; })
                .find("unexpected tensor \"zero\" (expected W_q, scale, zero_q, zero_q.scale, "
                      "zero_q.zero)"),
            std::string::npos);
  EXPECT_NE(load_err([](auto& s) {
              s.meta["shape"] = {32, 64};
            }).find("meta.num_groups"),
            std::string::npos);
}

TEST(HqqState, CpuKernelMatchesTensorOpsBitForBit) {
  for (int nbits : {2, 3, 4, 8}) {
    for (auto shape : std::vector<std::vector<int64_t>>{{37, 53}, {16, 96}, {5, 1000}}) {
      for (const Json& extra : {Json::object(), Json{{"quant_scale", true}, {"quant_zero", true}},
                                Json{{"group_size", 24}}, Json{{"group_size", 256}}}) {
        torch::manual_seed(nbits);
        const torch::Tensor w = torch::randn(shape);
        Json o = extra;
        o["nbits"] = nbits;
        auto q = quant(w, o);
        auto* hw = dynamic_cast<HqqWeight*>(q.get());
        const int64_t out = shape[0];
        for (auto [a, b] :
             std::vector<std::pair<int64_t, int64_t>>{{0, out}, {1, 2}, {out / 3, out - 1}}) {
          for (auto dt : {torch::kFloat32, torch::kBFloat16, torch::kFloat64}) {
            hw->set_force_tensor_ops(true);
            const torch::Tensor ops = q->dequantize_rows(a, b, dt, torch::kCPU);
            hw->set_force_tensor_ops(false);
            for (bool simd : {true, false}) {  // AVX-512 (where present) and the portable loop
              hw->set_cpu_kernel_simd(simd);
              EXPECT_TRUE(bit_equal(q->dequantize_rows(a, b, dt, torch::kCPU), ops))
                  << o.dump() << " " << shape[1] << " rows " << a << ".." << b << " simd "
                  << simd;
            }
            hw->set_cpu_kernel_simd(true);
          }
        }
        hw->set_force_tensor_ops(false);
        const torch::Tensor full_kernel = q->dequantize(torch::kBFloat16, torch::kCPU);
        hw->set_force_tensor_ops(true);
        EXPECT_TRUE(bit_equal(full_kernel, q->dequantize(torch::kBFloat16, torch::kCPU)))
            << o.dump();
      }
    }
  }
}

TEST(HqqState, ThreadCountDoesNotChangeTheResult) {
  // Chunks of groups are quantized in parallel; every group is solved on its own, so the state
  // is identical for any thread count (data-parallel ranks rely on it).
  const torch::Tensor w = gaussian(512, 1024, 8);  // several chunks
  for (const Json& o : {Json::object(), Json{{"axis", 0}, {"nbits", 3}, {"quant_zero", true}}}) {
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const qtune::TensorState one = quant(w, o)->state();
    at::set_num_threads(2);
    const qtune::TensorState two = quant(w, o)->state();
    at::set_num_threads(threads);
    for (const auto& [k, t] : one.tensors) EXPECT_TRUE(bit_equal(t, two.tensors.at(k))) << k;
  }
}

TEST(HqqState, LinearUsesTilesAndMatchesDequantized) {
  const torch::Tensor w = gaussian(300, 96, 4);
  auto q = quant(w, {{"nbits", 3}, {"axis", 0}});
  const torch::Tensor d = q->dequantize(torch::kFloat32, torch::kCPU);
  const torch::Tensor x = torch::randn({5, 96});
  EXPECT_TRUE(torch::allclose(q->linear(x), torch::matmul(x, d.t()), 1e-5, 1e-5));
  const torch::Tensor g = torch::randn({5, 300});
  EXPECT_TRUE(torch::allclose(q->linear_grad_input(g), torch::matmul(g, d), 1e-5, 1e-5));
  q->to(torch::kCPU);
  EXPECT_EQ(q->device(), torch::Device(torch::kCPU));
  EXPECT_TRUE(torch::equal(q->dequantize(torch::kFloat32, torch::kCPU), d));
}

// ---------------------------------------------------------------------------------------------
// Error bounds

TEST(HqqErrorBound, HoldsOnGaussianMatrices) {
  const torch::Tensor w = gaussian(512, 512, 99);
  for (int nbits : {2, 3, 4, 8}) {
    for (const Json& extra : {Json::object(), Json{{"optimize", false}},
                              Json{{"quant_scale", true}, {"quant_zero", true}},
                              Json{{"group_size", 128}}, Json{{"group_size", 32}, {"axis", 0}}}) {
      Json o = extra;
      o["nbits"] = nbits;
      const double bound = HqqBackend().error_bound(o);
      const double err = rel_error(w, quant(w, o)->dequantize(torch::kFloat32, torch::kCPU));
      EXPECT_LT(err, bound) << o.dump();
      if (extra.empty())
        EXPECT_GT(err, bound / 2) << "bound too loose for " << o.dump() << ": " << err << " vs "
                                  << bound;
    }
  }
}
