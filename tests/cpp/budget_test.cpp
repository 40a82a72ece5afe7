// The memory budget: plans stay within it, a budget below the minimum is refused with the minimum
// in the message, and calls run in exactly the workspace a plan reports (canaries after it).
#include <gtest/gtest.h>

#include <string>

#include "harness.h"

namespace flce::test {
namespace {

Case budget_case() {
  Case c;
  c.n = 300;
  c.v = 1001;
  c.d = 67;
  c.dtype = DType::kBFloat16;
  c.bias = true;
  c.grad_bias = true;
  c.seed = 77;
  return c;
}

// min(N V 2, V D 4) + 512 MiB: the 16-bit logits of all tokens or an fp32 dW accumulator, the
// smaller, and 512 MiB.
TEST(Budget, DefaultIsTheSingleLogitsPassFloorPlus512MiB) {
  constexpr size_t kMiB = size_t(1) << 20;
  Problem p;
  p.num_tokens = 8192;  // Llama-3 8B's head: the logits are the smaller
  p.vocab_size = 128256;
  p.hidden_size = 4096;
  EXPECT_EQ(default_memory_budget(p), size_t(8192) * 128256 * 2 + 512 * kMiB);
  p.num_tokens = 16384;  // Qwen-0.5B's: the accumulator
  p.vocab_size = 151936;
  p.hidden_size = 896;
  EXPECT_EQ(default_memory_budget(p), size_t(151936) * 896 * 4 + 512 * kMiB);
  p.num_tokens = 0;
  EXPECT_EQ(default_memory_budget(p), 512 * kMiB);
}

TEST(Budget, PlansStayWithinTheBudget) {
  for (DType t : {DType::kFloat32, DType::kBFloat16}) {
    Case c = budget_case();
    c.dtype = t;
    const Problem prob = make_problem(c);
    Plan roomy;
    ASSERT_TRUE(make_plan(prob, Device::kCpu, kRoomyBudget, Strategy::kAuto, &roomy).ok());
    const size_t min_budget = roomy.min_budget_bytes;
    ASSERT_GT(min_budget, 0u);
    int gif_plans = 0;
    for (double f = 1.0; f < 64.0; f *= 1.3) {
      const size_t budget = static_cast<size_t>(min_budget * f);
      for (Strategy s : {Strategy::kAuto, Strategy::kRecompute, Strategy::kGradInForward}) {
        Plan plan;
        const Status st = make_plan(prob, Device::kCpu, budget, s, &plan);
        // A forced strategy may need more than the minimum over all strategies.
        if (s != Strategy::kAuto && st.code == StatusCode::kBudgetTooSmall) continue;
        ASSERT_TRUE(st.ok()) << "budget " << budget << ": " << st.message;
        EXPECT_LE(plan.forward_workspace_bytes, budget);
        EXPECT_LE(plan.backward_workspace_bytes, budget);
        EXPECT_LE(plan.min_budget_bytes, budget);
        if (s == Strategy::kAuto) {
          EXPECT_EQ(plan.min_budget_bytes, min_budget);
        }
        if (plan.strategy == Strategy::kGradInForward) ++gif_plans;
      }
    }
    EXPECT_GT(gif_plans, 0) << "no budget in the range allowed grad_in_forward";
  }
}

TEST(Budget, BelowMinimumIsRefusedWithTheMinimum) {
  const Problem prob = make_problem(budget_case());
  Plan roomy;
  ASSERT_TRUE(make_plan(prob, Device::kCpu, kRoomyBudget, Strategy::kAuto, &roomy).ok());
  const size_t min_budget = roomy.min_budget_bytes;
  Plan plan;
  const Status s = make_plan(prob, Device::kCpu, min_budget - 1, Strategy::kAuto, &plan);
  EXPECT_EQ(s.code, StatusCode::kBudgetTooSmall);
  EXPECT_NE(s.message.find(std::to_string(min_budget)), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("memory_budget"), std::string::npos) << s.message;
  EXPECT_TRUE(make_plan(prob, Device::kCpu, min_budget, Strategy::kAuto, &plan).ok());
  EXPECT_EQ(make_plan(prob, Device::kCpu, 0, Strategy::kRecompute, &plan).code,
            StatusCode::kBudgetTooSmall);
  for (Strategy forced : {Strategy::kRecompute, Strategy::kGradInForward}) {
    Plan own;
    ASSERT_TRUE(make_plan(prob, Device::kCpu, kRoomyBudget, forced, &own).ok());
    const Status below = make_plan(prob, Device::kCpu, own.min_budget_bytes - 1, forced, &plan);
    EXPECT_EQ(below.code, StatusCode::kBudgetTooSmall);
    EXPECT_NE(below.message.find(std::to_string(own.min_budget_bytes)), std::string::npos)
        << below.message;
    EXPECT_TRUE(make_plan(prob, Device::kCpu, own.min_budget_bytes, forced, &plan).ok());
    EXPECT_EQ(plan.strategy, forced);
  }
}

// In a small budget the recompute backward of a 16-bit problem walks token chunks outermost (its
// fp32 dx accumulator covers one chunk), never more than 2 of them (dW is rounded once per chunk).
// (D = 67: the accumulator does not borrow dx's memory.) fp32 dx is its own accumulator.
TEST(Budget, SmallBudgetsWalkTokensOutermost) {
  for (DType t : {DType::kBFloat16, DType::kFloat32}) {
    Case c = budget_case();
    c.n = 1000;
    c.dtype = t;
    const Problem prob = make_problem(c);
    Plan roomy;
    ASSERT_TRUE(make_plan(prob, Device::kCpu, kRoomyBudget, Strategy::kRecompute, &roomy).ok());
    const size_t dx_accum = static_cast<size_t>(c.n) * c.d * sizeof(float);
    const size_t budget = roomy.min_budget_bytes + dx_accum / 8;
    Plan plan;
    ASSERT_TRUE(make_plan(prob, Device::kCpu, budget, Strategy::kRecompute, &plan).ok());
    EXPECT_LE(plan.backward_workspace_bytes, budget);
    const int64_t token_chunks = (c.n + plan.backward_token_chunk - 1) / plan.backward_token_chunk;
    if (t == DType::kBFloat16) {
      EXPECT_EQ(plan.backward_order, BackwardOrder::kTokenOuter);
      EXPECT_LE(token_chunks, 2);
    }
  }
}

// A forward in a small budget splits rows into vocabulary blocks rather than shrinking to a few
// whole rows (which would starve the GEMM).
TEST(Budget, SmallBudgetsSplitForwardRows) {
  Case c = budget_case();
  c.n = 4096;
  c.v = 50000;
  const Problem prob = make_problem(c);
  Plan plan;
  const size_t budget = size_t(8) << 20;
  ASSERT_TRUE(make_plan(prob, Device::kCpu, budget, Strategy::kRecompute, &plan).ok());
  EXPECT_GT(plan.forward_vocab_chunk, 0);
  EXPECT_LT(plan.forward_vocab_chunk, c.v);
  EXPECT_GE(plan.forward_token_chunk, 256);
  EXPECT_LE(plan.forward_workspace_bytes, budget);
}

// run_fused allocates exactly plan.*_workspace_bytes with canaries after the end; at the minimum
// budget every buffer is as small as it gets, so an off-by-one in the layout would show here.
TEST(Budget, ExactWorkspaceAtTheMinimum) {
  const Case c = budget_case();
  const Inputs in = make_inputs(c);
  Plan roomy;
  ASSERT_TRUE(make_plan(make_problem(c), Device::kCpu, kRoomyBudget, Strategy::kAuto, &roomy).ok());
  for (double f : {1.0, 1.1, 3.0}) {
    PlanChoice choice;
    choice.budget = static_cast<size_t>(roomy.min_budget_bytes * f);
    Outputs out;
    ASSERT_TRUE(run_fused(c, in, choice, &out));
    expect_matches_reference(c, in, out);
  }
}

}  // namespace
}  // namespace flce::test
