#include "cpu/cpu_gemm.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/cpu_half.h"

#if FLCE_WITH_BLAS
#include <cblas.h>
#endif

namespace flce::detail::cpu {
namespace {

// Conversion of a few thousand elements is not worth waking the thread team.
constexpr int64_t kParallelElements = int64_t(1) << 15;

// C[m, n] = beta * C, where beta = 0 writes zeros whatever C held.
void scale_c(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  if (beta == 1.0f) return;
#pragma omp parallel for schedule(static) if (m * n > kParallelElements)
  for (int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(row, row + n, 0.0f);
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

#if !FLCE_WITH_BLAS
// Portable fallback: B is packed per [kBlockK, kBlockN] block so the inner loop is a contiguous
// axpy the compiler vectorizes; rows of C are split across threads. Slow next to a BLAS, but it
// gives the same results (fp32 accumulation) on machines without one.
constexpr int64_t kFallbackBlockN = 256;
constexpr int64_t kFallbackBlockK = 256;

void sgemm_portable(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  std::vector<float> packed(kFallbackBlockK * kFallbackBlockN);
  for (int64_t n0 = 0; n0 < n; n0 += kFallbackBlockN) {
    const int64_t bn = std::min(kFallbackBlockN, n - n0);
    for (int64_t k0 = 0; k0 < k; k0 += kFallbackBlockK) {
      const int64_t bk = std::min(kFallbackBlockK, k - k0);
      for (int64_t p = 0; p < bk; ++p) {
        for (int64_t j = 0; j < bn; ++j) {
          packed[p * bn + j] = tb ? b[(n0 + j) * ldb + k0 + p] : b[(k0 + p) * ldb + n0 + j];
        }
      }
      const float* bp = packed.data();
#pragma omp parallel for schedule(static) if (m * bn * bk > kParallelElements)
      for (int64_t i = 0; i < m; ++i) {
        float acc[kFallbackBlockN] = {};
        for (int64_t p = 0; p < bk; ++p) {
          const float av = ta ? a[(k0 + p) * lda + i] : a[i * lda + k0 + p];
          const float* brow = bp + p * bn;
          for (int64_t j = 0; j < bn; ++j) acc[j] += av * brow[j];
        }
        float* crow = c + i * ldc + n0;
        for (int64_t j = 0; j < bn; ++j) crow[j] += alpha * acc[j];
      }
    }
  }
}
#endif

// dst[r, c] = float(src[row0 + r, col0 + c]) for a rows x cols block of a matrix with leading
// dimension ld; dst is dense (leading dimension cols).
void convert_block(const void* src, DType type, int64_t ld, int64_t row0, int64_t col0,
                   int64_t rows, int64_t cols, float* dst) {
  const size_t esize = dtype_size(type);
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = static_cast<const char*>(src) + ((row0 + r) * ld + col0) * esize;
    to_float(s, type, dst + r * cols, cols);
  }
}

const float* f32_at(const void* base, int64_t ld, int64_t row, int64_t col) {
  return static_cast<const float*>(base) + row * ld + col;
}

}  // namespace

Status sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc) {
  if (m <= 0 || n <= 0) return Status::Ok();
  if (k <= 0 || alpha == 0.0f) {
    scale_c(m, n, beta, c, ldc);
    return Status::Ok();
  }
#if FLCE_WITH_BLAS
  // CBLAS takes 32-bit sizes.
  for (int64_t v : {m, n, k, lda, ldb, ldc}) {
    if (v > INT_MAX) {
      return Status::Error(StatusCode::kBackendError, "CPU GEMM dimension " + std::to_string(v) +
                                                          " exceeds the 32-bit range of CBLAS");
    }
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
#else
  scale_c(m, n, beta, c, ldc);
  sgemm_portable(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc);
#endif
  return Status::Ok();
}

Status gemm(const GemmArgs& args, void* scratch) {
  if ((args.device_alpha == nullptr) != (args.device_beta == nullptr)) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "gemm: device_alpha and device_beta must be given together");
  }
  // The backend's memory is the host's: the device scalars are read here, when the GEMM runs.
  GemmArgs g = args;
  if (g.device_alpha != nullptr) {
    g.alpha = *g.device_alpha;
    g.beta = *g.device_beta;
  }
  const bool a32 = g.a_type == DType::kFloat32;
  const bool b32 = g.b_type == DType::kFloat32;
  const bool c32 = g.c_type == DType::kFloat32;
  if (a32 && b32 && c32) {
    return sgemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, static_cast<const float*>(g.a),
                 g.lda, static_cast<const float*>(g.b), g.ldb, g.beta, static_cast<float*>(g.c),
                 g.ldc);
  }
  if (g.m <= 0 || g.n <= 0) return Status::Ok();
  if (scratch == nullptr) {
    return Status::Error(StatusCode::kBackendError,
                         "CPU GEMM on float16 / bfloat16 data needs the gemm scratch panels");
  }
  float* panel_a = static_cast<float*>(scratch);
  float* panel_b = panel_a + kGemmBlockM * kGemmBlockK;
  float* panel_c = panel_b + kGemmBlockK * kGemmBlockN;

  // Operand blocks are taken in their stored layout, so the transpose flags pass through; fp32
  // operands are used in place, others converted into their panel.
  auto a_block = [&](int64_t m0, int64_t bm, int64_t k0, int64_t bk, int64_t* ld) {
    if (a32) {
      *ld = g.lda;
      return g.trans_a ? f32_at(g.a, g.lda, k0, m0) : f32_at(g.a, g.lda, m0, k0);
    }
    if (g.trans_a) {
      convert_block(g.a, g.a_type, g.lda, k0, m0, bk, bm, panel_a);
      *ld = bm;
    } else {
      convert_block(g.a, g.a_type, g.lda, m0, k0, bm, bk, panel_a);
      *ld = bk;
    }
    return static_cast<const float*>(panel_a);
  };
  auto b_block = [&](int64_t n0, int64_t bn, int64_t k0, int64_t bk, int64_t* ld) {
    if (b32) {
      *ld = g.ldb;
      return g.trans_b ? f32_at(g.b, g.ldb, n0, k0) : f32_at(g.b, g.ldb, k0, n0);
    }
    if (g.trans_b) {
      convert_block(g.b, g.b_type, g.ldb, n0, k0, bn, bk, panel_b);
      *ld = bk;
    } else {
      convert_block(g.b, g.b_type, g.ldb, k0, n0, bk, bn, panel_b);
      *ld = bn;
    }
    return static_cast<const float*>(panel_b);
  };

  if (c32) {
    // C accumulates in place (beta on the first k block, then 1), so the k loop can sit outside
    // the n loop and each A panel is converted once instead of once per n block.
    float* c = static_cast<float*>(g.c);
    if (g.k <= 0) {
      scale_c(g.m, g.n, g.beta, c, g.ldc);
      return Status::Ok();
    }
    for (int64_t m0 = 0; m0 < g.m; m0 += kGemmBlockM) {
      const int64_t bm = std::min(kGemmBlockM, g.m - m0);
      for (int64_t k0 = 0; k0 < g.k; k0 += kGemmBlockK) {
        const int64_t bk = std::min(kGemmBlockK, g.k - k0);
        int64_t lda;
        const float* ablk = a_block(m0, bm, k0, bk, &lda);
        for (int64_t n0 = 0; n0 < g.n; n0 += kGemmBlockN) {
          const int64_t bn = std::min(kGemmBlockN, g.n - n0);
          int64_t ldb;
          const float* bblk = b_block(n0, bn, k0, bk, &ldb);
          Status s = sgemm(g.trans_a, g.trans_b, bm, bn, bk, g.alpha, ablk, lda, bblk, ldb,
                           k0 > 0 ? 1.0f : g.beta, c + m0 * g.ldc + n0, g.ldc);
          if (!s.ok()) return s;
        }
      }
    }
    return Status::Ok();
  }

  // Any other C: the product of one [bm, bn] tile is summed over k in the fp32 C panel, then
  // combined with beta * C once.
  const size_t esize = dtype_size(g.c_type);
  for (int64_t m0 = 0; m0 < g.m; m0 += kGemmBlockM) {
    const int64_t bm = std::min(kGemmBlockM, g.m - m0);
    for (int64_t n0 = 0; n0 < g.n; n0 += kGemmBlockN) {
      const int64_t bn = std::min(kGemmBlockN, g.n - n0);
      if (g.k <= 0) std::fill(panel_c, panel_c + bm * bn, 0.0f);
      for (int64_t k0 = 0; k0 < g.k; k0 += kGemmBlockK) {
        const int64_t bk = std::min(kGemmBlockK, g.k - k0);
        int64_t lda, ldb;
        const float* ablk = a_block(m0, bm, k0, bk, &lda);
        const float* bblk = b_block(n0, bn, k0, bk, &ldb);
        Status s = sgemm(g.trans_a, g.trans_b, bm, bn, bk, g.alpha, ablk, lda, bblk, ldb,
                         k0 > 0 ? 1.0f : 0.0f, panel_c, bn);
        if (!s.ok()) return s;
      }
#pragma omp parallel for schedule(static) if (bm * bn > kParallelElements)
      for (int64_t i = 0; i < bm; ++i) {
        void* crow = static_cast<char*>(g.c) + ((m0 + i) * g.ldc + n0) * esize;
        const float* prow = panel_c + i * bn;
        for (int64_t j = 0; j < bn; ++j) {
          float v = prow[j];
          if (g.beta != 0.0f) v += g.beta * load_as_float(crow, g.c_type, j);
          store_from_float(crow, g.c_type, j, v);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace flce::detail::cpu
