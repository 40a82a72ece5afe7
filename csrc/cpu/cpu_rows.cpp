#include "cpu/cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <new>
#include <string>
#include <vector>

#include "core/row_math.h"
#include "cpu/cpu_half.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace flce::detail::cpu {
namespace {

// Row statistics are summed in blocks of this many columns and the partial states merged, so a
// row's fp32 sums carry a rounding error of O(block + V / block) ulps instead of O(V).
constexpr int64_t kStatBlock = 256;
constexpr int64_t kColumnBlock = 256;

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

int64_t label_at(const void* labels, IndexType type, int64_t i) {
  return type == IndexType::kInt32 ? static_cast<const int32_t*>(labels)[i]
                                   : static_cast<const int64_t*>(labels)[i];
}

// Scratch the row kernels allocate per call: one row of transformed logits per thread, and the
// bias in fp32. Allocation failure is reported instead of thrown out of an OpenMP region.
struct RowBuffers {
  std::vector<float> z;
  std::vector<float> bias;
};

Status allocate(RowBuffers* b, int64_t row_len, int threads, const void* bias, DType bias_type,
                int64_t bias_offset) {
  try {
    b->z.resize(static_cast<size_t>(row_len) * threads);
    if (bias) {
      b->bias.resize(static_cast<size_t>(row_len));
      const char* src = static_cast<const char*>(bias) + bias_offset * dtype_size(bias_type);
      to_float(src, bias_type, b->bias.data(), row_len);
    }
  } catch (const std::bad_alloc&) {
    return Status::Error(StatusCode::kBackendError, "CPU backend could not allocate " +
                                                        std::to_string(row_len) +
                                                        " floats per thread of row scratch");
  }
  return Status::Ok();
}

// z[c] = T(raw[c] + bias[c]) for one row of `type`.
void transformed_row(const void* row, DType type, const float* bias, int64_t len,
                     const LossOptions& o, float* z) {
  to_float(row, type, z, len);
  if (bias) {
    for (int64_t c = 0; c < len; ++c) z[c] += bias[c];
  }
  for (int64_t c = 0; c < len; ++c) z[c] = transform_logit(z[c], o.logit_scale, o.softcap);
}

RowState row_statistics(const float* z, const float* class_weight, int64_t len) {
  RowState total;
  for (int64_t c0 = 0; c0 < len; c0 += kStatBlock) {
    const int64_t c1 = std::min(len, c0 + kStatBlock);
    RowState part;
    if (class_weight) {
      for (int64_t c = c0; c < c1; ++c) part.add(z[c], class_weight[c], c);
    } else {
      for (int64_t c = c0; c < c1; ++c) part.add(z[c], 1.0f, c);
    }
    total.merge(part);
  }
  return total;
}

}  // namespace

Status prepare(const PrepareArgs& a) {
  const int64_t v = a.vocab_size;
  double weight_sum = static_cast<double>(v);
  if (a.class_weight) {
    weight_sum = 0.0;
    for (int64_t c = 0; c < v; ++c) {
      const float w = a.class_weight[c];
      if (!std::isfinite(w) || w < 0.0f) {
        return Status::Error(StatusCode::kInvalidArgument, "class_weight[" + std::to_string(c) +
                                                               "] = " + number(w) +
                                                               " is not a finite number >= 0");
      }
      weight_sum += w;
    }
  }
  double denominator = 0.0;
  int64_t valid = 0;
  for (int64_t i = 0; i < a.num_tokens; ++i) {
    const int64_t y = label_at(a.labels, a.label_type, i);
    if (!label_is_valid(y, a.ignore_index)) continue;
    if (!label_in_range(y, v)) {
      return Status::Error(StatusCode::kInvalidArgument,
                           "labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                               " is out of range [0, " + std::to_string(v) +
                               ") and is not ignore_index (" + std::to_string(a.ignore_index) +
                               ")");
    }
    ++valid;
    denominator += a.class_weight ? a.class_weight[y] : 1.0f;
  }
  std::fill(a.scalars, a.scalars + kNumScalars, 0.0f);
  a.scalars[kScalarDenominator] = static_cast<float>(denominator);
  a.scalars[kScalarInvDenominator] =
      denominator > 0.0 ? static_cast<float>(1.0 / denominator) : 0.0f;
  a.scalars[kScalarWeightSum] = static_cast<float>(weight_sum);
  a.scalars[kScalarValidRows] = static_cast<float>(valid);
  a.scalars[kScalarLabelError] = 0.0f;
  return Status::Ok();
}

Status rows_forward(const RowForwardArgs& a) {
  if (a.rows <= 0) return Status::Ok();
  const int64_t v = a.vocab_size;
  const int64_t cols = a.cols > 0 ? a.cols : v;
  const int64_t col0 = a.col_offset;
  if (col0 < 0 || col0 + cols > v || (cols < v && (a.carry == nullptr || a.dz != nullptr))) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "rows_forward: columns [" + std::to_string(col0) + ", " +
                             std::to_string(col0 + cols) + ") must lie in [0, " +
                             std::to_string(v) + "), and part of a row needs carry and no dz");
  }
  const int threads = max_threads();
  RowBuffers buf;
  Status s = allocate(&buf, cols, threads, a.bias, a.bias_type, col0);
  if (!s.ok()) return s;
  const float* bias = a.bias ? buf.bias.data() : nullptr;
  const float* cw = a.class_weight ? a.class_weight + col0 : nullptr;
  const LossOptions o = a.options;
  const float weight_sum = a.scalars[kScalarWeightSum];
  const float inv_den = a.scalars[kScalarInvDenominator];
  const size_t in_size = dtype_size(a.logits_type);
  const size_t dz_size = dtype_size(a.dz_type);

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t row = a.row_offset + r;
    float* z = buf.z.data() + static_cast<size_t>(thread_id()) * cols;
    // The whole row is read into z before any dz element is written, which is what makes dz
    // aliasing the logits safe.
    transformed_row(static_cast<const char*>(a.logits) + r * a.ld * in_size, a.logits_type, bias,
                    cols, o, z);
    RowState st = row_statistics(z, cw, cols);
    st.argmax = st.argmax < 0 ? -1 : st.argmax + col0;
    const int64_t y = label_at(a.labels, a.label_type, row);
    const bool label_here = y >= col0 && y < col0 + cols;
    float z_target = label_here ? z[y - col0] : NAN;
    if (a.carry && !carry_row_block(a.carry[row], col0, cols, v, label_here, st, z_target)) {
      continue;
    }
    const float lse = st.lse();
    const bool valid = label_is_valid(y, o.ignore_index);
    const float w_target = valid ? (a.class_weight ? a.class_weight[y] : 1.0f) : 0.0f;
    a.row_loss[row] = valid ? row_loss(lse, z_target, w_target, st.sum_wz, weight_sum, v, o) : 0.0f;
    a.lse[row] = lse;
    if (a.row_metrics) {
      float* m = a.row_metrics + row * kNumRowMetrics;
      m[kRowMaxLogit] = valid ? st.max : -INFINITY;
      m[kRowLogitNorm] = valid ? std::sqrt(st.sum_z2) : 0.0f;
      m[kRowEntropy] = valid ? st.entropy() : 0.0f;
      m[kRowLseSquared] = valid ? lse * lse : 0.0f;
      m[kRowCorrect] = valid && st.argmax == y ? 1.0f : 0.0f;
    }
    if (a.dz) {  // whole rows only (checked above)
      const float g = valid ? row_upstream(o.reduction, a.grad_loss, row, inv_den) : 0.0f;
      const float g_lse = a.grad_lse ? a.grad_lse[row] : 0.0f;
      const GradCoefs k = grad_coefs(valid, g, g_lse, lse, w_target, weight_sum, v, o);
      void* dz = static_cast<char*>(a.dz) + r * a.ldz * dz_size;
      if (a.dz_type == DType::kFloat32) {
        float* d = static_cast<float*>(dz);
        for (int64_t c = 0; c < v; ++c) {
          d[c] = raw_logit_grad(k, z[c], lse, c == y, a.class_weight ? a.class_weight[c] : 1.0f, o);
        }
      } else {
        for (int64_t c = 0; c < v; ++c) {
          store_from_float(
              dz, a.dz_type, c,
              raw_logit_grad(k, z[c], lse, c == y, a.class_weight ? a.class_weight[c] : 1.0f, o));
        }
      }
    }
  }
  return Status::Ok();
}

Status rows_grad(const RowGradArgs& a) {
  if (a.rows <= 0 || a.cols <= 0) return Status::Ok();
  if (a.tile_exp != nullptr) {  // only a fused statistics GEMM writes them, and the CPU has none
    return Status::Error(StatusCode::kInvalidArgument,
                         "rows_grad: tile_exp is not served by the CPU backend");
  }
  const int64_t cols = a.cols;
  const int threads = max_threads();
  RowBuffers buf;
  Status s = allocate(&buf, cols, threads, a.bias, a.bias_type, a.col_offset);
  if (!s.ok()) return s;
  const float* bias = a.bias ? buf.bias.data() : nullptr;
  const float* cw = a.class_weight ? a.class_weight + a.col_offset : nullptr;
  const LossOptions o = a.options;
  const float weight_sum = a.scalars[kScalarWeightSum];
  const float inv_den = a.scalars[kScalarInvDenominator];
  const size_t dz_size = dtype_size(a.dz_type);

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t row = a.row_offset + r;
    float* z = buf.z.data() + static_cast<size_t>(thread_id()) * cols;
    transformed_row(a.logits + r * a.ld, DType::kFloat32, bias, cols, o, z);
    const float lse = a.lse[row];
    const int64_t y = label_at(a.labels, a.label_type, row);
    const bool valid = label_is_valid(y, o.ignore_index);
    const float w_target = valid ? (a.class_weight ? a.class_weight[y] : 1.0f) : 0.0f;
    const float g = valid ? row_upstream(o.reduction, a.grad_loss, row, inv_den) : 0.0f;
    const float g_lse = a.grad_lse ? a.grad_lse[row] : 0.0f;
    const GradCoefs k = grad_coefs(valid, g, g_lse, lse, w_target, weight_sum, a.vocab_size, o);
    const int64_t local_y = y - a.col_offset;  // may fall outside this block
    void* dz = static_cast<char*>(a.dz) + r * a.ldz * dz_size;
    for (int64_t c = 0; c < cols; ++c) {
      store_from_float(dz, a.dz_type, c,
                       raw_logit_grad(k, z[c], lse, c == local_y, cw ? cw[c] : 1.0f, o));
    }
  }
  return Status::Ok();
}

Status column_sum(const ColumnSumArgs& a) {
  if (a.cols <= 0) return Status::Ok();
  const size_t esize = dtype_size(a.type);
  const int64_t blocks = (a.cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kColumnBlock;
    const int64_t n = std::min(kColumnBlock, a.cols - c0);
    double acc[kColumnBlock] = {};
    for (int64_t r = 0; r < a.rows; ++r) {
      const void* row = static_cast<const char*>(a.block) + (r * a.ld + c0) * esize;
      if (a.type == DType::kFloat32) {
        const float* f = static_cast<const float*>(row);
        for (int64_t j = 0; j < n; ++j) acc[j] += f[j];
      } else {
        for (int64_t j = 0; j < n; ++j) acc[j] += load_as_float(row, a.type, j);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      a.acc[c0 + j] = static_cast<float>(acc[j] + (a.accumulate ? a.acc[c0 + j] : 0.0));
    }
  }
  return Status::Ok();
}

Status finalize(const FinalizeArgs& a) {
  const int64_t n = a.num_tokens;
  const double valid = a.scalars[kScalarValidRows];
  if (a.reduction != Reduction::kNone) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += a.row_loss[i];
    if (a.reduction == Reduction::kMean) total *= a.scalars[kScalarInvDenominator];
    a.loss[0] = valid > 0 ? static_cast<float>(total) : 0.0f;
  }
  if (a.metrics) {
    std::fill(a.metrics, a.metrics + kNumMetrics, 0.0f);
    if (valid > 0 && a.row_metrics) {
      double max_logit = -INFINITY;
      double sums[kNumRowMetrics] = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* m = a.row_metrics + i * kNumRowMetrics;
        max_logit = std::max<double>(max_logit, m[kRowMaxLogit]);
        for (int j = kRowLogitNorm; j < kNumRowMetrics; ++j) sums[j] += m[j];
      }
      a.metrics[kMetricMaxLogit] = static_cast<float>(max_logit);
      a.metrics[kMetricLogitNorm] = static_cast<float>(sums[kRowLogitNorm] / valid);
      a.metrics[kMetricEntropy] = static_cast<float>(sums[kRowEntropy] / valid);
      a.metrics[kMetricLseSquared] = static_cast<float>(sums[kRowLseSquared] / valid);
      a.metrics[kMetricAccuracy] = static_cast<float>(sums[kRowCorrect] / valid);
    }
    a.metrics[kMetricValidTokens] = static_cast<float>(valid);
  }
  return Status::Ok();
}

Status scale(void* data, DType type, int64_t count, const float* factor) {
  const float s = *factor;
  if (count <= 0 || s == 1.0f) return Status::Ok();
#pragma omp parallel for schedule(static) if (count > (int64_t(1) << 15))
  for (int64_t i = 0; i < count; ++i) {
    store_from_float(data, type, i, load_as_float(data, type, i) * s);
  }
  return Status::Ok();
}

Status cast(const CastArgs& a) {
  if (a.rows == 0 || a.cols == 0) return Status::Ok();
  if (a.rows < 0 || a.cols < 0 || a.ld_src < a.cols || a.ld_dst < a.cols || !a.src || !a.dst) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "cast: need rows, cols >= 0, ld_src and ld_dst >= cols, src and dst");
  }
  const float f = a.factor != nullptr ? *a.factor : 1.0f;
#pragma omp parallel for schedule(static) if (a.rows * a.cols > (int64_t(1) << 15))
  for (int64_t r = 0; r < a.rows; ++r) {
    const float s = a.row_factor != nullptr ? a.row_factor[r] * f : f;
    for (int64_t c = 0; c < a.cols; ++c) {
      store_from_float(a.dst, a.dst_type, r * a.ld_dst + c,
                       load_as_float(a.src, a.src_type, r * a.ld_src + c) * s);
    }
  }
  return Status::Ok();
}

}  // namespace flce::detail::cpu
