// Where each buffer of a call lives inside the caller's workspace. The planner sizes plans with
// these functions and the driver carves the workspace with the same ones, so the bytes a plan
// reports are exactly the bytes a call touches.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "backend.h"
#include "flce/flce.h"

namespace flce::detail {

constexpr size_t kWorkspaceAlignment = 256;

// Offsets in bytes from the workspace base; kAbsent marks a buffer this call does not need.
constexpr size_t kAbsent = ~size_t(0);

struct ForwardLayout {
  size_t scalars = kAbsent;      // float[kNumScalars]
  size_t row_loss = kAbsent;     // float[N] (mean / sum; none writes the output directly)
  size_t lse = kAbsent;          // float[N] (when the caller passed no lse output)
  size_t row_metrics = kAbsent;  // float[N, kNumRowMetrics]
  size_t logits = kAbsent;       // float[forward_token_chunk, forward columns], or compact:
                                 // forward_block_bytes
  size_t row_carry = kAbsent;    // RowCarry[N] (when blocks split rows, or compact blocks)
  size_t dz_group = kAbsent;     // dz_type[dw_group_tokens, compact_ld(V)] (when the group spans
                              // chunks; with compact blocks the fused GEMM stores the terms here)
  size_t dw_accum = kAbsent;  // float[V - dw_accumulator_borrowed_rows(V), D]
  size_t db_accum = kAbsent;  // float[V]
  size_t shifted = kAbsent;   // ShiftedLayout (shifted_terms)
  size_t gemm_scratch = kAbsent;
  size_t total = 0;
};

// The buffers of row-shifted terms, as offsets from their region's start: those of one token
// chunk (`rows` = forward_token_chunk), and factor * x of every row of a dW group (`group_rows`:
// the chunk when dZ is in place, all tokens when one group covers them).
struct ShiftedLayout {
  size_t shift = kAbsent;          // float[rows]
  size_t row_max = kAbsent;        // float[rows]
  size_t row_factor = kAbsent;     // float[rows]
  size_t x_scaled = kAbsent;       // dtype[group_rows, D]: factor * x, for dW
  size_t dx = kAbsent;             // float[rows, D]: the dx GEMM's output before its row factors
  size_t rewrite_rows = kAbsent;   // int32[rows]: ShiftedRowsArgs::rewrite_rows
  size_t rewrite_count = kAbsent;  // int32[1]
  size_t total = 0;
};
ShiftedLayout shifted_layout(int64_t rows, int64_t group_rows, int64_t hidden, DType dtype,
                             bool grad_x);

struct BackwardLayout {
  size_t scalars = kAbsent;
  size_t logits = kAbsent;    // float[backward_token_chunk, backward_vocab_chunk], or with
                              // compact blocks dz_type[backward_token_chunk, compact_ld(chunk)]
  size_t dz_vocab = kAbsent;  // dz_type[N, compact_ld(backward_vocab_chunk)] (when token
                              // blocks < N)
  size_t dx_accum = kAbsent;  // float[N or backward_token_chunk (token-outer), D], or half
                              // those rows when it borrows dx (dx_accumulator_borrows_dx), when
                              // the vocabulary takes several chunks
  size_t db_accum = kAbsent;  // float[backward_vocab_chunk] (vocabulary-outer) or float[V]
  size_t gemm_scratch = kAbsent;
  size_t total = 0;
};

ForwardLayout forward_layout(const Problem& problem, const Plan& plan, const BackendTraits& traits);
BackwardLayout backward_layout(const Problem& problem, const Plan& plan,
                               const BackendTraits& traits);

// The parts of a plan that decide the layout, shared by the layout and the driver.
inline bool dz_in_place(const Plan& plan) {
  return plan.dw_group_tokens <= plan.forward_token_chunk;
}
// Columns of a forward logits block.
inline int64_t forward_cols(const Problem& p, const Plan& plan) {
  return plan.forward_vocab_chunk > 0 && plan.forward_vocab_chunk < p.vocab_size
             ? plan.forward_vocab_chunk
             : p.vocab_size;
}
inline bool grads_in_forward(const Problem& p, const Plan& plan) {
  return plan.strategy == Strategy::kGradInForward &&
         (p.needs_grad_x || p.needs_grad_weight || p.needs_grad_bias);
}
// Compact forward blocks apply to statistics-only forwards.
inline bool compact_forward(const Problem& p, const Plan& plan) {
  return plan.compact_forward_blocks && !grads_in_forward(p, plan);
}
// Grad-in-forward with compact blocks: whole rows of fp16 terms exp(z - tile max) (dZ overwrites
// them in place, or goes to the dZ store) and their partial statistics.
inline bool compact_gif(const Problem& p, const Plan& plan) {
  return plan.compact_forward_blocks && grads_in_forward(p, plan);
}
// Bytes of the forward's logits block: fp32 logits, or with compact blocks one partial RowState
// per row and kPartialStatsCols columns plus the label's logit per row.
size_t forward_block_bytes(const Problem& p, const Plan& plan);
inline bool token_outer(const Plan& plan) {
  return plan.backward_order == BackwardOrder::kTokenOuter;
}
inline size_t gemm_scratch_bytes(const Plan& plan, const BackendTraits& traits) {
  return plan.gemm_scratch_bytes > 0 ? plan.gemm_scratch_bytes : traits.gemm_scratch_bytes;
}
inline bool needs_dw_accumulator(const Problem& p, const Plan& plan) {
  return p.needs_grad_weight && plan.dw_group_tokens < p.num_tokens && p.dtype != DType::kFloat32;
}
// Rows of that fp32 accumulator [V, D] that live in grad_weight's own bytes, which hold nothing
// until the accumulator is converted into them: as many as V * D * 2 bytes hold, rounded down to
// 128 rows so that both parts and the operands that feed them stay 256-byte aligned. The
// workspace holds the others, so the accumulator costs V * D * 2 bytes beyond the gradients
// instead of V * D * 4.
inline int64_t dw_accumulator_borrowed_rows(int64_t vocab_size) {
  return vocab_size / 2 / 128 * 128;
}
// Grad-in-forward compact blocks run with row-shifted terms (Plan::shifted_terms) for 16-bit
// inputs, whether dW accumulates in fp32 or one group of terms covers every token.
inline bool shifted_terms(const Problem& p, const Plan& plan) {
  return plan.shifted_terms && compact_gif(p, plan) && p.dtype != DType::kFloat32;
}
// Rows of factor * x a plan of row-shifted terms keeps: those of its dW group.
inline int64_t shifted_group_rows(const Plan& plan) {
  return dz_in_place(plan) ? plan.forward_token_chunk : plan.dw_group_tokens;
}
// Compact backward blocks (Plan::compact_backward_blocks) store dZ rows at a pitch of a multiple
// of 8 elements: the fused GEMM stores 16 bytes at a time.
inline int64_t compact_ld(int64_t cols) { return (cols + 7) / 8 * 8; }
// Bytes of one fp16 term exp(z - tile max) of a grad-in-forward compact block.
constexpr size_t kExpBytes = 2;
// The vocabulary chunk the backward runs with when compact blocks cannot be fused: half as wide,
// so that its fp32 block fits the compact block's bytes.
inline int64_t fallback_vocab_chunk(const Plan& plan) {
  return std::max<int64_t>(1, plan.backward_vocab_chunk / 2);
}
// The narrowest vocabulary chunk a backward of this plan may run with.
inline int64_t narrowest_vocab_chunk(const Plan& plan) {
  return plan.compact_backward_blocks ? fallback_vocab_chunk(plan) : plan.backward_vocab_chunk;
}
inline bool needs_dx_accumulator(const Problem& p, const Plan& plan) {
  return p.needs_grad_x && narrowest_vocab_chunk(plan) < p.vocab_size && p.dtype != DType::kFloat32;
}
// Whether that fp32 accumulator borrows the end of dx itself: rows >= t0 of the 16-bit dx hold
// nothing yet while token chunk t0 accumulates, and the chunk's own output rows alone hold half its
// fp32 rows, so the workspace keeps only the other half (dx_accumulator_workspace_rows). D % 8
// keeps every borrowed row 16-byte aligned for the GEMMs (given a 16-byte aligned dx).
inline bool dx_accumulator_borrows_dx(const Problem& p, const Plan& plan) {
  return needs_dx_accumulator(p, plan) && p.hidden_size % 8 == 0;
}
// Rows of a `rows`-row fp32 accumulator that live in the workspace.
inline int64_t dx_accumulator_workspace_rows(const Problem& p, const Plan& plan, int64_t rows) {
  return dx_accumulator_borrows_dx(p, plan) ? (rows + 1) / 2 : rows;
}

}  // namespace flce::detail
