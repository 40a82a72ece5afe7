// The CPU GEMM (white box): every dtype combination, transposes, leading dimensions, alpha and
// beta, and shapes that cross the fp32 conversion panels, against a float64 product.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "harness.h"

namespace flce::test {
namespace {

struct GemmCase {
  int64_t m, n, k;
  DType a, b, c;
  bool ta, tb;
  float alpha, beta;
};

void run_gemm_case(const GemmCase& g, uint64_t seed) {
  SCOPED_TRACE("m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" +
               std::to_string(g.k) + " types " + dtype_name(g.a) + "," + dtype_name(g.b) + "," +
               dtype_name(g.c) + " ta=" + std::to_string(g.ta) + " tb=" + std::to_string(g.tb) +
               " alpha=" + std::to_string(g.alpha) + " beta=" + std::to_string(g.beta));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  // Stored shapes with padded leading dimensions.
  const int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k, lda = a_cols + 3;
  const int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n, ldb = b_cols + 5;
  const int64_t ldc = g.n + 2;
  TypedBuffer a(g.a, a_rows * lda), b(g.b, b_rows * ldb), c(g.c, g.m * ldc);
  a.poison();
  b.poison();
  for (int64_t r = 0; r < a_rows; ++r) {
    for (int64_t j = 0; j < a_cols; ++j) a.set(r * lda + j, normal(rng));
  }
  for (int64_t r = 0; r < b_rows; ++r) {
    for (int64_t j = 0; j < b_cols; ++j) b.set(r * ldb + j, normal(rng));
  }
  if (g.beta == 0.0f) {
    c.poison();  // beta = 0 must ignore C entirely, NaN included
  } else {
    for (int64_t i = 0; i < g.m * ldc; ++i) c.set(i, normal(rng));
  }
  const TypedBuffer c_old = c;

  std::vector<float> scratch(detail::cpu::kGemmScratchBytes / sizeof(float));
  detail::GemmArgs args;
  args.m = g.m;
  args.n = g.n;
  args.k = g.k;
  args.a = a.data();
  args.lda = lda;
  args.a_type = g.a;
  args.trans_a = g.ta;
  args.b = b.data();
  args.ldb = ldb;
  args.b_type = g.b;
  args.trans_b = g.tb;
  args.c = c.data();
  args.ldc = ldc;
  args.c_type = g.c;
  args.alpha = g.alpha;
  args.beta = g.beta;
  const Status s = detail::cpu::gemm(args, scratch.data());
  ASSERT_TRUE(s.ok()) << s.message;

  std::vector<double> got, want;
  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < g.n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < g.k; ++p) {
        const double av = g.ta ? a.get(p * lda + i) : a.get(i * lda + p);
        const double bv = g.tb ? b.get(j * ldb + p) : b.get(p * ldb + j);
        acc += av * bv;
      }
      double ref = g.alpha * acc;
      if (g.beta != 0.0f) ref += g.beta * c_old.get(i * ldc + j);
      want.push_back(ref);
      got.push_back(c.get(i * ldc + j));
    }
    // Columns past n in C's padding are untouched.
    for (int64_t j = g.n; j < ldc; ++j) {
      const double before = c_old.get(i * ldc + j), after = c.get(i * ldc + j);
      ASSERT_TRUE((std::isnan(before) && std::isnan(after)) || before == after);
    }
  }
  const double tol = g.c == DType::kFloat32 ? 2e-6 * std::sqrt(static_cast<double>(g.k) + 1)
                                            : tolerance_for(g.c).grad;
  expect_close("C", got, want, tol);
}

TEST(CpuGemm, AllTypesAndTransposes) {
  uint64_t seed = 40;
  const DType f32 = DType::kFloat32, f16 = DType::kFloat16, b16 = DType::kBFloat16;
  const DType combos[][3] = {{f32, f32, f32}, {b16, b16, f32}, {f16, f16, f16},
                             {f32, b16, b16}, {b16, f32, f32}, {f32, f32, f16}};
  for (const auto& t : combos) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (auto [alpha, beta] :
             {std::pair{1.0f, 0.0f}, std::pair{-0.5f, 1.0f}, std::pair{1.5f, -0.25f}}) {
          run_gemm_case({37, 29, 23, t[0], t[1], t[2], ta, tb, alpha, beta}, ++seed);
        }
      }
    }
  }
}

// Shapes beyond one conversion panel in m, n and k, so k blocks accumulate and edges are partial.
TEST(CpuGemm, CrossesPanels) {
  const int64_t m = detail::cpu::kGemmBlockM + 19, n = detail::cpu::kGemmBlockN + 7,
                k = detail::cpu::kGemmBlockK + 33;
  run_gemm_case(
      {m, n, k, DType::kBFloat16, DType::kBFloat16, DType::kFloat32, false, true, 1.0f, 0.0f}, 61);
  run_gemm_case(
      {m, n, k, DType::kFloat32, DType::kFloat16, DType::kFloat16, true, false, 1.0f, 1.0f}, 62);
  run_gemm_case(
      {m, 9, k, DType::kBFloat16, DType::kFloat32, DType::kBFloat16, true, true, 0.5f, 0.0f}, 63);
}

// GemmArgs::device_alpha / device_beta: on the CPU the backend's memory is the host's, and the
// scalars there replace alpha and beta; half a pair is refused.
TEST(CpuGemm, DeviceScalars) {
  std::mt19937_64 rng(80);
  std::normal_distribution<double> normal;
  const int64_t m = 9, n = 7, k = 5;
  TypedBuffer a(DType::kBFloat16, m * k), b(DType::kBFloat16, k * n), c(DType::kFloat32, m * n);
  for (int64_t i = 0; i < m * k; ++i) a.set(i, normal(rng));
  for (int64_t i = 0; i < k * n; ++i) b.set(i, normal(rng));
  for (int64_t i = 0; i < m * n; ++i) c.set(i, normal(rng));
  const TypedBuffer c_old = c;
  const float scalars[2] = {-0.75f, 0.5f};
  std::vector<float> scratch(detail::cpu::kGemmScratchBytes / sizeof(float));
  detail::GemmArgs args;
  args.m = m;
  args.n = n;
  args.k = k;
  args.a = a.data();
  args.lda = k;
  args.a_type = DType::kBFloat16;
  args.b = b.data();
  args.ldb = n;
  args.b_type = DType::kBFloat16;
  args.c = c.data();
  args.ldc = n;
  args.c_type = DType::kFloat32;
  args.alpha = 3.0f;  // replaced by the scalars
  args.beta = 0.0f;
  args.device_alpha = &scalars[0];
  args.device_beta = &scalars[1];
  const Status s = detail::cpu::gemm(args, scratch.data());
  ASSERT_TRUE(s.ok()) << s.message;
  std::vector<double> got, want;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p) acc += a.get(i * k + p) * b.get(p * n + j);
      want.push_back(-0.75 * acc + 0.5 * c_old.get(i * n + j));
      got.push_back(c.get(i * n + j));
    }
  }
  expect_close("C", got, want, 2e-6 * std::sqrt(static_cast<double>(k) + 1));

  args.device_beta = nullptr;
  const Status refused = detail::cpu::gemm(args, scratch.data());
  EXPECT_EQ(refused.code, StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message.find("device_alpha and device_beta"), std::string::npos);
}

TEST(CpuGemm, EmptyInnerDimension) {
  for (DType t : {DType::kFloat32, DType::kBFloat16}) {
    run_gemm_case({7, 5, 0, t, t, t, false, false, 1.0f, 0.0f}, 70);
    run_gemm_case({7, 5, 0, t, t, t, false, true, 1.0f, 0.5f}, 71);
  }
}

}  // namespace
}  // namespace flce::test
