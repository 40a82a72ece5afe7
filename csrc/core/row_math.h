// The per-element and per-row math of the loss: one implementation, shared by the CPU backend and
// the CUDA kernels (every function is host+device). A backend only decides how rows are walked.
//
// Notation (see include/flce/flce.h): r = raw logit (x.w + b), z = transformed logit,
// w_c = class weight (1 without weights), eps = label smoothing, V = vocabulary size.
#pragma once

#include <cmath>
#include <cstdint>

#include "flce/flce.h"

#if defined(__CUDACC__)
#define FLCE_HD __host__ __device__ __forceinline__
#else
#define FLCE_HD inline
#endif

namespace flce::detail {

// Device-resident scalars computed once per call by a backend's prepare step (so the CUDA path
// never reads them on the host).
enum Scalar : int32_t {
  kScalarDenominator = 0,     // sum over valid rows of w[y_i] (the mean's divisor)
  kScalarInvDenominator = 1,  // 1 / denominator, or 0 when no row is valid
  kScalarWeightSum = 2,       // sum_c w_c (V without class weights)
  kScalarValidRows = 3,       // number of rows whose label is not ignore_index
  kScalarLabelError = 4,      // 1 when a label was out of range (CUDA; the CPU returns an error)
  kScalarZero = 5,            // 0: the beta of GEMMs whose alpha is one of these (device_alpha)
  kNumScalars = 8,
};

// Per-row metrics kept in the workspace ([N, kNumRowMetrics]) and reduced at the end; ignored rows
// hold the neutral values (-inf for the max, 0 otherwise).
enum RowMetric : int32_t {
  kRowMaxLogit = 0,
  kRowLogitNorm = 1,
  kRowEntropy = 2,
  kRowLseSquared = 3,
  kRowCorrect = 4,
  kNumRowMetrics = 5,
};

// exp for probabilities and sums of exponentials (arguments <= 0). On the GPU the hardware exp2
// (__expf: a multiply and one special-function instruction; relative error about 1e-6 for
// arguments down to -20, the terms that carry a softmax sum) instead of the ~8-instruction expf:
// the row kernels evaluate it once or twice per logit and must stay memory-bound.
FLCE_HD float softmax_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

// 2^x for softmax terms whose argument a fused multiply-add has already put in base 2 (see
// ScaledSoftmaxExp): on the GPU the special-function instruction __expf ends in, without its
// multiply.
FLCE_HD float softmax_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

constexpr float kLog2e = 1.4426950408889634f;

// z = T(r): scale, then optional tanh soft-capping (Gemma 2 style).
FLCE_HD float transform_logit(float raw, float logit_scale, float softcap) {
  const float scaled = raw * logit_scale;
  return softcap > 0.0f ? softcap * tanhf(scaled / softcap) : scaled;
}

// dz/dr expressed through z, so the backward needs no second tanh: 1 - tanh^2 = 1 - (z/cap)^2.
FLCE_HD float transform_derivative(float z, float logit_scale, float softcap) {
  if (softcap > 0.0f) {
    const float t = z / softcap;
    return logit_scale * (1.0f - t * t);
  }
  return logit_scale;
}

// Online softmax statistics of one row (or part of one): merging two partial states is exact up
// to rounding, so a row may be split across threads, warps or vocabulary chunks.
struct RowState {
  float max = -INFINITY;   // running max of z
  float sum_exp = 0.0f;    // sum exp(z - max)
  float sum_exp_z = 0.0f;  // sum exp(z - max) * z     (entropy)
  float sum_wz = 0.0f;     // sum w_c * z_c            (label smoothing)
  float sum_z2 = 0.0f;     // sum z^2                  (logit norm)
  float best = -INFINITY;  // max z, first index wins ties (accuracy)
  int64_t argmax = -1;

  FLCE_HD void add(float z, float w, int64_t c) {
    if (z > max) {
      // Rescale what was summed under the old max; exp(-inf) = 0 handles the first element.
      const float r = softmax_exp(max - z);
      sum_exp *= r;
      sum_exp_z *= r;
      max = z;
    }
    const float e = softmax_exp(z - max);
    sum_exp += e;
    sum_exp_z += e * z;
    sum_wz += w * z;
    sum_z2 += z * z;
    if (z > best) {
      best = z;
      argmax = c;
    }
  }

  FLCE_HD void merge(const RowState& o) {
    if (o.max == -INFINITY) {
      sum_wz += o.sum_wz;
      sum_z2 += o.sum_z2;
      return;
    }
    const float m = max > o.max ? max : o.max;
    const float a = max == -INFINITY ? 0.0f : softmax_exp(max - m);
    const float b = softmax_exp(o.max - m);
    sum_exp = sum_exp * a + o.sum_exp * b;
    sum_exp_z = sum_exp_z * a + o.sum_exp_z * b;
    max = m;
    sum_wz += o.sum_wz;
    sum_z2 += o.sum_z2;
    if (o.best > best || (o.best == best && o.argmax >= 0 && (argmax < 0 || o.argmax < argmax))) {
      best = o.best;
      argmax = o.argmax;
    }
  }

  FLCE_HD float lse() const { return max + logf(sum_exp); }
  // H = lse - sum p z
  FLCE_HD float entropy() const { return lse() - sum_exp_z / sum_exp; }
};

// What a row's earlier vocabulary blocks leave for its later ones when a forward splits rows.
struct RowCarry {
  RowState state;
  float target_z = NAN;  // transformed logit of the label, once its block was seen
};

// One block [col0, col0 + cols) of a row split across vocabulary blocks walked in column order:
// merges the block's statistics `st` (and its label logit, when the label falls in it) with what
// the earlier blocks carried. Returns true when this block ends the row, leaving the whole row's
// statistics in `st` and `z_target`; otherwise stores them for the next block.
FLCE_HD bool carry_row_block(RowCarry& carried, int64_t col0, int64_t cols, int64_t vocab_size,
                             bool label_here, RowState& st, float& z_target) {
  if (col0 > 0) {
    RowState before = carried.state;
    before.merge(st);
    st = before;
    if (!label_here) z_target = carried.target_z;
  }
  if (col0 + cols < vocab_size) {
    carried.state = st;
    carried.target_z = z_target;
    return false;
  }
  return true;
}

// Loss of one valid row from its statistics. z_target is the transformed logit of the label.
FLCE_HD float row_loss(float lse, float z_target, float w_target, float sum_wz, float weight_sum,
                       int64_t vocab_size, const LossOptions& o) {
  const float eps = o.label_smoothing;
  float loss = (1.0f - eps) * w_target * (lse - z_target);
  if (eps > 0.0f) loss += eps / static_cast<float>(vocab_size) * (weight_sum * lse - sum_wz);
  if (o.z_loss > 0.0f) loss += o.z_loss * lse * lse;
  return loss;
}

// dloss_i/dz_ic = coef_p * p_c - coef_target * [c == y] - coef_weight * w_c, where g is the
// upstream gradient of loss_i (already divided by the mean's denominator) and g_lse that of the
// returned lse_i. Ignored rows have g = 0 but still carry g_lse.
struct GradCoefs {
  float coef_p = 0.0f;
  float coef_target = 0.0f;
  float coef_weight = 0.0f;
};

FLCE_HD GradCoefs grad_coefs(bool valid, float g, float g_lse, float lse, float w_target,
                             float weight_sum, int64_t vocab_size, const LossOptions& o) {
  GradCoefs k;
  k.coef_p = g_lse;
  if (!valid) return k;
  const float eps = o.label_smoothing;
  const float smooth = eps / static_cast<float>(vocab_size);
  k.coef_p += g * ((1.0f - eps) * w_target + smooth * weight_sum + 2.0f * o.z_loss * lse);
  k.coef_target = g * (1.0f - eps) * w_target;
  k.coef_weight = g * smooth;
  return k;
}

// Gradient with respect to the raw logit r_c (what the dx / dW GEMMs consume).
FLCE_HD float raw_logit_grad(const GradCoefs& k, float z, float lse, bool is_target, float w_c,
                             const LossOptions& o) {
  const float p = softmax_exp(z - lse);
  float dz = k.coef_p * p - k.coef_weight * w_c;
  if (is_target) dz -= k.coef_target;
  return dz * transform_derivative(z, o.logit_scale, o.softcap);
}

// The fused GEMM epilogues' form of the formulas above when there is no soft-cap, for a raw logit
// straight from the accumulators. Every instruction there is repeated for each of a thread's 128
// accumulators, so each formula is rearranged into the fewest: z - lse and the base change of exp
// fold into one fused multiply-add, and the gradient becomes affine in p.
//
// softmax_exp(transform_logit(raw, scale, 0) - shift) = 2^(raw * scale * log2(e) - shift *
// log2(e)).
struct ScaledSoftmaxExp {
  float mul = 0.0f;  // logit_scale * log2(e)
  float sub = 0.0f;  // shift * log2(e)
  FLCE_HD static ScaledSoftmaxExp of(float logit_scale, float shift) {
    ScaledSoftmaxExp e;
    e.mul = logit_scale * kLog2e;
    e.sub = shift * kLog2e;
    return e;
  }
  FLCE_HD float operator()(float raw) const { return softmax_exp2(fmaf(raw, mul, -sub)); }
};

// raw_logit_grad without soft-cap and with w_c = 1 (no class weights): transform_derivative is
// the constant logit_scale, so dz = slope * p + offset, less target_step on the label's column.
struct AffineLogitGrad {
  float slope = 0.0f;
  float offset = 0.0f;
  float target_step = 0.0f;
  FLCE_HD static AffineLogitGrad of(const GradCoefs& k, float logit_scale) {
    AffineLogitGrad a;
    a.slope = k.coef_p * logit_scale;
    a.offset = -k.coef_weight * logit_scale;
    a.target_step = k.coef_target * logit_scale;
    return a;
  }
  FLCE_HD float operator()(float p) const { return fmaf(slope, p, offset); }
};

// Grad-in-forward with row-shifted terms (Plan::shifted_terms). The fused statistics GEMM stores
// each term as e = exp(z - s), rounded to the input dtype (bf16 or fp16), with one shift s per
// row, known before the GEMM: the label's logit (a dot product) plus kShiftAboveLabel. Then
// p = e exp(s - lse), so a row's dZ is g * factor * e' with e' = e except at the label, one factor
// per row: dx and dW consume e' as it is, the factor going to x (for dW) and to the fp32 dx rows.
// With fp16 terms a float64 simulation (bench/NOTES.md, version 10) put dx and dW within 1.7e-3
// of float64; bf16 terms and factor * x cost 2.4e-3 and 2.9e-3 (version 11), and keep dW's
// memory free for half of the fp32 accumulator instead of an fp16 copy of W.
//
// The limits below are fp16's, which bind for both dtypes (bf16 has fp32's range). The shift sits
// above the label's logit so that rows whose label is improbable (flat logits, early training:
// p_label ~ 1 / V) keep a factor within fp16's range; 4 kept every row of the simulation's flat
// data (logit std 1, uniform labels) and all but 3 of 1855 of its LM-like rows.
constexpr float kShiftAboveLabel = 4.0f;
// A tile whose max exceeds the row's shift by more than this stores its terms under its own max
// (e^11 < 65504, fp16's largest value); its row is then rewritten (ShiftedRow::rewrite).
constexpr float kShiftedTermMaxExponent = 11.0f;
// Range a row's factor must lie in for its terms to be kept: the factor multiplies x in fp16, and
// 1 / factor is the label's correction (e' at the label = exp(z_label - s) - step / factor).
constexpr float kShiftedFactorMin = 1.0f / 65536.0f;  // 2^-16: fp16(factor * x) keeps ~9 bits
constexpr float kShiftedValueMax = 32768.0f;          // 2^15: below fp16's largest value

// Whether a tile (of a row with shift s) stores its terms under the row's shift: the same test in
// the GEMM's epilogue and in the row kernel, on the same fp32 values.
FLCE_HD bool tile_takes_row_shift(float tile_max, float row_shift) {
  return tile_max - row_shift <= kShiftedTermMaxExponent;
}

// How one row's terms become dZ. dZ_c = g * factor * e'_c, where g is the upstream factor
// (1 / denominator for the mean) and:
//  - kept rows (rewrite false): e' = e, except at the label: e'_label = label_term;
//  - rewritten rows: e'_c = (slope p_c - step [c == label]) / factor, factor a power of two <= 1;
//  - rows with zero coefficients (ignored): factor 0.
// x_absmax (the row's largest |x|) keeps fp16(factor * x) finite.
struct ShiftedRow {
  bool rewrite = false;
  float factor = 0.0f;
  float label_term = 0.0f;
};

FLCE_HD ShiftedRow shifted_row(float shift, float row_max, float lse, float z_target,
                               const AffineLogitGrad& grad, bool zero, float x_absmax) {
  ShiftedRow r;
  if (zero) return r;
  // The factor takes the sign of the logit scale; NaN fails every test below.
  const float factor = grad.slope * softmax_exp(shift - lse);
  const float correction = grad.target_step / factor;
  const float size = fabsf(factor);
  const bool keep = tile_takes_row_shift(row_max, shift) && size >= kShiftedFactorMin &&
                    fabsf(correction) <= kShiftedValueMax && size * x_absmax < kShiftedValueMax;
  if (keep) {
    r.factor = factor;
    r.label_term = softmax_exp(z_target - shift) - correction;
    return r;
  }
  // Rewritten: e' = dZ / (g factor) lies in [-step, slope] (times 1 / factor); factor < 1 only
  // when x is so large that fp16(x) would overflow.
  int exponent = 0;
  frexpf(x_absmax, &exponent);  // x_absmax < 2^exponent
  r.rewrite = true;
  r.factor = ldexpf(1.0f, exponent > 14 ? 14 - exponent : 0);
  return r;
}

// Upstream gradient of loss_i: grad_loss is [1] (mean/sum) or [N] (none); null means 1.
FLCE_HD float row_upstream(Reduction reduction, const float* grad_loss, int64_t row,
                           float inv_denominator) {
  if (reduction == Reduction::kNone) return grad_loss ? grad_loss[row] : 1.0f;
  const float g = grad_loss ? grad_loss[0] : 1.0f;
  return reduction == Reduction::kMean ? g * inv_denominator : g;
}

FLCE_HD bool label_is_valid(int64_t label, int64_t ignore_index) { return label != ignore_index; }
FLCE_HD bool label_in_range(int64_t label, int64_t vocab_size) {
  return label >= 0 && label < vocab_size;
}

}  // namespace flce::detail
