// The primitives a backend provides. The strategies (csrc/core/driver.cpp) are written once in
// terms of these, so the CPU and CUDA paths walk the same chunks in the same order and the CPU
// tests exercise the same control flow the GPU runs.
//
// All pointers are in the backend's memory; calls are asynchronous on the backend's stream (CUDA)
// or synchronous (CPU). Matrices are row-major with a leading dimension in elements.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flce/flce.h"
#include "row_math.h"

namespace flce::detail {

// C[m, n] = alpha * op(A) op(B) + beta * C, with op(A) [m, k] and op(B) [k, n]. A stored [m, k]
// (or [k, m] when trans_a), B stored [k, n] (or [n, k] when trans_b). Accumulation is fp32.
struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  DType a_type = DType::kFloat32;
  bool trans_a = false;
  const void* b = nullptr;
  int64_t ldb = 0;
  DType b_type = DType::kFloat32;
  bool trans_b = false;
  void* c = nullptr;
  int64_t ldc = 0;
  DType c_type = DType::kFloat32;
  float alpha = 1.0f;
  float beta = 0.0f;
  // Both or neither: alpha and beta read from these floats in the backend's memory when the GEMM
  // runs, in place of the two above, so that a factor the device computed (the mean's
  // 1 / denominator) needs no host synchronization. Not with k = 0.
  const float* device_alpha = nullptr;
  const float* device_beta = nullptr;
  // A hint that this shape repeats often enough to be worth timing the backend's candidate
  // algorithms on its first calls (grad-in-forward's dW accumulation, once per token chunk).
  bool measure_algorithm = false;
};

// Counts valid rows, sums class weights and checks labels; fills scalars[kNumScalars].
struct PrepareArgs {
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;
  int64_t num_tokens = 0;
  int64_t vocab_size = 0;
  int64_t ignore_index = -100;
  float* scalars = nullptr;  // [kNumScalars]
};

// Columns summarized by one partial RowState of Backend::logits_stats (the fused statistics
// GEMM's tile width).
constexpr int64_t kPartialStatsCols = 256;

// Rows of a logits block: statistics, loss, LSE, metrics and optionally the gradient with
// respect to the raw logits. A block spans all V columns, or (without a gradient) columns
// [col_offset, col_offset + cols) of rows whose statistics are merged through `carry`: the
// block at col_offset 0 starts a row, the block that ends at V finishes it.
struct RowForwardArgs {
  const void* logits = nullptr;  // [rows, cols] logits_type (raw: bias not yet added)
  int64_t ld = 0;
  DType logits_type = DType::kFloat32;
  int64_t rows = 0;
  int64_t vocab_size = 0;
  int64_t cols = 0;  // 0 means vocab_size
  int64_t col_offset = 0;
  RowCarry* carry = nullptr;   // [N], required when cols < vocab_size
  int64_t row_offset = 0;      // global index of row 0 (labels and per-row outputs are global)
  const void* bias = nullptr;  // [V] bias_type or null
  DType bias_type = DType::kFloat32;
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;
  LossOptions options;
  const float* scalars = nullptr;  // from prepare

  float* row_loss = nullptr;     // [N]: loss_i (0 at ignored rows)
  float* lse = nullptr;          // [N]
  float* row_metrics = nullptr;  // [N, kNumRowMetrics] or null

  // Gradient (optional): dZ for upstream gradients grad_loss ([1]/[N], null = 1, divided by the
  // mean's denominator here) and grad_lse ([N] or null). dz may alias logits: a backend must read
  // each element before it writes the element it overlaps.
  void* dz = nullptr;
  int64_t ldz = 0;
  DType dz_type = DType::kFloat32;
  const float* grad_loss = nullptr;
  const float* grad_lse = nullptr;

  // Per-tile statistics instead of logits (a backend's fused logits GEMM, no gradient): row r's
  // statistics over columns [t * T, (t + 1) * T) of the block are partials[r * partials_ld + t]
  // (T = kPartialStatsCols), and target_z[r] is the transformed logit of its label
  // when the label falls in the block. logits_stats writes both; rows_forward reads them when
  // `partials` is set, in place of `logits`.
  RowState* partials = nullptr;
  int64_t partials_ld = 0;
  float* target_z = nullptr;
  // With partials, for a forward that also computes gradients (grad-in-forward with compact
  // blocks): logits_stats also stores e = exp(z - m) of every element in fp16, m being the max of
  // its row over its tile (that tile's partial), at tile_exp[r * tile_exp_ld + c]. RowGradArgs'
  // tile_exp turns it into dZ once the row's LSE is known: 2 bytes per logit instead of 4.
  void* tile_exp = nullptr;
  int64_t tile_exp_ld = 0;
  // With tile_exp, row-shifted terms (Plan::shifted_terms): row r's terms are stored as
  // exp(z - row_shift[r]) in every tile where tile_takes_row_shift(tile max, row_shift[r]) holds,
  // else under the tile's max as above (-inf: always the tile's max), and in the input dtype
  // instead of fp16 (the dx GEMM reads them with W as it is). rows_forward then also writes each
  // row's max to row_max[r] when it is set.
  const float* row_shift = nullptr;
  float* row_max = nullptr;
};

// Element-wise gradient of a [rows, cols] block of raw logits whose LSE is already known
// (recompute backward). Same gradient formula as RowForwardArgs.
struct RowGradArgs {
  const float* logits = nullptr;  // [rows, cols] raw, fp32
  int64_t ld = 0;
  int64_t rows = 0, cols = 0;
  int64_t row_offset = 0, col_offset = 0;
  int64_t vocab_size = 0;
  const void* bias = nullptr;
  DType bias_type = DType::kFloat32;
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;
  LossOptions options;
  const float* scalars = nullptr;
  const float* lse = nullptr;        // [N]
  const float* grad_loss = nullptr;  // [1] or [N]
  const float* grad_lse = nullptr;   // [N] or null
  void* dz = nullptr;                // may alias logits (same rule as above)
  int64_t ldz = 0;
  DType dz_type = DType::kFloat32;
  // Instead of logits: the fp16 e = exp(z - m) a fused statistics GEMM stored (RowForwardArgs::
  // tile_exp), with its partials (m = partials[r * partials_ld + c / kPartialStatsCols].max), so
  // p = e exp(m - lse). dz may alias tile_exp. Only without bias, soft-cap or class weights.
  const void* tile_exp = nullptr;
  int64_t tile_exp_ld = 0;
  const RowState* partials = nullptr;
  int64_t partials_ld = 0;
  // With tile_exp: the labels' logits from the GEMM (RowForwardArgs::target_z, or null). The
  // label's dZ is then computed from them: p - 1 cancels where p is large, and would multiply
  // the fp16 term's rounding.
  const float* target_z = nullptr;
};

// acc[c] (+)= sum_r block[r, c] (the bias gradient).
struct ColumnSumArgs {
  const void* block = nullptr;
  int64_t ld = 0;
  DType type = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  float* acc = nullptr;  // [cols] fp32
  bool accumulate = false;
};

// The operands of a fused logits GEMM: the block x[rows, D] W[cols, D]^T is computed tile by tile
// and handed to the row math in the GEMM's epilogue, never stored. x and W start at the block.
struct LogitsOperands {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* weight = nullptr;
  int64_t ldw = 0;
  DType dtype = DType::kBFloat16;
  int64_t rows = 0, cols = 0, hidden = 0;
};

// The row shifts of a block of row-shifted terms (Plan::shifted_terms): shift[r] = logit_scale *
// x_r . W[label_r] + kShiftAboveLabel, or -inf where the label is ignored or out of range (its
// tiles then take their own max).
struct LabelShiftArgs {
  const void* x = nullptr;  // [rows, hidden] at row row_offset, pitch ldx
  int64_t ldx = 0;
  const void* weight = nullptr;  // [vocab_size, hidden]
  DType dtype = DType::kBFloat16;
  int64_t rows = 0, hidden = 0, vocab_size = 0;
  int64_t row_offset = 0;  // global index of row 0 (for labels)
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  int64_t ignore_index = -100;
  float logit_scale = 1.0f;
  float* shift = nullptr;  // [rows]
};

// Turns a block of row-shifted terms (RowForwardArgs::row_shift) into what the dx and dW GEMMs
// read, once the rows' LSE is known: per row (ShiftedRow), row_factor[r] = its factor, x_scaled =
// factor * x_r, and the terms in place: the label's term for kept rows, every term for rewritten
// rows. The terms (grad.dz_type) and x_scaled are in x's dtype. grad (a RowGradArgs of the block:
// labels, options, scalars, lse, tile_exp and partials) gives each row's coefficients for an
// upstream gradient of 1, which the caller applies.
struct ShiftedRowsArgs {
  RowGradArgs grad;
  const float* shift = nullptr;     // [rows]
  const float* row_max = nullptr;   // [rows]
  const float* target_z = nullptr;  // [rows]: the label's logit from the GEMM
  const void* x = nullptr;          // the block's x [rows, hidden], pitch ldx
  int64_t ldx = 0;
  DType x_type = DType::kBFloat16;
  int64_t hidden = 0;
  float* row_factor = nullptr;  // [rows]
  void* x_scaled = nullptr;     // x_type [rows, hidden], pitch hidden
  // Scratch for the backend: the rows to rewrite and their count.
  int32_t* rewrite_rows = nullptr;   // [rows]
  int32_t* rewrite_count = nullptr;  // [1]
};

// dst[r, c] = src[r, c] * (row_factor[r] * factor[0]) in dst_type, for r < rows, c < cols (a null
// factor counts as 1): conversions between fp32, bf16 and fp16 with optional device-side scaling.
struct CastArgs {
  const void* src = nullptr;
  int64_t ld_src = 0;
  DType src_type = DType::kFloat32;
  void* dst = nullptr;
  int64_t ld_dst = 0;
  DType dst_type = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const float* row_factor = nullptr;  // [rows] or null
  const float* factor = nullptr;      // [1] or null
};

// Reduces per-row losses and metrics into the outputs.
struct FinalizeArgs {
  const float* row_loss = nullptr;     // [N]
  const float* lse = nullptr;          // [N]
  const float* row_metrics = nullptr;  // [N, kNumRowMetrics] or null
  const float* scalars = nullptr;
  int64_t num_tokens = 0;
  Reduction reduction = Reduction::kMean;
  float* loss = nullptr;     // [1] (mean / sum); for none the rows were written in place
  float* metrics = nullptr;  // [kNumMetrics] or null
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Status gemm(const GemmArgs& args) = 0;
  virtual Status prepare(const PrepareArgs& args) = 0;
  virtual Status rows_forward(const RowForwardArgs& args) = 0;
  virtual Status rows_grad(const RowGradArgs& args) = 0;
  virtual Status column_sum(const ColumnSumArgs& args) = 0;
  virtual Status finalize(const FinalizeArgs& args) = 0;
  // Conversions between fp32 and 16-bit (the fp32 accumulators into the outputs), with optional
  // per-row and device-side factors (CastArgs).
  virtual Status cast(const CastArgs& args) = 0;
  virtual Status fill_zero(void* ptr, size_t bytes) = 0;
  // data[i] *= *factor in place, `factor` read where the backend's data lives; nothing is read or
  // written when *factor == 1.
  virtual Status scale(void* data, DType type, int64_t count, const float* factor) = 0;

  // Fused logits GEMMs (optional: a backend without them keeps the defaults). The fused_*
  // queries say whether they can run these operands with these arguments; logits_stats fills
  // args.partials and args.target_z of a block (args.rows / cols / offsets as for rows_forward,
  // no gradient); logits_grad writes the block's dZ as rows_grad would from the stored logits
  // (args.logits is not read).
  virtual bool fused_stats(const LogitsOperands& /*op*/, const RowForwardArgs& /*args*/) const {
    return false;
  }
  virtual bool fused_grad(const LogitsOperands& /*op*/, const RowGradArgs& /*args*/) const {
    return false;
  }
  // Whether the fused dZ GEMM is expected to beat GEMM + rows_grad on a block of these operands
  // (FusedLogits::kAuto asks; kAlways does not).
  virtual bool fused_grad_pays(const LogitsOperands& /*op*/) const { return false; }
  virtual Status logits_stats(const LogitsOperands& op, const RowForwardArgs& args);
  virtual Status logits_grad(const LogitsOperands& op, const RowGradArgs& args);

  // Row-shifted terms (Plan::shifted_terms), which only a backend with fused statistics GEMMs
  // produces; the defaults fail.
  virtual Status label_shift(const LabelShiftArgs& args);
  virtual Status shifted_rows(const ShiftedRowsArgs& args);
};

// What the planner must know about a backend without constructing it.
struct BackendTraits {
  // Element type of the dZ blocks fed to the dx / dW GEMMs for a given input dtype.
  DType (*dz_type)(DType input) = nullptr;
  // Scratch a backend's gemm prefers (CPU: conversion panels for fp16 / bf16; CUDA: cuBLASLt's
  // workspace), carved from the workspace, and the least it can run with.
  size_t gemm_scratch_bytes = 0;
  size_t min_gemm_scratch_bytes = 0;
  // Whether the backend expects its fused logits GEMMs to serve the row math of `problem` on the
  // current device (the operands' alignment is only known at the call); null: never. The planner
  // then sizes compact blocks (Plan::compact_forward_blocks / compact_backward_blocks).
  bool (*fused_logits_expected)(const Problem& problem) = nullptr;
};

BackendTraits backend_traits(Device device);

}  // namespace flce::detail
