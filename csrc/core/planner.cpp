// Strategy and chunk choice: the one place where speed-versus-memory heuristics live.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "flce/flce.h"
#include "workspace.h"

namespace flce {
namespace {

using detail::BackendTraits;
using detail::backward_layout;
using detail::forward_layout;

// Logits blocks beyond this many rows gain nothing: the GEMMs are already large, and the fp32
// block (rows * V * 4 bytes) would only grow.
constexpr int64_t kMaxTokenChunk = 4096;
constexpr int64_t kMaxVocabChunk = 16384;
// The memory target allows 512 MiB beyond the dZ store or the dW accumulator (what any 6NVD method
// must hold); a forward logits block that fills it with the GEMM scratch and the per-token vectors
// is large enough for full-speed GEMMs (>= 384 rows at V = 256k).
constexpr size_t kTargetExtraBytes = size_t(512) << 20;
// Smallest blocks the planner will ever propose (clamped to N and V).
constexpr int64_t kMinChunk = 16;

size_t forward_bytes(const Problem& p, const Plan& plan, const BackendTraits& t) {
  return forward_layout(p, plan, t).total;
}
size_t backward_bytes(const Problem& p, const Plan& plan, const BackendTraits& t) {
  return backward_layout(p, plan, t).total;
}
size_t plan_bytes(const Problem& p, const Plan& plan, const BackendTraits& t) {
  return std::max(forward_bytes(p, plan, t), backward_bytes(p, plan, t));
}

// Rows of a forward block of whole rows (`plan` says its kind: fp32 logits, or grad-in-forward
// compact, with the per-chunk buffers of row-shifted terms), a multiple of 64, such that the block,
// the GEMM scratch and the per-token vectors (loss, LSE, metrics) take at most kTargetExtraBytes.
// (Evening the rows out over the chunks N needs was measured and dropped: at llama3-4k, 5 x 832
// rows ran grad-in-forward in 22.6 ms against 21.5 ms for 4 x 960 + 256, on an H100.)
int64_t target_block_rows(const Problem& p, const BackendTraits& t, Plan plan) {
  const size_t vectors = static_cast<size_t>(std::max<int64_t>(p.num_tokens, 1)) *
                         (2 + detail::kNumRowMetrics) * sizeof(float);
  const size_t fixed = t.gemm_scratch_bytes + vectors + (size_t(64) << 10);
  const size_t room = kTargetExtraBytes > fixed ? kTargetExtraBytes - fixed : 0;
  plan.forward_token_chunk = 64;
  plan.forward_vocab_chunk = 0;
  size_t per_64_rows = detail::forward_block_bytes(p, plan);
  if (detail::shifted_terms(p, plan)) {
    per_64_rows += detail::shifted_layout(64, 0, p.hidden_size, p.dtype, p.needs_grad_x).total;
  }
  const int64_t rows = static_cast<int64_t>(room / per_64_rows) * 64;
  return std::clamp<int64_t>(rows, 256, kMaxTokenChunk);
}

// Candidate sizes from `hi` down to `lo`, halving, each clamped to `limit`.
std::vector<int64_t> descending(int64_t hi, int64_t lo, int64_t limit) {
  std::vector<int64_t> out;
  for (int64_t c = hi; c >= lo; c /= 2) {
    const int64_t v = std::min(c, limit);
    if (out.empty() || out.back() != v) out.push_back(v);
    if (c == lo) break;
  }
  if (out.empty()) out.push_back(std::max<int64_t>(1, std::min(lo, limit)));
  return out;
}

// snprintf rather than iostreams: no locale machinery in the core's error path.
std::string gib(size_t bytes) {
  char text[96];
  std::snprintf(text, sizeof(text), "%.3g MiB (%zu bytes)", static_cast<double>(bytes) / (1 << 20),
                bytes);
  return text;
}

// Whether a plan's blocks may be compact: where the backend expects its fused GEMMs to serve them
// (the forward's statistics need no metrics; dZ must be 16-bit).
bool fused_expected(const Problem& p, const BackendTraits& t) {
  return t.fused_logits_expected != nullptr && t.fused_logits_expected(p);
}
bool compact_forward_blocks(const Problem& p, const BackendTraits& t) {
  return !p.needs_metrics && fused_expected(p, t);
}
bool compact_backward_blocks(const Problem& p, const BackendTraits& t) {
  const bool any_grad = p.needs_grad_x || p.needs_grad_weight || p.needs_grad_bias;
  return any_grad && dtype_size(t.dz_type(p.dtype)) < 4 && fused_expected(p, t);
}

// Grad-in-forward plans in order of preference.
std::vector<Plan> grad_in_forward_candidates(const Problem& p, const BackendTraits& t) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  std::vector<Plan> out;
  Plan plan;
  plan.strategy = Strategy::kGradInForward;
  plan.compact_forward_blocks = compact_forward_blocks(p, t);
  // Compact blocks keep row-shifted terms: no pass rewrites them as dZ (measured: bench/NOTES.md,
  // versions 10 and 15).
  plan.shifted_terms = plan.compact_forward_blocks;
  // First choice: keep dZ of all tokens so dW is one GEMM written straight to the output (no
  // fp32 accumulator and no per-chunk read-modify-write of V x D).
  plan.dw_group_tokens = n;
  for (int64_t c : descending(target_block_rows(p, t, plan), std::min<int64_t>(n, 256), n)) {
    plan.forward_token_chunk = c;
    out.push_back(plan);
  }
  // Then: dZ in place per chunk, dW accumulated in fp32 (8 V D bytes of traffic per chunk, so
  // the largest chunk that fits).
  for (int64_t c : descending(kMaxTokenChunk * 2, std::min<int64_t>(n, 256), n)) {
    plan.forward_token_chunk = c;
    plan.dw_group_tokens = c;
    out.push_back(plan);
  }
  return out;
}

// Below this many tokens per chunk, re-reading and re-writing the fp32 dW accumulator once per
// chunk costs more than recomputing the logits: on an H100 at gemma2's shape, grad-in-forward with
// 512-token chunks took 78.5 ms against 68.0 ms for recompute in less memory (1024-token chunks:
// 63.0 ms); bench/results/h100-budget.md. So strategy auto skips such plans.
constexpr int64_t kMinAutoAccumulateChunk = 1024;

bool try_grad_in_forward(const Problem& p, size_t budget, const BackendTraits& t, bool automatic,
                         Plan* out) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  for (const Plan& plan : grad_in_forward_candidates(p, t)) {
    const bool accumulates = plan.dw_group_tokens < n;
    if (automatic && accumulates && plan.forward_token_chunk < kMinAutoAccumulateChunk) continue;
    if (plan_bytes(p, plan, t) <= budget) {
      *out = plan;
      return true;
    }
  }
  return false;
}

// The recompute strategy ------------------------------------------------------------------

// Under small budgets the GEMM scratch competes with the logits blocks: the recompute search
// gives it an eighth of the budget (the backend's preferred size from 256 MiB up), and retries
// with the backend's minimum before giving up. (cuBLASLt with 4 MiB instead of 32 ran llama3's
// 256 MiB plan 5 ms slower, 65 ms against 60; at a 60 MiB budget 7 and 4 MiB ran alike.)
std::vector<size_t> recompute_scratch_sizes(size_t budget, const BackendTraits& t) {
  const size_t mib = size_t(1) << 20;
  const size_t share = std::clamp(budget / 8 / mib * mib, t.min_gemm_scratch_bytes,
                                  std::max(t.gemm_scratch_bytes, t.min_gemm_scratch_bytes));
  std::vector<size_t> out{share};
  if (t.min_gemm_scratch_bytes != share) out.push_back(t.min_gemm_scratch_bytes);
  return out;
}

// A forward logits block of whole rows needs at least this many of them for full-speed GEMMs;
// below, the rows are split into vocabulary blocks (statistics merged across them).
constexpr int64_t kMinWholeRowChunk = 256;
// Split forward blocks larger than this gain nothing (the GEMMs are at full speed).
// Wide blocks matter more than tall ones: the row kernel merges and carries each row's statistics
// once per block, which at 4096 columns cost 4.1 ms of llama3's forward against 2.2 ms for whole
// rows.
constexpr int64_t kSplitRowsCap = 1024;
constexpr int64_t kSplitColsCap = kMaxVocabChunk;

// Calls f(plan) for every forward block of the recompute strategy: whole rows first
// (most rows first), then blocks that split rows.
template <typename F>
void for_each_recompute_forward(const Problem& p, const BackendTraits& t, Plan plan, F&& f) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1), v = p.vocab_size;
  plan.forward_vocab_chunk = 0;
  // Compact blocks (partial statistics, V / 32 bytes a row) take the most rows a GEMM gains from.
  const int64_t most_rows =
      plan.compact_forward_blocks ? kMaxTokenChunk : target_block_rows(p, t, plan);
  for (int64_t c : descending(most_rows, std::min(n, kMinWholeRowChunk), n)) {
    plan.forward_token_chunk = c;
    f(plan);
  }
  for (int64_t rows : descending(std::min(n, kSplitRowsCap), std::min(n, kMinChunk), n)) {
    for (int64_t cols : descending(kMaxVocabChunk, std::min(v, kMinChunk), v)) {
      plan.forward_token_chunk = rows;
      plan.forward_vocab_chunk = cols >= v ? 0 : cols;
      f(plan);
    }
  }
}

// Chooses the recompute forward's block in `budget`: whole rows when at least kMinWholeRowChunk
// of them fit (or all N), else the largest block up to [kSplitRowsCap, kSplitColsCap].
bool pick_recompute_forward(const Problem& p, size_t budget, const BackendTraits& t, Plan* plan) {
  bool whole = false;
  int64_t best_score = -1;
  Plan best = *plan;
  for_each_recompute_forward(p, t, *plan, [&](const Plan& trial) {
    if (whole || forward_bytes(p, trial, t) > budget) return;
    const int64_t n = std::max<int64_t>(p.num_tokens, 1);
    if (trial.forward_vocab_chunk == 0 &&
        trial.forward_token_chunk >= std::min(n, kMinWholeRowChunk)) {
      whole = true;  // the first whole-row block that fits has the most rows
      best = trial;
      return;
    }
    const int64_t cols = trial.forward_vocab_chunk == 0 ? p.vocab_size : trial.forward_vocab_chunk;
    const int64_t score =
        std::min(trial.forward_token_chunk, kSplitRowsCap) * std::min(cols, kSplitColsCap);
    if (score > best_score) {
      best_score = score;
      best = trial;
    }
  });
  if (!whole && best_score < 0) return false;
  *plan = best;
  return true;
}

// Predicted cost of a recompute backward, in bytes of memory traffic beyond what every order
// moves (the logits blocks themselves): accumulator read-modify-writes, plus a fixed charge per
// block for its four launches and the GEMMs' ramp-up and tail (about 10 us on an H100).
constexpr double kBlockOverheadBytes = 32.0 * (1 << 20);
double backward_cost(const Problem& p, const Plan& plan) {
  const double n = static_cast<double>(std::max<int64_t>(p.num_tokens, 1));
  const double v = static_cast<double>(p.vocab_size), d = static_cast<double>(p.hidden_size);
  const double token_chunks = std::ceil(n / static_cast<double>(plan.backward_token_chunk));
  const double vocab_chunks = std::ceil(v / static_cast<double>(plan.backward_vocab_chunk));
  double cost = token_chunks * vocab_chunks * kBlockOverheadBytes;
  if (p.needs_grad_x) cost += (vocab_chunks - 1.0) * n * d * 2.0 * sizeof(float);
  if (p.needs_grad_weight && plan.backward_order == BackwardOrder::kTokenOuter) {
    cost += (token_chunks - 1.0) * v * d * 2.0 * static_cast<double>(dtype_size(p.dtype));
  }
  return cost;
}

// Token-outer accumulates dW in its own dtype once per token chunk, so 16-bit dW is rounded once
// per chunk. Measured on an H100 (bench, LM data, bf16) against float64: dW error 2.3-2.5e-3 with
// one rounding, 2.9e-3 with 3 chunks, 3.0-3.3e-3 with 4, 3.4e-3 with 6 and 3.8e-3 with 8
// (bench/NOTES.md); the target is 3e-3, so at most 2. (The dx accumulator borrows dx's own memory,
// dx_accumulator_borrows_dx, so 2 chunks need the workspace that 4 needed before.)
constexpr int64_t kMaxDwRoundings16 = 2;

// Token chunks for the token-outer order: N split evenly into 1..kMaxDwRoundings16 chunks (rounded
// up to a multiple of 64 rows), then halving when the rounding count is not limited.
std::vector<int64_t> token_outer_chunks(const Problem& p) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  std::vector<int64_t> out;
  for (int64_t k = 1; k <= kMaxDwRoundings16; ++k) {
    const int64_t c = std::min(n, ((n + k - 1) / k + 63) / 64 * 64);
    if (std::find(out.begin(), out.end(), c) == out.end()) out.push_back(c);
  }
  const bool limited = p.needs_grad_weight && p.dtype != DType::kFloat32;
  if (!limited) {
    for (int64_t c : descending(out.back() / 2, std::min(n, kMinChunk), n)) {
      if (c < out.back()) out.push_back(c);
    }
  }
  return out;
}

// Vocabulary chunks, largest first: multiples of 256 down to 256, then halving to 16.
std::vector<int64_t> vocab_chunks(const Problem& p) {
  const int64_t v = p.vocab_size;
  std::vector<int64_t> out;
  for (int64_t c = std::min(v, kMaxVocabChunk); c >= 256; c = (c - 1) / 256 * 256) {
    out.push_back(c);
  }
  for (int64_t c : descending(128, std::min(v, kMinChunk), v)) {
    if (out.empty() || c < out.back()) out.push_back(c);
  }
  return out;
}

std::vector<int64_t> vocab_outer_token_chunks(const Problem& p) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  return descending(n, std::min(n, kMinChunk), n);
}

// Calls f(plan) for every backward block shape of both orders (widest vocabulary chunk first
// within each token chunk).
template <typename F>
void for_each_backward(const Problem& p, Plan plan, F&& f) {
  const std::vector<int64_t> bvs = vocab_chunks(p);
  const std::pair<BackwardOrder, std::vector<int64_t>> orders[] = {
      {BackwardOrder::kVocabOuter, vocab_outer_token_chunks(p)},
      {BackwardOrder::kTokenOuter, token_outer_chunks(p)}};
  for (const auto& [order, bts] : orders) {
    plan.backward_order = order;
    for (int64_t bt : bts) {
      for (int64_t bv : bvs) {
        plan.backward_token_chunk = bt;
        plan.backward_vocab_chunk = bv;
        if (!f(plan)) break;
      }
    }
  }
}

// The cheapest backward (backward_cost) that fits; the vocabulary-outer order wins ties.
bool pick_recompute_backward(const Problem& p, size_t budget, const BackendTraits& t, Plan* plan) {
  bool found = false;
  double best_cost = 0.0;
  Plan best = *plan;
  for_each_backward(p, *plan, [&](const Plan& trial) {
    if (backward_bytes(p, trial, t) > budget) return true;  // try a narrower chunk
    const double cost = backward_cost(p, trial);
    if (!found || cost < best_cost) {
      found = true;
      best_cost = cost;
      best = trial;
    }
    return false;  // narrower chunks at this token chunk only cost more
  });
  if (found) *plan = best;
  return found;
}

bool try_recompute(const Problem& p, size_t budget, const BackendTraits& t, Plan* out) {
  const bool any_grad = p.needs_grad_x || p.needs_grad_weight || p.needs_grad_bias;
  const bool compact_fwd = compact_forward_blocks(p, t);
  const bool compact_bwd = compact_backward_blocks(p, t);
  for (size_t scratch : recompute_scratch_sizes(budget, t)) {
    Plan plan;
    plan.strategy = Strategy::kRecompute;
    plan.compact_forward_blocks = compact_fwd;
    plan.compact_backward_blocks = compact_bwd;
    plan.gemm_scratch_bytes = scratch;
    if (!pick_recompute_forward(p, budget, t, &plan)) continue;
    if (any_grad && !pick_recompute_backward(p, budget, t, &plan)) continue;
    *out = plan;
    return true;
  }
  return false;
}

// The smallest budget the search accepts with the strategies it may use: the smallest candidate
// of grad-in-forward, and for recompute the smallest forward block with the smallest backward,
// both with the backend's smallest GEMM scratch.
size_t minimum_budget(const Problem& p, const BackendTraits& t, bool gif, bool recompute) {
  size_t best = ~size_t(0);
  if (gif) {
    for (const Plan& plan : grad_in_forward_candidates(p, t)) {
      best = std::min(best, plan_bytes(p, plan, t));
    }
  }
  if (recompute) {
    Plan plan;
    plan.strategy = Strategy::kRecompute;
    plan.compact_forward_blocks = compact_forward_blocks(p, t);
    plan.compact_backward_blocks = compact_backward_blocks(p, t);
    plan.gemm_scratch_bytes = t.min_gemm_scratch_bytes;
    size_t fwd = ~size_t(0);
    for_each_recompute_forward(
        p, t, plan, [&](const Plan& trial) { fwd = std::min(fwd, forward_bytes(p, trial, t)); });
    size_t bwd = ~size_t(0);
    for_each_backward(p, plan, [&](const Plan& trial) {
      bwd = std::min(bwd, backward_bytes(p, trial, t));
      return true;
    });
    best = std::min(best, std::max(fwd, bwd));
  }
  return best;
}

}  // namespace

Status validate_problem(const Problem& p) {
  if (p.num_tokens < 0) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "num_tokens must be >= 0, got " + std::to_string(p.num_tokens));
  }
  if (p.vocab_size < 1) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "vocab_size must be >= 1, got " + std::to_string(p.vocab_size));
  }
  if (p.hidden_size < 1) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "hidden_size must be >= 1, got " + std::to_string(p.hidden_size));
  }
  if (p.needs_grad_bias && !p.has_bias) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "needs_grad_bias is set but the problem has no bias");
  }
  return Status::Ok();
}

size_t default_memory_budget(const Problem& p) {
  const auto n = static_cast<size_t>(std::max<int64_t>(p.num_tokens, 0));
  const auto v = static_cast<size_t>(std::max<int64_t>(p.vocab_size, 0));
  const auto d = static_cast<size_t>(std::max<int64_t>(p.hidden_size, 0));
  return std::min(n * v * 2, v * d * 4) + kTargetExtraBytes;
}

Status make_plan(const Problem& p, Device device, size_t budget, Strategy forced, Plan* plan) {
  if (plan == nullptr) return Status::Error(StatusCode::kInvalidArgument, "plan must not be null");
  Status s = validate_problem(p);
  if (!s.ok()) return s;
  if (device == Device::kCuda && !cuda_available()) {
    return Status::Error(StatusCode::kNotCompiled, "flce was built without the CUDA backend");
  }
  const BackendTraits t = detail::backend_traits(device);
  const bool any_grad = p.needs_grad_x || p.needs_grad_weight || p.needs_grad_bias;
  // Gradients in the forward need the upstream gradient to be one scalar known to be a plain
  // rescaling: not so for per-token upstream gradients or a gradient through the returned LSE.
  const bool gif_possible = any_grad && p.reduction != Reduction::kNone && !p.needs_grad_lse;
  if (forced == Strategy::kGradInForward && !gif_possible) {
    return Status::Error(
        StatusCode::kInvalidArgument,
        "strategy grad_in_forward needs reduction mean or sum, a gradient to compute and no "
        "gradient through the returned lse; use strategy auto or recompute");
  }
  const bool use_gif = gif_possible && forced != Strategy::kRecompute;
  const bool use_recompute = forced != Strategy::kGradInForward;
  const size_t min_budget = minimum_budget(p, t, use_gif, use_recompute);
  bool found = false;
  if (use_gif) found = try_grad_in_forward(p, budget, t, forced == Strategy::kAuto, plan);
  if (!found && use_recompute) found = try_recompute(p, budget, t, plan);
  if (!found) {
    const std::string which = forced == Strategy::kGradInForward ? "strategy grad_in_forward"
                              : forced == Strategy::kRecompute   ? "strategy recompute"
                                                                 : "any strategy";
    return Status::Error(
        StatusCode::kBudgetTooSmall,
        "memory_budget of " + gib(budget) + " is too small for " + which +
            " at N=" + std::to_string(p.num_tokens) + ", V=" + std::to_string(p.vocab_size) +
            ", D=" + std::to_string(p.hidden_size) + "; the minimum is " + gib(min_budget));
  }
  if (plan->strategy == Strategy::kGradInForward || !any_grad) {
    plan->backward_token_chunk = 0;
    plan->backward_vocab_chunk = 0;
    plan->compact_backward_blocks = false;
  }
  plan->forward_workspace_bytes = forward_bytes(p, *plan, t);
  plan->backward_workspace_bytes = backward_bytes(p, *plan, t);
  plan->min_budget_bytes = min_budget;
  return Status::Ok();
}

}  // namespace flce
