// The Hopper fused logits GEMMs alone (csrc/cuda/sm90_fused_logits.cuh) against one cuBLAS GEMM
// of the same shape with bf16 output (what a framework's logits GEMM writes), at the benchmark's
// shapes and one recompute block: the statistics GEMM (forward) and the dZ GEMM (recompute
// backward) each as a ratio to cuBLAS measured in the same run.
//
//   cmake --build build --target flce_fused_gemm_bench && ./build/flce_fused_gemm_bench
//
// Needs a compute capability 9.0 GPU and a build with CUTLASS. Inputs are deterministic
// pseudo-random bf16 values; times are the mean of 5 launches after one warm-up, CUDA events.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "core/backend.h"
#include "cuda/fused_logits.h"
#include "gemm_bench_common.cuh"

namespace {

using flce::DType;
using flce::detail::LogitsOperands;
using flce::detail::RowForwardArgs;
using flce::detail::RowGradArgs;
using flce::detail::RowState;

// Values in [-scale, scale) from a multiplicative hash of the index.
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, float scale) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = __float2bfloat16(scale * (((i * 2654435761u) % 1000) / 500.0f - 1.0f));
}

template <class T>
T* device_alloc(size_t count) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, count * sizeof(T)));
  return p;
}

}  // namespace

int main() {
  struct Shape {
    const char* name;
    int64_t n, v, d;
  };
  const Shape shapes[] = {{"gemma2", 8192, 256000, 2304},
                          {"llama3", 8192, 128256, 4096},
                          {"qwen-0.5b", 16384, 151936, 896},
                          {"llama-70b", 4096, 128256, 8192},
                          {"recompute block", 2048, 8192, 4096}};
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) return 1;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("# fused logits GEMMs on %s\n\n", prop.name);
  std::printf(
      "| shape (N, V, D) | cuBLAS bf16-out ms | statistics GEMM ms (x cuBLAS) | dZ GEMM ms (x "
      "cuBLAS) |\n");
  std::printf("|---|---|---|---|\n");
  for (const Shape& sh : shapes) {
    auto* x = device_alloc<__nv_bfloat16>(sh.n * sh.d);
    auto* w = device_alloc<__nv_bfloat16>(sh.v * sh.d);
    auto* out = device_alloc<__nv_bfloat16>(sh.n * sh.v);
    fill_bf16<<<(sh.n * sh.d + 255) / 256, 256>>>(x, sh.n * sh.d, 0.05f);
    fill_bf16<<<(sh.v * sh.d + 255) / 256, 256>>>(w, sh.v * sh.d, 0.05f);
    std::vector<int64_t> host_labels(sh.n);
    for (int64_t i = 0; i < sh.n; ++i) host_labels[i] = (i * 7919) % sh.v;
    auto* labels = device_alloc<int64_t>(sh.n);
    CHECK_CUDA(
        cudaMemcpy(labels, host_labels.data(), sh.n * sizeof(int64_t), cudaMemcpyHostToDevice));
    std::vector<float> host_scalars(flce::detail::kNumScalars, 0.0f);
    host_scalars[flce::detail::kScalarInvDenominator] = 1.0f / sh.n;
    host_scalars[flce::detail::kScalarWeightSum] = static_cast<float>(sh.v);
    auto* scalars = device_alloc<float>(host_scalars.size());
    CHECK_CUDA(cudaMemcpy(scalars, host_scalars.data(), host_scalars.size() * sizeof(float),
                          cudaMemcpyHostToDevice));
    std::vector<float> host_lse(sh.n, 12.0f);
    auto* lse = device_alloc<float>(sh.n);
    CHECK_CUDA(cudaMemcpy(lse, host_lse.data(), sh.n * sizeof(float), cudaMemcpyHostToDevice));
    const int64_t tiles =
        (sh.v + flce::detail::cuda::kFusedTileCols - 1) / flce::detail::cuda::kFusedTileCols;
    auto* partials = device_alloc<RowState>(sh.n * tiles);
    auto* target_z = device_alloc<float>(sh.n);

    const float alpha = 1.0f, beta = 0.0f;
    const float t_cublas = time_ms([&] {
      cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, sh.v, sh.n, sh.d, &alpha, w, CUDA_R_16BF, sh.d,
                   x, CUDA_R_16BF, sh.d, &beta, out, CUDA_R_16BF, sh.v, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
    });

    LogitsOperands op;
    op.x = x;
    op.ldx = sh.d;
    op.weight = w;
    op.ldw = sh.d;
    op.dtype = DType::kBFloat16;
    op.rows = sh.n;
    op.cols = sh.v;
    op.hidden = sh.d;
    RowForwardArgs rf;
    rf.rows = sh.n;
    rf.cols = sh.v;
    rf.vocab_size = sh.v;
    rf.labels = labels;
    rf.scalars = scalars;
    rf.partials = partials;
    rf.partials_ld = tiles;
    rf.target_z = target_z;
    RowGradArgs rg;
    rg.rows = sh.n;
    rg.cols = sh.v;
    rg.vocab_size = sh.v;
    rg.labels = labels;
    rg.scalars = scalars;
    rg.lse = lse;
    rg.dz = out;
    rg.ldz = sh.v;
    rg.dz_type = DType::kBFloat16;
    const flce::Status s1 = flce::detail::cuda::launch_logits_stats(op, rf, nullptr);
    const flce::Status s2 = flce::detail::cuda::launch_logits_grad(op, rg, nullptr);
    if (!s1.ok() || !s2.ok()) {
      std::fprintf(stderr, "the fused GEMMs cannot run here: %s %s\n", s1.message.c_str(),
                   s2.message.c_str());
      return 1;
    }
    const float t_stats =
        time_ms([&] { (void)flce::detail::cuda::launch_logits_stats(op, rf, nullptr); });
    const float t_grad =
        time_ms([&] { (void)flce::detail::cuda::launch_logits_grad(op, rg, nullptr); });
    CHECK_CUDA(cudaDeviceSynchronize());
    std::printf("| %s (%lld, %lld, %lld) | %.3f | %.3f (%.2f) | %.3f (%.2f) |\n", sh.name,
                static_cast<long long>(sh.n), static_cast<long long>(sh.v),
                static_cast<long long>(sh.d), t_cublas, t_stats, t_stats / t_cublas, t_grad,
                t_grad / t_cublas);
    for (void* p :
         {static_cast<void*>(x), static_cast<void*>(w), static_cast<void*>(out),
          static_cast<void*>(labels), static_cast<void*>(scalars), static_cast<void*>(lse),
          static_cast<void*>(partials), static_cast<void*>(target_z)}) {
      CHECK_CUDA(cudaFree(p));
    }
  }
  cublasDestroy(handle);
  return 0;
}
