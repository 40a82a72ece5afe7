// Strategy and chunk choice: the one place where speed-versus-memory heuristics live.
#include <algorithm>
#include <cstdio>
#include <string>
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
// A forward logits block of about this size is large enough for full-speed GEMMs (>= 512 rows at
// V = 256k) while keeping the fp32 block within the 512 MiB the memory target allows beyond the
// dZ store or the dW accumulator.
constexpr size_t kTargetLogitsBlockBytes = size_t(512) << 20;
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

// Rows of a forward logits block [rows, V] of about kTargetLogitsBlockBytes, a multiple of 128.
int64_t target_block_rows(int64_t vocab_size) {
  const int64_t rows = static_cast<int64_t>(kTargetLogitsBlockBytes / (sizeof(float) * vocab_size));
  return std::clamp<int64_t>(rows / 128 * 128, 256, kMaxTokenChunk);
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

// Grad-in-forward plans in order of preference.
std::vector<Plan> grad_in_forward_candidates(const Problem& p) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  std::vector<Plan> out;
  Plan plan;
  plan.strategy = Strategy::kGradInForward;
  // First choice: keep dZ of all tokens so dW is one GEMM written straight to the output (no
  // fp32 accumulator and no per-chunk read-modify-write of V x D).
  for (int64_t c : descending(target_block_rows(p.vocab_size), std::min<int64_t>(n, 256), n)) {
    plan.forward_token_chunk = c;
    plan.dw_group_tokens = n;
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
  for (const Plan& plan : grad_in_forward_candidates(p)) {
    const bool accumulates = plan.dw_group_tokens < n;
    if (automatic && accumulates && plan.forward_token_chunk < kMinAutoAccumulateChunk) continue;
    if (plan_bytes(p, plan, t) <= budget) {
      *out = plan;
      return true;
    }
  }
  return false;
}

// Candidate chunks of the recompute strategy, largest first.
std::vector<int64_t> forward_chunks(const Problem& p) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  return descending(target_block_rows(p.vocab_size), std::min(n, kMinChunk), n);
}
std::vector<int64_t> backward_token_chunks(const Problem& p) {
  const int64_t n = std::max<int64_t>(p.num_tokens, 1);
  return descending(n, std::min(n, kMinChunk), n);
}
std::vector<int64_t> backward_vocab_chunks(const Problem& p) {
  return descending(kMaxVocabChunk, std::min(p.vocab_size, kMinChunk), p.vocab_size);
}

bool try_recompute(const Problem& p, size_t budget, const BackendTraits& t, Plan* out) {
  Plan plan;
  plan.strategy = Strategy::kRecompute;
  int64_t fwd = 0;
  for (int64_t c : forward_chunks(p)) {
    plan.forward_token_chunk = c;
    if (forward_bytes(p, plan, t) <= budget) {
      fwd = c;
      break;
    }
  }
  if (fwd == 0) return false;
  plan.forward_token_chunk = fwd;
  // Backward: prefer all tokens in one block (dZ in place, each vocabulary slice done in one
  // pass), then the widest vocabulary chunk (fewer fp32 dx accumulations).
  for (int64_t bt : backward_token_chunks(p)) {
    for (int64_t bv : backward_vocab_chunks(p)) {
      plan.backward_token_chunk = bt;
      plan.backward_vocab_chunk = bv;
      if (backward_bytes(p, plan, t) <= budget) {
        *out = plan;
        return true;
      }
    }
  }
  return false;
}

// The smallest budget the search accepts with the strategies it may use: the smallest candidate
// of grad-in-forward, and for recompute the smallest forward chunk with the smallest backward over
// every block shape (one token block without a dZ gather can be smaller than the smallest
// blocks, so all are compared).
size_t minimum_budget(const Problem& p, const BackendTraits& t, bool gif, bool recompute) {
  size_t best = ~size_t(0);
  if (gif) {
    for (const Plan& plan : grad_in_forward_candidates(p)) {
      best = std::min(best, plan_bytes(p, plan, t));
    }
  }
  if (recompute) {
    Plan plan;
    plan.strategy = Strategy::kRecompute;
    plan.forward_token_chunk = forward_chunks(p).back();
    const size_t fwd = forward_bytes(p, plan, t);
    size_t bwd = ~size_t(0);
    for (int64_t bt : backward_token_chunks(p)) {
      for (int64_t bv : backward_vocab_chunks(p)) {
        plan.backward_token_chunk = bt;
        plan.backward_vocab_chunk = bv;
        bwd = std::min(bwd, backward_bytes(p, plan, t));
      }
    }
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
  }
  plan->forward_workspace_bytes = forward_bytes(p, *plan, t);
  plan->backward_workspace_bytes = backward_bytes(p, *plan, t);
  plan->min_budget_bytes = min_budget;
  return Status::Ok();
}

}  // namespace flce
