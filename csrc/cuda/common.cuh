// Device helpers shared by the kernels: element types by DType, packed loads and stores, and the
// alignment tests that decide whether a kernel may use them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/row_math.h"
#include "cuda/cuda_check.h"
#include "flce/flce.h"

namespace flce::detail::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block

// Host-side dispatch of a kernel template on a run-time DType: f(TypeTag<T>{}) with T the CUDA
// element type.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
Status dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return Status::Error(StatusCode::kInvalidArgument,
                       "unsupported dtype code " + std::to_string(static_cast<int>(t)));
}

// Scalar conversions ------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Reads element i of a buffer whose type is only known at run time (bias, small inputs).
__device__ __forceinline__ float load_dynamic(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ int64_t load_label(const void* labels, IndexType t, int64_t i) {
  return t == IndexType::kInt32 ? static_cast<int64_t>(static_cast<const int32_t*>(labels)[i])
                                : static_cast<const int64_t*>(labels)[i];
}

// Packed 32-bit words <-> floats. Little-endian: element 0 lives in the low bits. Working on
// integer words keeps the vector paths free of type punning through pointers.

template <typename T>
struct Word;  // how many T fit in 32 bits, and how to (un)pack them

template <>
struct Word<float> {
  static constexpr int kPerWord = 1;
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w);
  }
  __device__ __forceinline__ static uint32_t pack(const float* in) {
    return __float_as_uint(in[0]);
  }
};

template <>
struct Word<__half> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  // One paired conversion instruction (in[0] in the low half, as memory order wants).
  __device__ __forceinline__ static uint32_t pack(const float* in) {
    const __half2 h = __floats2half2_rn(in[0], in[1]);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <>
struct Word<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  // bf16 is the high half of an fp32: widening is a shift.
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
  // One paired conversion instruction (in[0] in the low half, as memory order wants).
  __device__ __forceinline__ static uint32_t pack(const float* in) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(in[0], in[1]);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

// Loads N consecutive T at p as floats with the widest accesses N * sizeof(T) allows (16-byte
// pieces at most). p must be aligned to min(16, N * sizeof(T)) bytes: see is_aligned().
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kPer = Word<T>::kPerWord;
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[i];
      Word<T>::unpack(raw.x, out + (4 * i + 0) * kPer);
      Word<T>::unpack(raw.y, out + (4 * i + 1) * kPer);
      Word<T>::unpack(raw.z, out + (4 * i + 2) * kPer);
      Word<T>::unpack(raw.w, out + (4 * i + 3) * kPer);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    Word<T>::unpack(raw.x, out);
    Word<T>::unpack(raw.y, out + kPer);
  } else if constexpr (kBytes == 4) {
    Word<T>::unpack(*reinterpret_cast<const uint32_t*>(p), out);
  } else {
    static_assert(N == 1, "load_vec: unsupported width");
    out[0] = to_float(*p);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kPer = Word<T>::kPerWord;
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      uint4 raw;
      raw.x = Word<T>::pack(in + (4 * i + 0) * kPer);
      raw.y = Word<T>::pack(in + (4 * i + 1) * kPer);
      raw.z = Word<T>::pack(in + (4 * i + 2) * kPer);
      raw.w = Word<T>::pack(in + (4 * i + 3) * kPer);
      reinterpret_cast<uint4*>(p)[i] = raw;
    }
  } else if constexpr (kBytes == 8) {
    uint2 raw;
    raw.x = Word<T>::pack(in);
    raw.y = Word<T>::pack(in + kPer);
    *reinterpret_cast<uint2*>(p) = raw;
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<uint32_t*>(p) = Word<T>::pack(in);
  } else {
    static_assert(N == 1, "store_vec: unsupported width");
    *p = from_float<T>(in[0]);
  }
}

// The first n <= N of N consecutive elements, in one vector access when the kernel's variant
// allows it (kVectorized: p aligned as load_vec wants) and the group is whole, else one at a time
// (the end of a row, or an unaligned pitch).
template <typename T, int N, bool kVectorized>
__device__ __forceinline__ void load_group(const T* p, int n, float (&out)[N]) {
  if (kVectorized && n == N) {
    load_vec<T, N>(p, out);
  } else {
    // Constant indices (unrolled, guarded): out stays in registers, not local memory.
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) out[i] = to_float(p[i]);
    }
  }
}

template <typename T, int N, bool kVectorized>
__device__ __forceinline__ void store_group(T* p, int n, const float (&in)[N]) {
  if (kVectorized && n == N) {
    store_vec<T, N>(p, in);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < n) p[i] = from_float<T>(in[i]);
    }
  }
}

// Loads N elements of a buffer typed at run time (the bias): same alignment rule as load_vec.
template <int N>
__device__ __forceinline__ void load_vec_dynamic(const void* p, DType t, int64_t i,
                                                 float (&out)[N]) {
  switch (t) {
    case DType::kFloat16:
      load_vec<__half, N>(static_cast<const __half*>(p) + i, out);
      break;
    case DType::kBFloat16:
      load_vec<__nv_bfloat16, N>(static_cast<const __nv_bfloat16*>(p) + i, out);
      break;
    default:
      load_vec<float, N>(static_cast<const float*>(p) + i, out);
      break;
  }
}

// Host side: may a buffer be accessed in pieces of `bytes` (capped at 16, as load_vec does)?
inline bool is_aligned(const void* p, size_t bytes) {
  const size_t need = bytes < 16 ? bytes : 16;
  return reinterpret_cast<uintptr_t>(p) % need == 0;
}

// Warp-level reductions --------------------------------------------------------------------

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

// Block-wide reduction in a fixed order (deterministic run to run). blockDim.x must be a multiple
// of 32. The result is valid in thread 0 only. `smem` holds kMaxWarps values.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? smem[lane] : identity;
    v = warp_reduce(v, op);
  }
  return v;
}

}  // namespace flce::detail::cuda
