// rows_forward on Hopper: each row of an fp32 logits block is held in registers across a
// thread-block cluster and read from memory once.
//
// The portable kernel (row_kernels.cu) walks a row twice when a gradient is wanted: statistics,
// then dZ, so every logit is read twice (8 bytes) before its 16-bit dZ is written (2 bytes). Here
// the row is split over the blocks of a cluster (up to 8 blocks x 512 threads x 64 values =
// 262144 columns): each block merges the online-softmax state of its part, the blocks exchange
// those states through distributed shared memory, every block finishes the row the same way
// (same merge order, so bit-identical), and each writes the dZ of its part from its registers.
// 4 + 2 bytes per logit instead of 4 + 4 + 2, and the forward-only statistics walk keeps 16
// independent 16-byte loads per thread in flight.
//
// In place: dZ column c (16-bit) lands on the bytes of fp32 column c / 2, which another block of
// the cluster may hold. Every block has loaded its whole part before the cluster barrier that
// precedes the first dZ store, so no logit is overwritten before it was read.
#include <cooperative_groups.h>

#include <climits>

#include "core/row_math.h"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/row_common.cuh"

namespace flce::detail::cuda {
namespace {

constexpr int kClusterThreads = 512;
constexpr int kClusterVecs = 16;                     // 16-byte loads per thread
constexpr int kClusterElems = 4 * kClusterVecs;      // fp32 values per thread
constexpr int kMaxClusterBlocks = 8;                 // the portable cluster size
constexpr int64_t kClusterMaxVocab =
    int64_t(kMaxClusterBlocks) * kClusterThreads * kClusterElems;  // 262144

// Column of vector j of this thread; the block's part starts at col0.
__device__ __forceinline__ int64_t cluster_column(int64_t col0, int j) {
  return col0 + (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * 4;
}

// kFull: also the sums only metrics and label smoothing need (sum of w z, of z^2, of p z, and the
// argmax); without them the statistics are a max and a sum of exponentials.
template <typename DzT, bool kFull>
__global__ void __launch_bounds__(kClusterThreads, 1)
    rows_forward_cluster_kernel(RowForwardArgs a, int cluster_blocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ __align__(16) unsigned char merge_smem[sizeof(RowState) * kMaxWarps];
  __shared__ RowState block_state;
  __shared__ RowGrad row_grad;

  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t r = blockIdx.x / cluster_blocks;
  const int64_t row = a.row_offset + r;
  const int64_t vocab = a.vocab_size;
  const LossOptions& o = a.options;
  const float* x = static_cast<const float*>(a.logits) + r * a.ld;
  const int64_t col0 = static_cast<int64_t>(rank) * blockDim.x * kClusterElems;

  // The block's part of the row. vocab % 4 == 0, so a vector is entirely in or out of the row.
  float z[kClusterElems];
#pragma unroll
  for (int j = 0; j < kClusterVecs; ++j) {
    const int64_t c = cluster_column(col0, j);
    float part[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    if (c < vocab) load_vec<float, 4>(x + c, part);
#pragma unroll
    for (int i = 0; i < 4; ++i) z[4 * j + i] = part[i];
  }
#pragma unroll
  for (int j = 0; j < kClusterVecs; ++j) {
    const int64_t c = cluster_column(col0, j);
    if (c >= vocab) continue;
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (a.bias != nullptr) load_vec_dynamic<4>(a.bias, a.bias_type, c, b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[4 * j + i] = transform_logit(z[4 * j + i] + b[i], o.logit_scale, o.softcap);
    }
  }

  // This thread's statistics against its own max: one exponential per value, no rescaling.
  float m = -INFINITY;
#pragma unroll
  for (int e = 0; e < kClusterElems; ++e) m = fmaxf(m, z[e]);
  RowState st;
  st.max = m;
  st.best = m;
#pragma unroll
  for (int j = 0; j < kClusterVecs; ++j) {
    const int64_t c = cluster_column(col0, j);
    if (c >= vocab) continue;
    float w[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (kFull && a.class_weight != nullptr) load_vec<float, 4>(a.class_weight + c, w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float v = z[4 * j + i];
      const float ex = expf(v - m);
      st.sum_exp += ex;
      if (kFull) {
        st.sum_exp_z += ex * v;
        st.sum_wz += w[i] * v;
        st.sum_z2 += v * v;
        if (st.argmax < 0 && v == m && m > -INFINITY) st.argmax = c + i;  // first max wins
      }
    }
  }
  st = block_merge(st, reinterpret_cast<RowState*>(merge_smem));
  if (threadIdx.x == 0) block_state = st;
  cluster.sync();  // every block's state is visible to the cluster

  if (threadIdx.x == 0) {
    RowState total;
    for (int k = 0; k < cluster_blocks; ++k) total.merge(*cluster.map_shared_rank(&block_state, k));
    row_grad = finish_forward_row(a, row, total, x, rank == 0);
  }
  // No block reads a peer's shared memory past this point (so blocks may exit), row_grad is
  // visible to the block, and every block has read its whole part of the row.
  cluster.sync();
  if (a.dz == nullptr) return;

  const RowGrad rg = row_grad;
  DzT* dz = static_cast<DzT*>(a.dz) + r * a.ldz;
  // Class weights only enter the gradient through label smoothing.
  const float* weights = rg.k.coef_weight != 0.0f ? a.class_weight : nullptr;
#pragma unroll
  for (int j = 0; j < kClusterVecs; ++j) {
    const int64_t c = cluster_column(col0, j);
    if (c >= vocab) continue;
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (!rg.zero) {
      float w[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      if (weights != nullptr) load_vec<float, 4>(weights + c, w);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        g[i] = raw_logit_grad(rg.k, z[4 * j + i], rg.lse, c + i == rg.label, w[i], o);
      }
    }
    store_vec<DzT, 4>(dz + c, g);
  }
#else
  __trap();  // launched only on compute capability 9.0 and later (see the launcher)
#endif
}

template <typename DzT>
Status launch_typed(const RowForwardArgs& a, int cluster_blocks, int threads, bool full,
                    cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.rows * cluster_blocks));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster_blocks);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (full) {
    FLCE_CUDA_CHECK(
        cudaLaunchKernelEx(&cfg, rows_forward_cluster_kernel<DzT, true>, a, cluster_blocks));
  } else {
    FLCE_CUDA_CHECK(
        cudaLaunchKernelEx(&cfg, rows_forward_cluster_kernel<DzT, false>, a, cluster_blocks));
  }
  FLCE_CUDA_CHECK_LAUNCH("rows_forward_cluster_kernel");
  return Status::Ok();
}

bool device_has_clusters() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major >= 9;
}

}  // namespace

bool rows_forward_cluster_applies(const RowForwardArgs& a) {
  const int64_t v = a.vocab_size;
  if (a.logits_type != DType::kFloat32 || v % 4 != 0 || v > kClusterMaxVocab) return false;
  if (a.ld % 4 != 0 || !is_aligned(a.logits, 16)) return false;
  if (a.bias != nullptr && !is_aligned(a.bias, 4 * dtype_size(a.bias_type))) return false;
  if (a.class_weight != nullptr && !is_aligned(a.class_weight, 16)) return false;
  if (a.dz != nullptr && (a.ldz % 4 != 0 || !is_aligned(a.dz, 4 * dtype_size(a.dz_type)))) {
    return false;
  }
  if (a.rows * kMaxClusterBlocks > INT_MAX) return false;
  return device_has_clusters();
}

Status launch_rows_forward_cluster(const RowForwardArgs& a, cudaStream_t stream) {
  const int64_t per_block = int64_t(kClusterThreads) * kClusterElems;
  const int cluster_blocks = static_cast<int>((a.vocab_size + per_block - 1) / per_block);
  // Threads per block: just enough for the row (whole warps), so short rows waste no threads.
  const int64_t per_thread = int64_t(cluster_blocks) * kClusterElems;
  int64_t threads = (a.vocab_size + per_thread - 1) / per_thread;
  threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  const bool full = a.row_metrics != nullptr || a.options.label_smoothing > 0.0f;
  switch (a.dz_type) {
    case DType::kFloat32:
      return launch_typed<float>(a, cluster_blocks, static_cast<int>(threads), full, stream);
    case DType::kFloat16:
      return launch_typed<__half>(a, cluster_blocks, static_cast<int>(threads), full, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, cluster_blocks, static_cast<int>(threads), full,
                                         stream);
  }
  return Status::Error(StatusCode::kInvalidArgument,
                       "rows_forward: unsupported dz dtype code " +
                           std::to_string(static_cast<int>(a.dz_type)));
}

}  // namespace flce::detail::cuda
