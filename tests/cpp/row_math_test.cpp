// The fused epilogues' rearranged formulas (row_math.h) against the ones they rearrange, on the
// host: ScaledSoftmaxExp against softmax_exp(transform_logit(raw) - shift), AffineLogitGrad against
// raw_logit_grad, for random rows and options (scale, z-loss, smoothing, ignored rows, grad_lse);
// and the row-shifted terms' per-row choice (shifted_row): kept rows rebuild dZ from their terms
// and factor, the others are rewritten for the reasons the GPU kernels rely on.
#include "core/row_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace flce::detail {
namespace {

TEST(RowMath, ScaledSoftmaxExpMatchesTheShiftedExp) {
  std::mt19937 rng(7);
  std::normal_distribution<float> raw_dist(0.0f, 6.0f);
  std::uniform_real_distribution<float> scale_dist(-2.0f, 2.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    const float scale = scale_dist(rng);
    const float raw = raw_dist(rng);
    const float shift = raw * scale + std::fabs(raw_dist(rng));  // arguments <= 0, as for p
    const float want = softmax_exp(transform_logit(raw, scale, 0.0f) - shift);
    const float got = ScaledSoftmaxExp::of(scale, shift)(raw);
    ASSERT_NEAR(got, want, 1e-5f * want + 1e-30f) << "raw " << raw << " scale " << scale;
    ASSERT_LE(got, 1.0f + 1e-6f);
  }
  // exp(z - max) at z = max is 1; a column masked to -inf contributes 0.
  EXPECT_FLOAT_EQ(ScaledSoftmaxExp::of(1.0f, 3.5f)(3.5f), 1.0f);
  EXPECT_EQ(ScaledSoftmaxExp::of(1.0f, 3.5f)(-INFINITY), 0.0f);
  // The zero-coefficient rows of the dZ epilogue take the default: 2^0.
  EXPECT_EQ(ScaledSoftmaxExp{}(123.0f), 1.0f);
}

TEST(RowMath, AffineLogitGradMatchesRawLogitGrad) {
  std::mt19937 rng(11);
  std::normal_distribution<float> z_dist(0.0f, 4.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    LossOptions o;
    o.logit_scale = 0.25f + 2.0f * unit(rng);
    o.label_smoothing = trial % 3 == 0 ? 0.0f : 0.2f * unit(rng);
    o.z_loss = trial % 4 == 0 ? 1e-3f : 0.0f;
    const float lse = 10.0f + z_dist(rng);
    const bool valid = trial % 5 != 0;
    const float g = 1.0f / 1000.0f, g_lse = trial % 7 == 0 ? 0.3f : 0.0f;
    const int64_t vocab = 1000 + trial;
    const GradCoefs k = grad_coefs(valid, g, g_lse, lse, 1.0f, static_cast<float>(vocab), vocab, o);
    const AffineLogitGrad affine = AffineLogitGrad::of(k, o.logit_scale);
    const float raw = (lse - std::fabs(z_dist(rng))) / o.logit_scale;
    const float z = transform_logit(raw, o.logit_scale, 0.0f);
    const float p = softmax_exp(z - lse);
    for (const bool target : {false, true}) {
      const double want = raw_logit_grad(k, z, lse, target, 1.0f, o);
      const double got = affine(p) - (target ? affine.target_step : 0.0f);
      const double size =
          std::fabs(k.coef_p * p) + std::fabs(k.coef_weight) + std::fabs(k.coef_target);
      ASSERT_NEAR(got, want, 1e-6 * size * o.logit_scale + 1e-30) << "trial " << trial;
    }
  }
  // All-zero coefficients (an ignored row without grad_lse) give exactly 0 for any p.
  const AffineLogitGrad zero = AffineLogitGrad::of(GradCoefs{}, 1.5f);
  EXPECT_EQ(zero(1.0f), 0.0f);
  EXPECT_EQ(zero.target_step, 0.0f);
}

// A kept row's factor and label term rebuild every dZ_c from its term exp(z_c - shift): factor *
// exp(z_c - shift) off the label, factor * label_term at it (random rows, both signs of the logit
// scale, with and without z-loss).
TEST(RowMath, ShiftedRowRebuildsDzFromItsTerms) {
  std::mt19937 rng(23);
  std::normal_distribution<float> z_dist(0.0f, 2.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  int kept = 0;
  for (int trial = 0; trial < 300; ++trial) {
    LossOptions o;
    o.logit_scale = trial % 2 == 0 ? 1.0f : -0.7f;
    o.z_loss = trial % 3 == 0 ? 1e-3f : 0.0f;
    const int64_t vocab = 50 + trial;
    std::vector<float> z(vocab);
    for (float& v : z) v = z_dist(rng);
    const int64_t label = static_cast<int64_t>(unit(rng) * vocab) % vocab;
    float row_max = -INFINITY;
    double sum = 0.0;
    for (float v : z) row_max = std::max(row_max, v);
    for (float v : z) sum += std::exp(static_cast<double>(v) - row_max);
    const float lse = row_max + static_cast<float>(std::log(sum));
    const float shift = z[label] + kShiftAboveLabel;
    const GradCoefs k =
        grad_coefs(true, 1.0f, 0.0f, lse, 1.0f, static_cast<float>(vocab), vocab, o);
    const AffineLogitGrad grad = AffineLogitGrad::of(k, o.logit_scale);
    const ShiftedRow r = shifted_row(shift, row_max, lse, z[label], grad, false, 3.0f);
    if (r.rewrite) continue;
    ++kept;
    EXPECT_EQ(std::signbit(r.factor), o.logit_scale < 0.0f) << "trial " << trial;
    for (int64_t c = 0; c < vocab; ++c) {
      const double term = c == label ? r.label_term : std::exp(static_cast<double>(z[c]) - shift);
      const double got = r.factor * term;
      // dZ with respect to the raw logit, from the formulas the row kernels use.
      const double want = raw_logit_grad(k, z[c], lse, c == label, 1.0f, o);
      ASSERT_NEAR(got, want, 2e-5 * (std::fabs(grad.slope) + std::fabs(grad.target_step)))
          << "trial " << trial << " column " << c;
    }
  }
  EXPECT_GT(kept, 250) << "moderate rows keep their terms";
}

TEST(RowMath, ShiftedRowRewritesWhatFp16CannotHold) {
  LossOptions o;
  const int64_t vocab = 1000;
  const float lse = 12.0f;
  const GradCoefs k = grad_coefs(true, 1.0f, 0.0f, lse, 1.0f, 1000.0f, vocab, o);
  const AffineLogitGrad grad = AffineLogitGrad::of(k, o.logit_scale);
  // A likely label: kept, factor exp(shift - lse) = p_label e^4.
  const float z_label = 11.5f, shift = z_label + kShiftAboveLabel;
  ShiftedRow r = shifted_row(shift, z_label, lse, z_label, grad, false, 3.0f);
  EXPECT_FALSE(r.rewrite);
  EXPECT_NEAR(r.factor, std::exp(shift - lse), 1e-5f);
  // The row's max more than kShiftedTermMaxExponent above the shift: a tile kept its own max.
  r = shifted_row(shift, shift + kShiftedTermMaxExponent + 0.5f, lse, z_label, grad, false, 3.0f);
  EXPECT_TRUE(r.rewrite);
  EXPECT_EQ(r.factor, 1.0f);
  // An improbable label: factor below 2^-16, and 1 / factor beyond fp16.
  r = shifted_row(0.0f, 1.0f, 30.0f, -4.0f, grad, false, 3.0f);
  EXPECT_TRUE(r.rewrite);
  // fp16(factor * x) would overflow: rewritten with a power of two that keeps x below 2^14.
  r = shifted_row(shift, z_label, lse, z_label, grad, false, 1e5f);
  EXPECT_TRUE(r.rewrite);
  EXPECT_EQ(r.factor, 0.125f);  // 1e5 < 2^17
  EXPECT_LT(r.factor * 1e5f, 16384.0f);
  // Zero coefficients: factor 0, nothing rewritten.
  r = shifted_row(shift, z_label, lse, z_label, grad, true, 3.0f);
  EXPECT_FALSE(r.rewrite);
  EXPECT_EQ(r.factor, 0.0f);
  // NaN coefficients (a label out of range) fail every test and are rewritten: dZ stays NaN.
  AffineLogitGrad nan_grad = grad;
  nan_grad.slope = NAN;
  EXPECT_TRUE(shifted_row(shift, z_label, lse, z_label, nan_grad, false, 3.0f).rewrite);
  // The tile test the epilogue and the row kernel share.
  EXPECT_TRUE(tile_takes_row_shift(5.0f + kShiftedTermMaxExponent, 5.0f));
  EXPECT_FALSE(tile_takes_row_shift(5.01f + kShiftedTermMaxExponent, 5.0f));
  EXPECT_FALSE(tile_takes_row_shift(1.0f, -INFINITY));  // ignored rows: every tile its own max
  EXPECT_FALSE(tile_takes_row_shift(NAN, 0.0f));
}

}  // namespace
}  // namespace flce::detail
