// Shared test machinery: random problems stored in any dtype, poisoned outputs, workspaces with
// canaries, one call of the public API (forward, then backward for the recompute strategy) and
// the comparison of everything it produced with the float64 reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "flce/flce.h"
#include "reference.h"

namespace flce::test {

// A host buffer of `count` elements of `type`; get/set go through double.
class TypedBuffer {
 public:
  TypedBuffer() = default;
  TypedBuffer(DType type, int64_t count);
  void* data() { return bytes_.empty() ? nullptr : bytes_.data(); }
  const void* data() const { return bytes_.empty() ? nullptr : bytes_.data(); }
  int64_t size() const { return count_; }
  DType type() const { return type_; }
  double get(int64_t i) const;
  void set(int64_t i, double v);  // rounds to the dtype (round-to-nearest-even)
  void poison();                  // every element NaN
  std::vector<double> to_double() const;

 private:
  DType type_ = DType::kFloat32;
  int64_t count_ = 0;
  std::vector<unsigned char> bytes_;
};

// A 256-byte aligned block of exactly `bytes`, filled with NaN bytes, followed by canary bytes
// that must survive the call.
class Workspace {
 public:
  explicit Workspace(size_t bytes);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* data() { return bytes_ == 0 ? nullptr : base_; }
  size_t bytes() const { return bytes_; }
  bool canary_intact() const;

 private:
  static constexpr size_t kCanary = 512;
  unsigned char* base_ = nullptr;
  size_t bytes_ = 0;
};

struct Case {
  int64_t n = 37, v = 101, d = 29;
  DType dtype = DType::kFloat32;
  LossOptions options;
  bool bias = false;
  bool class_weights = false;
  bool int32_labels = false;
  int64_t x_pad = 0;  // x row stride = d + x_pad; the padding holds NaN
  double ignore_fraction = 0.15;
  bool all_ignored = false;
  bool grad_x = true, grad_weight = true, grad_bias = false;
  bool grad_lse = false;  // backpropagate through the returned lse (recompute only)
  bool metrics = true;    // request the metrics (CUDA harness; kernels skip their sums without)
  double logit_std = 3.0;
  uint64_t seed = 1;
  std::string describe() const;
};

struct Inputs {
  RefProblem ref;  // the values actually stored (after rounding to the dtype)
  TypedBuffer x, weight, bias;
  int64_t x_stride = 0;
  std::vector<int64_t> labels64;
  std::vector<int32_t> labels32;
  std::vector<float> class_weight;
  RefUpstream up;  // for the recompute backward
  std::vector<float> grad_loss, grad_lse;
  const void* labels() const {
    return labels32.empty() ? static_cast<const void*>(labels64.data()) : labels32.data();
  }
  IndexType label_type() const { return labels32.empty() ? IndexType::kInt64 : IndexType::kInt32; }
};

Inputs make_inputs(const Case& c);
Problem make_problem(const Case& c);

struct Outputs {
  Plan plan;
  std::vector<float> loss, lse, metrics;
  TypedBuffer dx, dw, db;
  bool has_grads = false;
};

// A budget that every test shape fits with its fastest plans.
constexpr size_t kRoomyBudget = size_t(4) << 30;

// How a test chooses the plan: by the planner (strategy + budget) or a hand-made one whose
// workspace sizes are filled from the layout functions.
struct PlanChoice {
  Strategy strategy = Strategy::kAuto;
  size_t budget = kRoomyBudget;
  bool manual = false;
  Plan plan;  // when manual: strategy and chunk fields
};

// Runs forward (and backward for recompute), with exact-size workspaces guarded by canaries and
// NaN-poisoned outputs. Records gtest failures for bad statuses or canaries; returns false then.
bool run_fused(const Case& c, const Inputs& in, const PlanChoice& choice, Outputs* out);
// The inputs, sizes, dtype and options of a forward call of `c` (outputs, plan and workspace
// left to the caller).
ForwardParams forward_inputs(const Case& c, const Inputs& in);

struct Tolerance {
  double loss;  // relative, on loss, lse and metrics
  double grad;  // norm-wise relative on dx, dW, db
};
Tolerance tolerance_for(DType dtype);

// Checks every output against the reference: loss / lse / metrics and the gradients (for an
// upstream gradient of 1 when the forward produced them, else in.up).
void expect_matches_reference(const Case& c, const Inputs& in, const Outputs& out);

// Element-wise and norm-wise comparison of a whole tensor; every element must be finite.
void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& ref, double norm_rtol);

// Seeded random cases and hand-made plans for the fuzz tests (FusedFuzz on the CPU, CudaFuzz).
class Fuzz {
 public:
  explicit Fuzz(uint64_t seed) : rng_(seed) {}
  int64_t uniform(int64_t lo, int64_t hi);  // in [lo, hi]
  bool coin(double p);
  // Every option at random: bias (and its gradient), class weights, int32 labels, padded x rows,
  // label smoothing, z-loss, soft-cap, logit scale.
  void mix_options(Case* c);
  // Ignored labels (none, some or all) and reduction mean or sum.
  void mix_labels(Case* c);
  // A plan for c: either strategy, chunks from one row or column up to the whole problem, split
  // forward rows, both backward orders, compact blocks with probability compact_p. A recompute
  // plan may switch c to reduction none and a gradient through the LSE. Token-outer plans with
  // 16-bit dW keep to the planner's 2 token chunks: dW is rounded once per chunk, and partial
  // sums that cancel can then miss the tolerance at tiny D (3 chunks at D = 1 gave 7.6e-3
  // against 3.9e-3).
  Plan plan_for(Case* c, double compact_p);

 private:
  std::mt19937_64 rng_;
};

// The plan's strategy, chunks and flags in one line (for traces).
std::string describe_plan(const Plan& p);

}  // namespace flce::test
