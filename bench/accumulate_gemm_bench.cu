// The fp32-accumulating GEMMs of flce's plans (C += A B: bf16 operands, an fp32 accumulator C
// read and written by the GEMM's epilogue) under every algorithm cuBLASLt's heuristic offers,
// against the same product with beta = 0 (C written, not read; fp32 and bf16 output). The
// difference is what the accumulator's read-modify-write costs where the epilogue does not hide
// it, and the sweep shows whether an algorithm other than the heuristic's first hides more.
//
//   cmake --build build --target flce_accumulate_gemm_bench && ./build/flce_accumulate_gemm_bench
//
// Shapes: the recompute strategy's dx GEMMs (acc[rows, D] += dZ[rows, Vc] W[Vc, D], blocks of the
// 60 MiB plans at qwen-0.5b, gemma2 and llama3) and grad-in-forward's dW GEMMs (dW[V, D] +=
// dZ[rows, V]^T x[rows, D], per token chunk). Inputs are deterministic pseudo-random bf16 values;
// times are the mean of 5 launches after one warm-up, CUDA events. Every algorithm's result is
// checked against the heuristic's first from the same starting accumulator (every 97th element).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemm_bench_common.cuh"

namespace {

#define CHECK_LT(call)                                                \
  do {                                                                \
    cublasStatus_t s_ = (call);                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                \
      std::fprintf(stderr, "%s failed: status %d\n", #call, int(s_)); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

// Values in [-scale, scale) from a multiplicative hash of the index.
template <class T>
__global__ void fill(T* p, size_t n, float scale, unsigned salt) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = T(scale * ((((i + salt) * 2654435761u) % 1000) / 500.0f - 1.0f));
}

template <class T>
T* device_fill(size_t count, float scale, unsigned salt) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, count * sizeof(T)));
  fill<<<static_cast<unsigned>((count + 255) / 256), 256>>>(p, count, scale, salt);
  CHECK_CUDA(cudaGetLastError());
  return p;
}

// A row-major product C[M, N] (+)= op(A)[M, K] B[K, N]: A is row-major [M, K], or (a_transposed)
// the transpose of a row-major [K, M]; B is row-major [K, N].
struct Case {
  const char* name;
  int64_t m, n, k;
  bool a_transposed;
};

struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
};

// cuBLASLt is column-major: C^T[N, M] = B^T[N, K] op(A)^T[K, M], so its "A" is our B and its "B"
// is our A.
Descs describe(const Case& c, cudaDataType_t c_type) {
  Descs d;
  CHECK_LT(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t no = CUBLAS_OP_N, tr = CUBLAS_OP_T;
  CHECK_LT(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &no, sizeof(no)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB,
                                          c.a_transposed ? &tr : &no, sizeof(no)));
  CHECK_LT(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_16BF, c.n, c.k, c.n));
  if (c.a_transposed) {
    CHECK_LT(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_16BF, c.m, c.k, c.m));
  } else {
    CHECK_LT(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_16BF, c.k, c.m, c.k));
  }
  CHECK_LT(cublasLtMatrixLayoutCreate(&d.c, c_type, c.n, c.m, c.n));
  return d;
}

void destroy(const Descs& d) {
  cublasLtMatmulDescDestroy(d.op);
  cublasLtMatrixLayoutDestroy(d.a);
  cublasLtMatrixLayoutDestroy(d.b);
  cublasLtMatrixLayoutDestroy(d.c);
}

int config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  uint32_t v = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written) !=
      CUBLAS_STATUS_SUCCESS) {
    return -1;
  }
  return static_cast<int>(v);
}

}  // namespace

int main() {
  const Case cases[] = {
      {"qwen-0.5b recompute dx (rows 8192, Vc 2304, D 896)", 8192, 896, 2304, false},
      {"gemma2 recompute dx (rows 4096, Vc 4352, D 2304)", 4096, 2304, 4352, false},
      {"llama3 recompute dx (rows 4096, Vc 2560, D 4096)", 4096, 4096, 2560, false},
      // At the default budget the accumulator is split (dw_accumulator_borrowed_rows): each
      // chunk's dW runs as two GEMMs of about V / 2 rows.
      {"qwen-0.5b grad-in-forward dW, 2048-row chunk, borrowed part", 75904, 896, 2048, true},
      {"qwen-0.5b grad-in-forward dW, 2048-row chunk, workspace part", 76032, 896, 2048, true},
      {"gemma2 grad-in-forward dW, 2048-row chunk, one part", 128000, 2304, 2048, true},
      {"qwen-0.5b grad-in-forward dW, 8192-row chunk", 151936, 896, 8192, true},
  };
  cublasLtHandle_t handle;
  CHECK_LT(cublasLtCreate(&handle));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const size_t ws_bytes = size_t(32) << 20;
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  cublasLtMatmulPreference_t pref;
  CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
  CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws_bytes, sizeof(ws_bytes)));
  std::printf("# fp32-accumulating GEMMs under cuBLASLt's algorithms, %s\n", prop.name);
  for (const Case& c : cases) {
    const size_t a_count = static_cast<size_t>(c.m) * c.k, b_count = static_cast<size_t>(c.k) * c.n;
    const size_t c_count = static_cast<size_t>(c.m) * c.n;
    auto* a = device_fill<__nv_bfloat16>(a_count, 0.05f, 1);
    auto* b = device_fill<__nv_bfloat16>(b_count, 0.05f, 2);
    auto* acc0 = device_fill<float>(c_count, 0.01f, 3);  // the starting accumulator
    float* acc = nullptr;
    __nv_bfloat16* out16 = nullptr;
    CHECK_CUDA(cudaMalloc(&acc, c_count * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&out16, c_count * sizeof(__nv_bfloat16)));
    const Descs d32 = describe(c, CUDA_R_32F), d16 = describe(c, CUDA_R_16BF);
    const float one = 1.0f, zero = 0.0f;

    auto heuristics = [&](const Descs& d) {
      std::vector<cublasLtMatmulHeuristicResult_t> r(16);
      int count = 0;
      CHECK_LT(cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, pref,
                                              static_cast<int>(r.size()), r.data(), &count));
      r.resize(count);
      return r;
    };
    auto run = [&](const Descs& d, const cublasLtMatmulAlgo_t& algo, const float* beta, void* cd) {
      return cublasLtMatmul(handle, d.op, &one, b, d.a, a, d.b, beta, cd, d.c, cd, d.c, &algo, ws,
                            ws_bytes, nullptr);
    };
    // beta = 0 references: what the product costs when C is only written.
    const auto h32 = heuristics(d32), h16 = heuristics(d16);
    const float t_write32 = time_ms([&] { run(d32, h32.at(0).algo, &zero, acc); });
    const float t_write16 = time_ms([&] { run(d16, h16.at(0).algo, &zero, out16); });
    std::printf(
        "\n## %s\n\nM %lld, N %lld, K %lld. beta = 0: fp32 out %.3f ms, bf16 out %.3f ms.\n\n",
        c.name, static_cast<long long>(c.m), static_cast<long long>(c.n),
        static_cast<long long>(c.k), t_write32, t_write16);
    std::printf(
        "| # | algo id | tile id | stages id | split-k | swizzle | cluster id | accumulate ms "
        "| x fp32 beta = 0 | max |diff| vs #0 |\n|---|---|---|---|---|---|---|---|---|---|\n");
    // Every kSample-th element is compared (the accumulators reach 2.4 GB).
    constexpr size_t kSample = 97;
    const size_t sampled = c_count / kSample;
    std::vector<float> first, got(sampled);
    for (size_t i = 0; i < h32.size(); ++i) {
      const cublasLtMatmulAlgo_t& algo = h32[i].algo;
      // Correctness from the same starting accumulator, then timing (which keeps adding).
      CHECK_CUDA(cudaMemcpy(acc, acc0, c_count * sizeof(float), cudaMemcpyDeviceToDevice));
      if (run(d32, algo, &one, acc) != CUBLAS_STATUS_SUCCESS) {
        std::printf("| %zu | (failed to run) |\n", i);
        continue;
      }
      CHECK_CUDA(cudaMemcpy2D(got.data(), sizeof(float), acc, kSample * sizeof(float),
                              sizeof(float), sampled, cudaMemcpyDeviceToHost));
      double diff = 0.0;
      if (first.empty()) {
        first = got;
      } else {
        for (size_t j = 0; j < sampled; ++j) {
          diff = std::max(diff, static_cast<double>(std::fabs(got[j] - first[j])));
        }
      }
      const float t = time_ms([&] { run(d32, algo, &one, acc); });
      std::printf("| %zu | %d | %d | %d | %d | %d | %d | %.3f | %.2f | %.2e |\n", i,
                  config(algo, CUBLASLT_ALGO_CONFIG_ID), config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                  config(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                  config(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                  config(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                  config(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), t, t / t_write32, diff);
    }
    destroy(d32);
    destroy(d16);
    for (void* p : {static_cast<void*>(a), static_cast<void*>(b), static_cast<void*>(acc0),
                    static_cast<void*>(acc), static_cast<void*>(out16)}) {
      CHECK_CUDA(cudaFree(p));
    }
  }
  cublasLtMatmulPreferenceDestroy(pref);
  CHECK_CUDA(cudaFree(ws));
  cublasLtDestroy(handle);
  return 0;
}
