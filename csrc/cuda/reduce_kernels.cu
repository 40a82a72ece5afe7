// Reductions over rows and columns: prepare (label scan), finalize (loss and metrics), the bias
// gradient's column sum; and the elementwise passes: scale (the upstream gradient) and cast (the
// driver's conversions between fp32 and 16-bit, with optional per-row and device-side factors).
//
// Every reduction runs in a fixed order (fixed thread-to-element assignment, fixed tree), so a
// call gives bit-identical results run to run: no atomics.
#include <algorithm>
#include <climits>

#include "core/row_math.h"
#include "cuda/common.cuh"
#include "cuda/fused_logits.h"
#include "cuda/launch.h"

namespace flce::detail::cuda {
namespace {

// prepare and finalize run as one block: N labels or N rows are a few hundred KiB at most for the
// token counts of one training step, far below what a second stage would pay for.
constexpr int kScanThreads = 1024;
static_assert(kScanThreads % kWarpSize == 0 && kScanThreads / kWarpSize <= kMaxWarps,
              "block_reduce assumes whole warps and at most kMaxWarps of them");

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

// prepare ------------------------------------------------------------------------------------

template <typename LabelT>
__global__ void __launch_bounds__(kScanThreads)
    prepare_kernel(const LabelT* labels, const float* class_weight, int64_t num_tokens,
                   int64_t vocab_size, int64_t ignore_index, float* scalars) {
  __shared__ double smem_d[kMaxWarps];
  __shared__ long long smem_i[kMaxWarps];
  // Accumulated in double: a sum of up to millions of weights stays exact enough that the mean's
  // divisor does not depend on the thread count.
  double denominator = 0.0;
  long long valid = 0, bad_label = 0;
  for (int64_t i = threadIdx.x; i < num_tokens; i += blockDim.x) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (!label_is_valid(y, ignore_index)) continue;
    ++valid;
    if (label_in_range(y, vocab_size)) {
      denominator += class_weight != nullptr ? static_cast<double>(class_weight[y]) : 1.0;
    } else {
      // The weight of a label out of range does not exist: poison the mean (see rows_forward).
      bad_label = 1;
      denominator += class_weight != nullptr ? static_cast<double>(NAN) : 1.0;
    }
  }
  double weight_sum = 0.0;
  if (class_weight != nullptr) {
    for (int64_t c = threadIdx.x; c < vocab_size; c += blockDim.x) weight_sum += class_weight[c];
  }
  denominator = block_reduce(denominator, Sum{}, 0.0, smem_d);
  weight_sum = block_reduce(weight_sum, Sum{}, 0.0, smem_d);
  valid = block_reduce(valid, Sum{}, 0LL, smem_i);
  bad_label = block_reduce(bad_label, Max{}, 0LL, smem_i);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kNumScalars; ++s) scalars[s] = 0.0f;
    scalars[kScalarDenominator] = static_cast<float>(denominator);
    // No valid row: the mean is defined as 0, and every gradient with it.
    scalars[kScalarInvDenominator] =
        denominator != 0.0 ? static_cast<float>(1.0 / denominator) : 0.0f;
    scalars[kScalarWeightSum] =
        class_weight != nullptr ? static_cast<float>(weight_sum) : static_cast<float>(vocab_size);
    scalars[kScalarValidRows] = static_cast<float>(valid);
    scalars[kScalarLabelError] = bad_label != 0 ? 1.0f : 0.0f;
  }
}

// finalize -----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kScanThreads) finalize_kernel(FinalizeArgs a) {
  __shared__ double smem_d[kMaxWarps];
  __shared__ float smem_f[kMaxWarps];
  const bool want_loss = a.reduction != Reduction::kNone;
  const bool want_metrics = a.metrics != nullptr && a.row_metrics != nullptr;
  double loss = 0.0, norm = 0.0, entropy = 0.0, lse2 = 0.0, correct = 0.0;
  float max_logit = -INFINITY;
  for (int64_t i = threadIdx.x; i < a.num_tokens; i += blockDim.x) {
    if (want_loss) loss += a.row_loss[i];
    if (want_metrics) {
      const float* m = a.row_metrics + i * kNumRowMetrics;
      max_logit = fmaxf(max_logit, m[kRowMaxLogit]);
      norm += m[kRowLogitNorm];
      entropy += m[kRowEntropy];
      lse2 += m[kRowLseSquared];
      correct += m[kRowCorrect];
    }
  }
  // Uniform branches: every thread takes the same side, so the barriers inside are reached by all.
  if (want_loss) loss = block_reduce(loss, Sum{}, 0.0, smem_d);
  if (want_metrics) {
    max_logit = block_reduce(max_logit, Max{}, -INFINITY, smem_f);
    norm = block_reduce(norm, Sum{}, 0.0, smem_d);
    entropy = block_reduce(entropy, Sum{}, 0.0, smem_d);
    lse2 = block_reduce(lse2, Sum{}, 0.0, smem_d);
    correct = block_reduce(correct, Sum{}, 0.0, smem_d);
  }
  if (threadIdx.x != 0) return;
  if (want_loss) {
    const double scale = a.reduction == Reduction::kMean
                             ? static_cast<double>(a.scalars[kScalarInvDenominator])
                             : 1.0;
    a.loss[0] = static_cast<float>(loss * scale);
  }
  if (want_metrics) {
    const float valid = a.scalars[kScalarValidRows];
    float* out = a.metrics;
    if (valid > 0.0f) {
      const double inv = 1.0 / static_cast<double>(valid);
      out[kMetricMaxLogit] = max_logit;
      out[kMetricLogitNorm] = static_cast<float>(norm * inv);
      out[kMetricEntropy] = static_cast<float>(entropy * inv);
      out[kMetricLseSquared] = static_cast<float>(lse2 * inv);
      out[kMetricAccuracy] = static_cast<float>(correct * inv);
    } else {
      for (int m = 0; m < kNumMetrics; ++m) out[m] = 0.0f;
    }
    out[kMetricValidTokens] = valid;
  }
}

// column_sum ---------------------------------------------------------------------------------

// A block covers kColLanes * VEC columns; its kColRowGroups warps split the rows, each lane
// summing its columns down its share of rows (coalesced across the warp), then the groups are
// added in order through shared memory.
constexpr int kColLanes = kWarpSize;
constexpr int kColRowGroups = 16;
constexpr int kColThreads = kColLanes * kColRowGroups;

template <typename T, int VEC>
__global__ void __launch_bounds__(kColThreads)
    column_sum_kernel(const T* block, int64_t ld, int64_t rows, int64_t cols, float* acc,
                      bool accumulate) {
  __shared__ float part[kColRowGroups][kColLanes * VEC];
  static_assert(sizeof(part) <= 48 * 1024, "column_sum: static shared memory limit");
  const int64_t block_col0 = static_cast<int64_t>(blockIdx.x) * kColLanes * VEC;
  const int64_t c0 = block_col0 + static_cast<int64_t>(threadIdx.x) * VEC;
  float s[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) s[i] = 0.0f;
  if (c0 < cols) {
    const bool full = c0 + VEC <= cols;
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < rows; r += kColRowGroups) {
      const T* p = block + r * ld + c0;
      if (full) {
        float v[VEC];
        load_vec<T, VEC>(p, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[i] += v[i];
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (c0 + i < cols) s[i] += to_float(p[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[threadIdx.y][threadIdx.x * VEC + i] = s[i];
  __syncthreads();
  for (int k = threadIdx.y * kColLanes + threadIdx.x; k < kColLanes * VEC; k += kColThreads) {
    const int64_t c = block_col0 + k;
    if (c >= cols) continue;
    float t = 0.0f;
#pragma unroll
    for (int g = 0; g < kColRowGroups; ++g) t += part[g][k];
    acc[c] = accumulate ? acc[c] + t : t;
  }
}

// scale --------------------------------------------------------------------------------------

constexpr int kScaleThreads = 256;
// Grid-stride beyond this many blocks: already several waves on any current GPU.
constexpr int64_t kScaleMaxBlocks = 8192;

// Blocks of kScaleThreads for a grid-stride walk over `count` elements, `per_thread` each.
unsigned grid_stride_blocks(int64_t count, int per_thread) {
  const int64_t per_block = static_cast<int64_t>(kScaleThreads) * per_thread;
  return static_cast<unsigned>(std::min((count + per_block - 1) / per_block, kScaleMaxBlocks));
}

// Every thread reads the factor and leaves at once when it is 1: the whole launch then touches
// no data, which is what makes rescaling by a unit upstream gradient free.
template <typename T, int VEC>
__global__ void __launch_bounds__(kScaleThreads)
    scale_kernel(T* __restrict__ data, int64_t count, const float* __restrict__ factor) {
  const float s = *factor;
  if (s == 1.0f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < count;
       i += stride) {
    if (i + VEC <= count) {
      float v[VEC];
      load_vec<T, VEC>(data + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] *= s;
      store_vec<T, VEC>(data + i, v);
    } else {
      for (int j = 0; i + j < count; ++j) data[i + j] = from_float<T>(to_float(data[i + j]) * s);
    }
  }
}

template <typename T>
Status scale_as(T* data, int64_t count, const float* factor, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = is_aligned(data, 16);
  const unsigned blocks = grid_stride_blocks(count, vec ? kVec : 1);
  if (vec) {
    scale_kernel<T, kVec><<<blocks, kScaleThreads, 0, stream>>>(data, count, factor);
  } else {
    scale_kernel<T, 1><<<blocks, kScaleThreads, 0, stream>>>(data, count, factor);
  }
  FLCE_CUDA_CHECK_LAUNCH("scale_kernel");
  return Status::Ok();
}

// cast ----------------------------------------------------------------------------------------

constexpr int kCastThreads = 256;
constexpr int kCastVec = 8;

template <typename Src, typename Dst, int kVec>
__global__ void __launch_bounds__(kCastThreads) cast_kernel(CastArgs a) {
  const float f = a.factor != nullptr ? *a.factor : 1.0f;
  const int64_t groups_per_row = (a.cols + kVec - 1) / kVec;
  const int64_t total = a.rows * groups_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups_per_row;
    const int64_t c0 = (i - r * groups_per_row) * kVec;
    const float s = a.row_factor != nullptr ? a.row_factor[r] * f : f;
    const Src* src = static_cast<const Src*>(a.src) + r * a.ld_src + c0;
    Dst* dst = static_cast<Dst*>(a.dst) + r * a.ld_dst + c0;
    if (kVec > 1 && c0 + kVec <= a.cols) {
      float v[kVec];
      load_vec<Src, kVec>(src, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= s;
      store_vec<Dst, kVec>(dst, v);
    } else {
      for (int j = 0; j < kVec && c0 + j < a.cols; ++j)
        dst[j] = from_float<Dst>(to_float(src[j]) * s);
    }
  }
}

}  // namespace

Status launch_scale(void* data, DType type, int64_t count, const float* factor,
                    cudaStream_t stream) {
  if (count == 0) return Status::Ok();
  if (count < 0) return invalid("scale: count must be >= 0, got " + std::to_string(count));
  if (data == nullptr || factor == nullptr) {
    return invalid("scale: data and factor must not be null");
  }
  switch (type) {
    case DType::kFloat32:
      return scale_as(static_cast<float*>(data), count, factor, stream);
    case DType::kFloat16:
      return scale_as(static_cast<__half*>(data), count, factor, stream);
    case DType::kBFloat16:
      return scale_as(static_cast<__nv_bfloat16*>(data), count, factor, stream);
  }
  return invalid("scale: unsupported dtype code " + std::to_string(static_cast<int>(type)));
}

Status launch_prepare(const PrepareArgs& a, cudaStream_t stream) {
  if (a.scalars == nullptr) return invalid("prepare: scalars must not be null");
  if (a.num_tokens < 0 || a.vocab_size < 1) {
    return invalid("prepare: need num_tokens >= 0 and vocab_size >= 1, got " +
                   std::to_string(a.num_tokens) + " and " + std::to_string(a.vocab_size));
  }
  if (a.num_tokens > 0 && a.labels == nullptr) return invalid("prepare: labels must not be null");
  // Launched even for N = 0 so that the scalars are always written.
  if (a.label_type == IndexType::kInt32) {
    prepare_kernel<int32_t>
        <<<1, kScanThreads, 0, stream>>>(static_cast<const int32_t*>(a.labels), a.class_weight,
                                         a.num_tokens, a.vocab_size, a.ignore_index, a.scalars);
  } else {
    prepare_kernel<int64_t>
        <<<1, kScanThreads, 0, stream>>>(static_cast<const int64_t*>(a.labels), a.class_weight,
                                         a.num_tokens, a.vocab_size, a.ignore_index, a.scalars);
  }
  FLCE_CUDA_CHECK_LAUNCH("prepare_kernel");
  return Status::Ok();
}

Status launch_finalize(const FinalizeArgs& a, cudaStream_t stream) {
  if (a.scalars == nullptr) return invalid("finalize: scalars must not be null");
  if (a.num_tokens < 0) {
    return invalid("finalize: num_tokens must be >= 0, got " + std::to_string(a.num_tokens));
  }
  const bool want_loss = a.reduction != Reduction::kNone;
  if (want_loss && (a.loss == nullptr || (a.num_tokens > 0 && a.row_loss == nullptr))) {
    return invalid("finalize: loss and row_loss must not be null for reduction mean or sum");
  }
  if (!want_loss && a.metrics == nullptr) return Status::Ok();
  finalize_kernel<<<1, kScanThreads, 0, stream>>>(a);
  FLCE_CUDA_CHECK_LAUNCH("finalize_kernel");
  return Status::Ok();
}

Status launch_column_sum(const ColumnSumArgs& a, cudaStream_t stream) {
  if (a.cols == 0) return Status::Ok();
  if (a.rows < 0 || a.cols < 0 || a.ld < a.cols) {
    return invalid("column_sum: need rows >= 0, cols >= 0 and ld >= cols, got rows " +
                   std::to_string(a.rows) + ", cols " + std::to_string(a.cols) + ", ld " +
                   std::to_string(a.ld));
  }
  if (a.acc == nullptr || (a.rows > 0 && a.block == nullptr)) {
    return invalid("column_sum: acc and block must not be null");
  }
  auto run = [&](auto* block) -> Status {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(block)>>;
    constexpr int kVec = 16 / sizeof(T);
    const dim3 threads(kColLanes, kColRowGroups);
    // The wide variant only when it is legal and still leaves a few blocks per SM.
    const int64_t wide_blocks = (a.cols + kColLanes * kVec - 1) / (kColLanes * kVec);
    const bool vec = is_aligned(block, kVec * sizeof(T)) && a.ld % kVec == 0 && wide_blocks >= 256;
    const int64_t cols_per_block = static_cast<int64_t>(kColLanes) * (vec ? kVec : 1);
    const int64_t blocks = (a.cols + cols_per_block - 1) / cols_per_block;
    if (blocks > INT_MAX) return invalid("column_sum: too many columns");
    if (vec) {
      column_sum_kernel<T, kVec><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          block, a.ld, a.rows, a.cols, a.acc, a.accumulate);
    } else {
      column_sum_kernel<T, 1><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          block, a.ld, a.rows, a.cols, a.acc, a.accumulate);
    }
    FLCE_CUDA_CHECK_LAUNCH("column_sum_kernel");
    return Status::Ok();
  };
  switch (a.type) {
    case DType::kFloat32:
      return run(static_cast<const float*>(a.block));
    case DType::kFloat16:
      return run(static_cast<const __half*>(a.block));
    case DType::kBFloat16:
      return run(static_cast<const __nv_bfloat16*>(a.block));
  }
  return invalid("column_sum: unsupported dtype code " + std::to_string(static_cast<int>(a.type)));
}

Status launch_cast(const CastArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return Status::Ok();
  if (a.rows < 0 || a.cols < 0 || a.ld_src < a.cols || a.ld_dst < a.cols || !a.src || !a.dst) {
    return invalid("cast: need rows, cols >= 0, ld_src and ld_dst >= cols, src and dst");
  }
  return dispatch_dtype(a.src_type, [&](auto src_tag) {
    using Src = typename decltype(src_tag)::type;
    return dispatch_dtype(a.dst_type, [&](auto dst_tag) {
      using Dst = typename decltype(dst_tag)::type;
      // One row needs no pitch that keeps later rows aligned.
      const bool one_row = a.rows == 1;
      const bool vec =
          is_aligned(a.src, kCastVec * sizeof(Src)) && (one_row || a.ld_src % kCastVec == 0) &&
          is_aligned(a.dst, kCastVec * sizeof(Dst)) && (one_row || a.ld_dst % kCastVec == 0);
      const int64_t vec_width = vec ? kCastVec : 1;
      const int64_t work = a.rows * ((a.cols + vec_width - 1) / vec_width);
      // A grid-stride loop: enough blocks to fill the GPU several times over.
      const int64_t blocks = std::min<int64_t>((work + kCastThreads - 1) / kCastThreads,
                                               static_cast<int64_t>(current_device_sms()) * 16);
      if (vec) {
        cast_kernel<Src, Dst, kCastVec>
            <<<static_cast<unsigned>(blocks), kCastThreads, 0, stream>>>(a);
      } else {
        cast_kernel<Src, Dst, 1><<<static_cast<unsigned>(blocks), kCastThreads, 0, stream>>>(a);
      }
      FLCE_CUDA_CHECK_LAUNCH("cast_kernel");
      return Status::Ok();
    });
  });
}

}  // namespace flce::detail::cuda
