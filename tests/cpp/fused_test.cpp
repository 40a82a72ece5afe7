// The public fused API (make_plan, forward, backward) on the CPU against the float64 reference:
// every option alone and together, every reduction, both strategies, all dtypes, edge shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "harness.h"

namespace flce::test {
namespace {

struct NamedCase {
  std::string name;
  Case c;
};

Case base_case(uint64_t seed) {
  Case c;
  c.n = 37;
  c.v = 203;
  c.d = 45;
  c.seed = seed;
  return c;
}

// Each option alone, then all at once; applied to a base case.
std::vector<std::pair<std::string, std::function<void(Case&)>>> option_variants() {
  return {
      {"plain", [](Case&) {}},
      {"ignore_index_in_range", [](Case& c) { c.options.ignore_index = 5; }},
      {"no_ignored_rows", [](Case& c) { c.ignore_fraction = 0.0; }},
      {"label_smoothing", [](Case& c) { c.options.label_smoothing = 0.1f; }},
      {"z_loss", [](Case& c) { c.options.z_loss = 0.01f; }},
      {"softcap", [](Case& c) { c.options.softcap = 4.0f; }},
      {"logit_scale", [](Case& c) { c.options.logit_scale = 0.6f; }},
      {"negative_logit_scale", [](Case& c) { c.options.logit_scale = -1.3f; }},
      {"bias",
       [](Case& c) {
         c.bias = true;
         c.grad_bias = true;
       }},
      {"class_weights", [](Case& c) { c.class_weights = true; }},
      {"int32_labels", [](Case& c) { c.int32_labels = true; }},
      {"strided_x", [](Case& c) { c.x_pad = 7; }},
      {"all_options",
       [](Case& c) {
         c.options.ignore_index = 9;
         c.options.label_smoothing = 0.05f;
         c.options.z_loss = 1e-3f;
         c.options.softcap = 6.0f;
         c.options.logit_scale = -0.8f;
         c.bias = true;
         c.grad_bias = true;
         c.class_weights = true;
         c.int32_labels = true;
         c.x_pad = 3;
       }},
  };
}

std::string strategy_name(Strategy s) {
  return s == Strategy::kGradInForward ? "gif" : s == Strategy::kRecompute ? "recompute" : "auto";
}
std::string reduction_name(Reduction r) {
  return r == Reduction::kMean ? "mean" : r == Reduction::kSum ? "sum" : "none";
}

struct FusedParam {
  std::string name;
  Case c;
  Strategy strategy;
};

std::vector<FusedParam> fused_params() {
  std::vector<FusedParam> out;
  uint64_t seed = 100;
  for (const auto& [oname, apply] : option_variants()) {
    for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
      for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
        if (r == Reduction::kNone && s == Strategy::kGradInForward) continue;
        Case c = base_case(++seed);
        c.options.reduction = r;
        apply(c);
        out.push_back({oname + "_" + reduction_name(r) + "_" + strategy_name(s), c, s});
      }
    }
  }
  // Backpropagation through the returned lse, alone and with per-token upstream gradients.
  for (Reduction r : {Reduction::kMean, Reduction::kNone}) {
    Case c = base_case(++seed);
    c.options.reduction = r;
    c.grad_lse = true;
    c.options.z_loss = 1e-3f;
    out.push_back({"grad_lse_" + reduction_name(r), c, Strategy::kRecompute});
  }
  // Half-precision inputs, plain and with every option.
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    for (bool all : {false, true}) {
      for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
        Case c = base_case(++seed);
        c.dtype = t;
        if (all) option_variants().back().second(c);
        out.push_back(
            {std::string(dtype_name(t)) + (all ? "_all_options_" : "_plain_") + strategy_name(s), c,
             s});
      }
    }
  }
  // Only some of the gradients.
  {
    Case c = base_case(++seed);
    c.grad_weight = false;
    c.bias = true;
    out.push_back({"only_dx_recompute", c, Strategy::kRecompute});
    out.push_back({"only_dx_gif", c, Strategy::kGradInForward});
    c.grad_x = false;
    c.grad_weight = true;
    out.push_back({"only_dw_recompute", c, Strategy::kRecompute});
    out.push_back({"only_dw_gif", c, Strategy::kGradInForward});
    c.grad_weight = false;
    c.grad_bias = true;
    out.push_back({"only_db_recompute", c, Strategy::kRecompute});
    out.push_back({"only_db_gif", c, Strategy::kGradInForward});
  }
  // Forward only.
  {
    Case c = base_case(++seed);
    c.grad_x = c.grad_weight = false;
    c.options.softcap = 10.0f;
    out.push_back({"forward_only", c, Strategy::kAuto});
  }
  // The auto strategy, including a single row and a vocabulary of one.
  {
    Case c = base_case(++seed);
    out.push_back({"auto_mean", c, Strategy::kAuto});
    c.n = 1;
    c.ignore_fraction = 0.0;
    out.push_back({"single_row", c, Strategy::kAuto});
    c = base_case(++seed);
    c.v = 1;
    c.options.label_smoothing = 0.2f;
    out.push_back({"vocab_of_one", c, Strategy::kRecompute});
  }
  return out;
}

void PrintTo(const FusedParam& p, std::ostream* os) { *os << p.name; }

class Fused : public ::testing::TestWithParam<FusedParam> {};

TEST_P(Fused, MatchesReference) {
  const FusedParam& p = GetParam();
  SCOPED_TRACE(p.c.describe());
  const Inputs in = make_inputs(p.c);
  PlanChoice choice;
  choice.strategy = p.strategy;
  Outputs out;
  ASSERT_TRUE(run_fused(p.c, in, choice, &out));
  if (p.strategy != Strategy::kAuto) {
    EXPECT_EQ(out.plan.strategy, p.strategy);
  }
  expect_matches_reference(p.c, in, out);
}

INSTANTIATE_TEST_SUITE_P(Cpu, Fused, ::testing::ValuesIn(fused_params()),
                         [](const ::testing::TestParamInfo<FusedParam>& i) {
                           return i.param.name;
                         });

// Every row ignored: loss 0, every gradient exactly 0, no NaN anywhere, metrics 0.
TEST(FusedEdge, AllRowsIgnored) {
  for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
    for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
      if (r == Reduction::kNone && s == Strategy::kGradInForward) continue;
      Case c = base_case(7);
      c.options.reduction = r;
      c.all_ignored = true;
      c.bias = true;
      c.grad_bias = true;
      c.class_weights = true;
      SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s));
      const Inputs in = make_inputs(c);
      PlanChoice choice;
      choice.strategy = s;
      Outputs out;
      ASSERT_TRUE(run_fused(c, in, choice, &out));
      for (float l : out.loss) {
        EXPECT_EQ(l, 0.0f);
      }
      for (int m = 0; m < kNumMetrics; ++m) {
        EXPECT_EQ(out.metrics[m], 0.0f) << "metric " << m;
      }
      for (const TypedBuffer* g : {&out.dx, &out.dw, &out.db}) {
        for (double v : g->to_double()) {
          ASSERT_EQ(v, 0.0);
        }
      }
      for (int64_t i = 0; i < c.n; ++i) {
        EXPECT_TRUE(std::isfinite(out.lse[i]));
      }
    }
  }
}

// With grad_lse, ignored rows still get a gradient (through their lse) even when all are ignored.
TEST(FusedEdge, AllRowsIgnoredWithGradLse) {
  Case c = base_case(8);
  c.all_ignored = true;
  c.grad_lse = true;
  const Inputs in = make_inputs(c);
  PlanChoice choice;
  choice.strategy = Strategy::kRecompute;
  Outputs out;
  ASSERT_TRUE(run_fused(c, in, choice, &out));
  expect_matches_reference(c, in, out);
}

TEST(FusedEdge, ZeroTokens) {
  for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
    for (Reduction r : {Reduction::kMean, Reduction::kSum}) {
      Case c = base_case(9);
      c.n = 0;
      c.bias = true;
      c.grad_bias = true;
      c.options.reduction = r;
      const Inputs in = make_inputs(c);
      PlanChoice choice;
      choice.strategy = s;
      Outputs out;
      ASSERT_TRUE(run_fused(c, in, choice, &out));
      EXPECT_EQ(out.loss[0], 0.0f);
      for (int m = 0; m < kNumMetrics; ++m) {
        EXPECT_EQ(out.metrics[m], 0.0f);
      }
      for (double v : out.dw.to_double()) {
        ASSERT_EQ(v, 0.0);
      }
      for (double v : out.db.to_double()) {
        ASSERT_EQ(v, 0.0);
      }
    }
  }
}

// A statistics-only forward on compact blocks without fused GEMMs: its rows are split into
// vocabulary blocks whose fp32 logits fit the partial statistics' bytes, and merged.
TEST(FusedEdge, CompactForwardWithoutGradients) {
  for (DType t : {DType::kFloat32, DType::kBFloat16}) {
    Case c = base_case(31);
    c.dtype = t;
    c.grad_x = false;
    c.grad_weight = false;
    c.options.label_smoothing = 0.1f;
    c.options.z_loss = 1e-3f;
    SCOPED_TRACE(c.describe());
    const Inputs in = make_inputs(c);
    PlanChoice choice;
    choice.manual = true;
    choice.plan.strategy = Strategy::kRecompute;
    choice.plan.compact_forward_blocks = true;
    choice.plan.forward_token_chunk = 16;
    Outputs out;
    ASSERT_TRUE(run_fused(c, in, choice, &out));
    expect_matches_reference(c, in, out);
  }
}

// A vocabulary beyond 65536 (16-bit index overflow, grid limits on the GPU).
TEST(FusedEdge, LargeVocabulary) {
  for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
    Case c;
    c.n = 13;
    c.v = 70001;
    c.d = 11;
    c.bias = true;
    c.grad_bias = true;
    c.options.softcap = 8.0f;
    c.options.label_smoothing = 0.1f;
    c.seed = 11;
    SCOPED_TRACE(c.describe());
    const Inputs in = make_inputs(c);
    PlanChoice choice;
    choice.strategy = s;
    Outputs out;
    ASSERT_TRUE(run_fused(c, in, choice, &out));
    expect_matches_reference(c, in, out);
  }
}

// Grad-in-forward's fp32 dW accumulator with 16-bit W keeps its first rows in grad_weight's own
// bytes (dw_accumulator_borrowed_rows: 128 of V = 389, 384 of V = 1000) and converts them in place
// at the end; D = 39 leaves the rows of neither part a multiple of 8 elements.
TEST(FusedEdge, GradInForwardDwAccumulatorBorrowsGradWeight) {
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t v : {389, 1000}) {
      for (int64_t d : {39, 40}) {
        Case c;
        c.n = 53;
        c.v = v;
        c.d = d;
        c.dtype = t;
        c.options.z_loss = 1e-3f;
        c.seed = 31 + v + d;
        SCOPED_TRACE(c.describe());
        const Inputs in = make_inputs(c);
        PlanChoice choice;
        choice.manual = true;
        choice.plan.strategy = Strategy::kGradInForward;
        choice.plan.forward_token_chunk = 12;  // 5 chunks, the last one short
        choice.plan.dw_group_tokens = 12;
        Outputs out;
        ASSERT_TRUE(run_fused(c, in, choice, &out));
        expect_matches_reference(c, in, out);
      }
    }
  }
}

// Hand-made plans covering each chunked path of the driver.
struct ChunkParam {
  std::string name;
  Plan plan;
  DType dtype;
};

std::vector<ChunkParam> chunk_params() {
  std::vector<ChunkParam> out;
  for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const std::string dn = dtype_name(t);
    Plan p;
    p.strategy = Strategy::kGradInForward;
    p.forward_token_chunk = 17;  // dZ in place per chunk, dW accumulated over 5 chunks
    p.dw_group_tokens = 17;
    out.push_back({dn + "_gif_in_place_chunks", p, t});
    p.dw_group_tokens = 77;  // dZ of all tokens kept across 5 chunks, one dW GEMM
    out.push_back({dn + "_gif_group_all_tokens", p, t});
    p = Plan();
    p.strategy = Strategy::kRecompute;
    p.forward_token_chunk = 19;
    p.backward_token_chunk = 13;  // several token blocks and several vocabulary chunks
    p.backward_vocab_chunk = 37;
    out.push_back({dn + "_recompute_token_and_vocab_chunks", p, t});
    p.backward_token_chunk = 77;  // one token block, dZ in place, several vocabulary chunks
    out.push_back({dn + "_recompute_vocab_chunks", p, t});
    p.backward_token_chunk = 13;  // several token blocks, one vocabulary chunk
    p.backward_vocab_chunk = 211;
    out.push_back({dn + "_recompute_token_chunks", p, t});
    p.backward_order = BackwardOrder::kTokenOuter;  // dx per token chunk, dW over 6 token chunks
    p.backward_token_chunk = 13;
    p.backward_vocab_chunk = 37;
    out.push_back({dn + "_token_outer_token_and_vocab_chunks", p, t});
    p.backward_vocab_chunk = 211;  // one vocabulary chunk: dx written straight, no accumulator
    out.push_back({dn + "_token_outer_token_chunks", p, t});
    p.backward_token_chunk = 77;  // one token chunk: dW written once
    p.backward_vocab_chunk = 37;
    out.push_back({dn + "_token_outer_vocab_chunks", p, t});
    p.forward_vocab_chunk = 29;  // forward rows split into 8 vocabulary blocks (last one short)
    p.forward_token_chunk = 19;
    out.push_back({dn + "_recompute_split_forward_rows", p, t});
    // Compact blocks on a backend without fused GEMMs: the unfused path on narrower vocabulary
    // blocks (forward: merged across blocks; backward: half-width chunks) in the same bytes.
    p = Plan();
    p.strategy = Strategy::kRecompute;
    p.compact_backward_blocks = true;
    p.compact_forward_blocks = true;
    p.forward_token_chunk = 19;
    p.backward_token_chunk = 13;
    p.backward_vocab_chunk = 37;
    out.push_back({dn + "_compact_fallback_gathered", p, t});
    p.backward_order = BackwardOrder::kTokenOuter;
    out.push_back({dn + "_compact_fallback_token_outer", p, t});
    p.backward_order = BackwardOrder::kVocabOuter;
    p.backward_token_chunk = 77;  // one block of the whole problem: two chunks in the fallback
    p.backward_vocab_chunk = 211;
    out.push_back({dn + "_compact_fallback_one_block", p, t});
  }
  return out;
}

void PrintTo(const ChunkParam& p, std::ostream* os) { *os << p.name; }

class Chunked : public ::testing::TestWithParam<ChunkParam> {};

// D = 39, and D = 40: with 16-bit dx, the fp32 dx accumulator then borrows the end of dx itself
// (rows not yet written; the last token chunk's own rows hold half of it, converted in place).
TEST_P(Chunked, MatchesReference) {
  for (int64_t d : {39, 40}) {
    const ChunkParam& p = GetParam();
    Case c;
    c.n = 77;
    c.v = 211;
    c.d = d;
    c.dtype = p.dtype;
    c.bias = true;
    c.grad_bias = true;
    c.class_weights = true;
    c.options.label_smoothing = 0.1f;
    c.options.softcap = 7.0f;
    c.x_pad = 5;
    c.seed = 21;
    SCOPED_TRACE(c.describe());
    const Inputs in = make_inputs(c);
    PlanChoice choice;
    choice.manual = true;
    choice.plan = p.plan;
    Outputs out;
    ASSERT_TRUE(run_fused(c, in, choice, &out));
    expect_matches_reference(c, in, out);
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, Chunked, ::testing::ValuesIn(chunk_params()),
                         [](const ::testing::TestParamInfo<ChunkParam>& i) {
                           return i.param.name;
                         });

// Seeded random problems with hand-made plans (Fuzz in the harness): sizes off every tile (D a
// multiple of 8 half the time, where a 16-bit dx lends its memory to its accumulator), both
// strategies and backward orders, chunks from one row or column up, split forward rows, the
// compact blocks' fallback, and every option mixed. Each must match the float64 reference.
// 9600 cases from 12 other seeds passed when this was written.
TEST(FusedFuzz, RandomPlansMatchReference) {
  Fuzz fuzz(20261129);
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  for (int iter = 0; iter < 200; ++iter) {
    Case c;
    c.n = fuzz.uniform(1, 96);
    c.v = fuzz.uniform(2, 260);
    c.d = fuzz.coin(0.5) ? 8 * fuzz.uniform(1, 6) : fuzz.uniform(1, 47);
    c.dtype = dtypes[fuzz.uniform(0, 2)];
    fuzz.mix_options(&c);
    fuzz.mix_labels(&c);
    c.seed = 5000 + iter;
    PlanChoice choice;
    choice.manual = true;
    choice.plan = fuzz.plan_for(&c, 0.3);
    SCOPED_TRACE(c.describe() + ", case " + std::to_string(iter) + ": " +
                 describe_plan(choice.plan));
    const Inputs in = make_inputs(c);
    Outputs out;
    ASSERT_TRUE(run_fused(c, in, choice, &out));
    expect_matches_reference(c, in, out);
  }
}

// Budgets from roomy to the minimum: whatever the planner picks must match the reference.
TEST(FusedBudget, EveryBudgetMatchesReference) {
  Case c;
  c.n = 150;
  c.v = 301;
  c.d = 33;
  c.bias = true;
  c.grad_bias = true;
  c.dtype = DType::kBFloat16;
  c.seed = 31;
  const Inputs in = make_inputs(c);
  const Problem prob = make_problem(c);
  Plan roomy;
  ASSERT_TRUE(make_plan(prob, Device::kCpu, kRoomyBudget, Strategy::kAuto, &roomy).ok());
  const size_t min_budget = roomy.min_budget_bytes;
  for (Strategy s : {Strategy::kAuto, Strategy::kRecompute}) {
    for (double f : {1.0, 1.05, 1.2, 1.5, 2.0, 4.0}) {
      PlanChoice choice;
      choice.strategy = s;
      choice.budget = static_cast<size_t>(min_budget * f);
      SCOPED_TRACE("budget " + std::to_string(choice.budget) + " strategy " + strategy_name(s));
      Outputs out;
      ASSERT_TRUE(run_fused(c, in, choice, &out));
      expect_matches_reference(c, in, out);
    }
  }
}

}  // namespace
}  // namespace flce::test
