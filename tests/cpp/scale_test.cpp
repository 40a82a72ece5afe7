// scale_in_place: the rescaling of gradients computed in the forward, on the CPU and (when a
// device is present) on the GPU, against a double-precision product rounded once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_half.h"
#include "flce/flce.h"

#if defined(FLCE_WITH_CUDA) && FLCE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace flce::test {
namespace {

using detail::cpu::load_as_float;
using detail::cpu::store_from_float;

// Random values of `type` (never zero), stored as raw bytes.
std::vector<unsigned char> random_data(DType type, int64_t count, uint32_t seed) {
  std::vector<unsigned char> bytes(count * dtype_size(type));
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int64_t i = 0; i < count; ++i) {
    float v = dist(gen);
    if (v == 0.0f) v = 0.5f;
    store_from_float(bytes.data(), type, i, v);
  }
  return bytes;
}

// What every element must become: the stored value times the scale, rounded once to `type`.
std::vector<unsigned char> expected(const std::vector<unsigned char>& in, DType type, int64_t count,
                                    float scale) {
  std::vector<unsigned char> out(in);
  for (int64_t i = 0; i < count; ++i) {
    store_from_float(out.data(), type, i, load_as_float(in.data(), type, i) * scale);
  }
  return out;
}

struct ScaleCase {
  DType type;
  int64_t count;
  float scale;
};

std::vector<ScaleCase> scale_cases() {
  std::vector<ScaleCase> cases;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    // 1 (the skipped case), a plain factor, a negative one, 0; counts that are not multiples of
    // any vector width and one that spans several grid strides on a GPU.
    for (float s : {1.0f, 0.37f, -2.5f, 0.0f}) {
      for (int64_t n : {int64_t(1), int64_t(13), int64_t(4099), int64_t(5000003)}) {
        cases.push_back({t, n, s});
      }
    }
  }
  return cases;
}

std::string case_name(const ScaleCase& c) {
  return std::string(dtype_name(c.type)) + " n=" + std::to_string(c.count) +
         " scale=" + std::to_string(c.scale);
}

TEST(Scale, CpuMatchesOneRounding) {
  for (const ScaleCase& c : scale_cases()) {
    std::vector<unsigned char> data = random_data(c.type, c.count, 7);
    const std::vector<unsigned char> want = expected(data, c.type, c.count, c.scale);
    ScaleParams p;
    p.data = data.data();
    p.dtype = c.type;
    p.count = c.count;
    p.scale = &c.scale;
    ASSERT_TRUE(scale_in_place(Device::kCpu, p).ok()) << case_name(c);
    EXPECT_EQ(std::memcmp(data.data(), want.data(), data.size()), 0) << case_name(c);
  }
}

TEST(Scale, BadArguments) {
  float data[4] = {1, 2, 3, 4};
  const float s = 2.0f;
  ScaleParams p;
  p.data = data;
  p.count = 4;
  p.scale = nullptr;
  Status st = scale_in_place(Device::kCpu, p);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message.find("scale"), std::string::npos) << st.message;
  p.scale = &s;
  p.data = nullptr;
  st = scale_in_place(Device::kCpu, p);
  EXPECT_NE(st.message.find("data"), std::string::npos) << st.message;
  p.data = data;
  p.count = -1;
  st = scale_in_place(Device::kCpu, p);
  EXPECT_NE(st.message.find("count"), std::string::npos) << st.message;
  p.count = 0;  // nothing to do, nothing touched
  EXPECT_TRUE(scale_in_place(Device::kCpu, p).ok());
  EXPECT_EQ(data[0], 1.0f);
}

#if defined(FLCE_WITH_CUDA) && FLCE_WITH_CUDA
TEST(CudaScale, MatchesOneRounding) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no device";
  for (const ScaleCase& c : scale_cases()) {
    std::vector<unsigned char> host = random_data(c.type, c.count, 11);
    const std::vector<unsigned char> want = expected(host, c.type, c.count, c.scale);
    // Offset by one element so that the unaligned (scalar) path runs too.
    for (int64_t offset : {int64_t(0), int64_t(1)}) {
      const size_t esize = dtype_size(c.type);
      unsigned char* dev = nullptr;
      float* dscale = nullptr;
      ASSERT_EQ(cudaMalloc(&dev, host.size() + esize), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&dscale, sizeof(float)), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dev + offset * esize, host.data(), host.size(), cudaMemcpyHostToDevice),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dscale, &c.scale, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
      ScaleParams p;
      p.data = dev + offset * esize;
      p.dtype = c.type;
      p.count = c.count;
      p.scale = dscale;
      ASSERT_TRUE(scale_in_place(Device::kCuda, p).ok()) << case_name(c);
      std::vector<unsigned char> got(host.size());
      ASSERT_EQ(cudaMemcpy(got.data(), dev + offset * esize, got.size(), cudaMemcpyDeviceToHost),
                cudaSuccess);
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size()), 0)
          << case_name(c) << " offset " << offset;
      cudaFree(dev);
      cudaFree(dscale);
    }
  }
}
#endif

}  // namespace
}  // namespace flce::test
