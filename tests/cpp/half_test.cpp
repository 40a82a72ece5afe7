// The fp16 / bf16 conversions of the CPU backend: exhaustive round trips and round-to-nearest-even
// against an independent rule (the compiler's _Float16 where it has one, else nearest-candidate).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "cpu/cpu_half.h"
#include "cpu/cpu_rows.h"

namespace flce::detail::cpu {
namespace {

TEST(Half, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    const bool nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    if (nan) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ASSERT_TRUE(std::isnan(half_to_float(float_to_half(f)))) << h;
    } else {
      ASSERT_EQ(float_to_half(f), h) << "half bits " << h << " -> " << f;
    }
  }
}

TEST(Half, KnownValues) {
  EXPECT_EQ(half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(half_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(float_to_half(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(float_to_half(-1e30f), 0xfc00);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);         // tie to even: 0
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -26)), 0x0001);         // above the tie
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002);         // tie 1.5 -> 2
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3c02);  // tie to even (up)
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14) * (1.0f - std::ldexp(1.0f, -12))), 0x0400);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(half_to_float(float_to_half(INFINITY)), INFINITY);
}

#if defined(__FLT16_MAX__)
TEST(Half, MatchesCompilerFloat16) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = bits(rng);
    // Concentrate on the half range (exponents 100..145) and keep some of everything else.
    if (i % 4 != 0) u = (u & 0x807fffffu) | ((100u + (u >> 23) % 46u) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    ASSERT_EQ(float_to_half(f), hb) << "float bits " << u;
  }
}
#endif

// Round-to-nearest-even by construction: the two bf16 neighbours of f and the closer one.
uint16_t bf16_nearest_even(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double dlo = std::abs(static_cast<double>(bf16_to_float(lo)) - f);
  const double dhi = std::abs(static_cast<double>(bf16_to_float(hi)) - f);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(BFloat16, MatchesNearestEven) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isfinite(f) || std::abs(f) > 3.38e38f) continue;  // neighbours beyond max
    ASSERT_EQ(float_to_bf16(f), bf16_nearest_even(f)) << "float bits " << u;
  }
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie to even
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(3.0f, -8)), 0x3f82);
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  uint32_t nan_low = 0x7f800001u;  // a NaN whose payload lies only in the low bits
  float f;
  std::memcpy(&f, &nan_low, 4);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
}

// cast (CastArgs) between every pair of fp32 / bf16 / fp16, with row factors and a factor, on
// strided rows: every element of each row becomes src * (row_factor * factor), the factors
// multiplied first as the CUDA kernel does, rounded once; the padding between rows is never
// written.
TEST(Half, CastConvertsAndScalesStridedRows) {
  const DType types[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  const int64_t rows = 5, cols = 7, ld_src = 9, ld_dst = 11;
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (DType from : types) {
    for (DType to : types) {
      std::vector<unsigned char> src(rows * ld_src * 4), dst(rows * ld_dst * 4);
      for (int64_t i = 0; i < rows * ld_src; ++i) store_from_float(src.data(), from, i, dist(rng));
      for (int64_t i = 0; i < rows * ld_dst; ++i) store_from_float(dst.data(), to, i, NAN);
      std::vector<float> row_factor(rows);
      for (float& f : row_factor) f = dist(rng);
      const float factor = 0.375f;
      CastArgs a;
      a.src = src.data();
      a.ld_src = ld_src;
      a.src_type = from;
      a.dst = dst.data();
      a.ld_dst = ld_dst;
      a.dst_type = to;
      a.rows = rows;
      a.cols = cols;
      a.row_factor = row_factor.data();
      a.factor = &factor;
      ASSERT_TRUE(cast(a).ok());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < ld_dst; ++c) {
          const float got = load_as_float(dst.data(), to, r * ld_dst + c);
          if (c >= cols) {
            EXPECT_TRUE(std::isnan(got)) << "padding written at row " << r << " column " << c;
            continue;
          }
          std::vector<unsigned char> one(4);
          store_from_float(
              one.data(), to, 0,
              load_as_float(src.data(), from, r * ld_src + c) * (row_factor[r] * factor));
          EXPECT_EQ(got, load_as_float(one.data(), to, 0)) << "row " << r << " column " << c;
        }
      }
    }
  }
  CastArgs bad;
  bad.rows = 2;
  bad.cols = 3;
  bad.ld_src = 2;  // < cols
  EXPECT_EQ(cast(bad).code, StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace flce::detail::cpu
