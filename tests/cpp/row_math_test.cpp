// The fused epilogues' rearranged formulas (row_math.h) against the ones they rearrange, on the
// host: ScaledSoftmaxExp against softmax_exp(transform_logit(raw) - shift), AffineLogitGrad against
// raw_logit_grad, for random rows and options (scale, z-loss, smoothing, ignored rows, grad_lse).
#include "core/row_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

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

}  // namespace
}  // namespace flce::detail
