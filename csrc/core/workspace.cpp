#include "workspace.h"

#include <algorithm>

#include "row_math.h"

namespace flce::detail {
namespace {

// Hands out aligned offsets in order.
class Carver {
 public:
  size_t take(size_t bytes) {
    const size_t at = (used_ + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
    used_ = at + bytes;
    return at;
  }
  size_t total() const {
    return (used_ + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  }

 private:
  size_t used_ = 0;
};

size_t f32(int64_t count) { return static_cast<size_t>(count) * sizeof(float); }

}  // namespace

size_t forward_block_bytes(const Problem& p, const Plan& plan) {
  const int64_t rows = plan.forward_token_chunk, cols = forward_cols(p, plan);
  const int64_t partials = (cols + kPartialStatsCols - 1) / kPartialStatsCols;
  const size_t stats_row = partials * sizeof(RowState) + sizeof(float);
  if (compact_gif(p, plan)) {
    // The terms live in the block when dZ overwrites them in place, else in the dZ group's rows.
    // At least one fp32 row, so that the fallback (whole fp32 rows) always fits.
    const size_t terms_row = dz_in_place(plan) ? compact_ld(cols) * kExpBytes : 0;
    const size_t compact = static_cast<size_t>(rows) * (terms_row + stats_row);
    return std::max(compact, f32(cols));
  }
  if (!compact_forward(p, plan)) return f32(rows * cols);
  return static_cast<size_t>(rows) * stats_row;
}

ShiftedLayout shifted_layout(int64_t rows, int64_t group_rows, int64_t hidden, DType dtype,
                             bool grad_x) {
  ShiftedLayout l;
  Carver c;
  l.shift = c.take(f32(rows));
  l.row_max = c.take(f32(rows));
  l.row_factor = c.take(f32(rows));
  l.x_scaled = c.take(static_cast<size_t>(group_rows) * hidden * dtype_size(dtype));
  if (grad_x) l.dx = c.take(f32(rows * hidden));
  l.rewrite_rows = c.take(static_cast<size_t>(rows) * sizeof(int32_t));
  l.rewrite_count = c.take(sizeof(int32_t));
  l.total = c.total();
  return l;
}

ForwardLayout forward_layout(const Problem& p, const Plan& plan, const BackendTraits& traits) {
  ForwardLayout l;
  Carver c;
  const int64_t n = p.num_tokens, v = p.vocab_size, d = p.hidden_size;
  l.scalars = c.take(f32(kNumScalars));
  if (p.reduction != Reduction::kNone) l.row_loss = c.take(f32(n));
  l.lse = c.take(f32(n));
  l.row_metrics = c.take(f32(n * kNumRowMetrics));
  const int64_t cols = forward_cols(p, plan);
  l.logits = c.take(forward_block_bytes(p, plan));
  // Compact blocks keep the carry for their fallback, which splits rows.
  if (cols < v || compact_forward(p, plan)) {
    l.row_carry = c.take(static_cast<size_t>(n) * sizeof(RowCarry));
  }
  if (grads_in_forward(p, plan)) {
    if (!dz_in_place(plan)) {
      l.dz_group = c.take(static_cast<size_t>(plan.dw_group_tokens) * compact_ld(v) *
                          dtype_size(traits.dz_type(p.dtype)));
    }
    if (needs_dw_accumulator(p, plan)) {
      l.dw_accum = c.take(f32((v - dw_accumulator_borrowed_rows(v)) * d));
    }
    if (p.needs_grad_bias) l.db_accum = c.take(f32(v));
    if (shifted_terms(p, plan)) {
      l.shifted = c.take(shifted_layout(plan.forward_token_chunk, shifted_group_rows(plan), d,
                                        p.dtype, p.needs_grad_x)
                             .total);
    }
  }
  const size_t scratch = gemm_scratch_bytes(plan, traits);
  if (scratch > 0) l.gemm_scratch = c.take(scratch);
  l.total = c.total();
  return l;
}

BackwardLayout backward_layout(const Problem& p, const Plan& plan, const BackendTraits& traits) {
  BackwardLayout l;
  if (plan.strategy != Strategy::kRecompute ||
      !(p.needs_grad_x || p.needs_grad_weight || p.needs_grad_bias)) {
    return l;
  }
  Carver c;
  const int64_t n = p.num_tokens, d = p.hidden_size;
  const int64_t bt = plan.backward_token_chunk, bv = plan.backward_vocab_chunk;
  l.scalars = c.take(f32(kNumScalars));
  const size_t dz_size = dtype_size(traits.dz_type(p.dtype));
  l.logits =
      c.take(plan.compact_backward_blocks ? static_cast<size_t>(bt) * compact_ld(bv) * dz_size
                                          : f32(bt * bv));
  if (token_outer(plan)) {
    // dZ overwrites each block in place; dx of one token chunk and db of all columns accumulate.
    if (needs_dx_accumulator(p, plan)) {
      l.dx_accum = c.take(f32(dx_accumulator_workspace_rows(p, plan, std::min(bt, n)) * d));
    }
    if (p.needs_grad_bias) l.db_accum = c.take(f32(p.vocab_size));
  } else {
    if (bt < n) {
      l.dz_vocab = c.take(static_cast<size_t>(n) * compact_ld(bv) * dz_size);
    }
    if (needs_dx_accumulator(p, plan)) {
      l.dx_accum = c.take(f32(dx_accumulator_workspace_rows(p, plan, n) * d));
    }
    if (p.needs_grad_bias) l.db_accum = c.take(f32(bv));
  }
  const size_t scratch = gemm_scratch_bytes(plan, traits);
  if (scratch > 0) l.gemm_scratch = c.take(scratch);
  l.total = c.total();
  return l;
}

}  // namespace flce::detail
