// Bad input: every invalid argument is refused with a status whose message names it (and, where
// there is one, its value), and nothing is thrown.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/workspace.h"
#include "harness.h"

namespace flce::test {
namespace {

void expect_error(const Status& s, StatusCode code, const std::vector<std::string>& needles) {
  EXPECT_EQ(s.code, code) << s.message;
  for (const std::string& n : needles) {
    EXPECT_NE(s.message.find(n), std::string::npos)
        << "message \"" << s.message << "\" does not mention \"" << n << "\"";
  }
}

// A valid small problem and its calls; each test breaks one thing.
class BadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    c_.n = 21;
    c_.v = 53;
    c_.d = 17;
    c_.bias = true;
    c_.grad_bias = true;
    c_.class_weights = true;
    in_ = make_inputs(c_);
    loss_.assign(1, NAN);
    logits_.assign(c_.n * c_.v, 0.5f);
    for (size_t i = 0; i < logits_.size(); ++i) logits_[i] = static_cast<float>(std::sin(0.37 * i));
    lse_.assign(c_.n, NAN);
    dx_ = TypedBuffer(c_.dtype, c_.n * c_.d);
    dw_ = TypedBuffer(c_.dtype, c_.v * c_.d);
    db_ = TypedBuffer(c_.dtype, c_.v);
    ASSERT_TRUE(
        make_plan(make_problem(c_), Device::kCpu, kRoomyBudget, Strategy::kRecompute, &recompute_)
            .ok());
    ASSERT_TRUE(
        make_plan(make_problem(c_), Device::kCpu, kRoomyBudget, Strategy::kGradInForward, &gif_)
            .ok());
    ws_ = std::make_unique<Workspace>(
        std::max({recompute_.forward_workspace_bytes, recompute_.backward_workspace_bytes,
                  gif_.forward_workspace_bytes, logits_workspace_bytes(c_.n)}));
  }

  ForwardParams forward_params(const Plan& plan) {
    ForwardParams f = forward_inputs(c_, in_);
    f.loss = loss_.data();
    f.lse = lse_.data();
    f.plan = plan;
    f.workspace = ws_->data();
    f.workspace_bytes = ws_->bytes();
    return f;
  }

  BackwardParams backward_params() {
    BackwardParams b;
    b.x = in_.x.data();
    b.x_row_stride = in_.x_stride;
    b.weight = in_.weight.data();
    b.bias = in_.bias.data();
    b.labels = in_.labels();
    b.label_type = in_.label_type();
    b.class_weight = in_.class_weight.data();
    b.num_tokens = c_.n;
    b.vocab_size = c_.v;
    b.hidden_size = c_.d;
    b.options = c_.options;
    b.lse = lse_.data();
    b.grad_loss = in_.grad_loss.data();
    b.grad_x = dx_.data();
    b.grad_weight = dw_.data();
    b.grad_bias = db_.data();
    b.plan = recompute_;
    b.workspace = ws_->data();
    b.workspace_bytes = ws_->bytes();
    return b;
  }

  LogitsParams logits_params() {
    LogitsParams l;
    l.logits = logits_.data();
    l.logits_row_stride = c_.v;
    l.labels = in_.labels();
    l.label_type = in_.label_type();
    l.num_tokens = c_.n;
    l.vocab_size = c_.v;
    l.loss = loss_.data();
    l.workspace = ws_->data();
    l.workspace_bytes = ws_->bytes();
    return l;
  }

  Status fwd(const std::function<void(ForwardParams&)>& edit, bool gif = false) {
    ForwardParams f = forward_params(gif ? gif_ : recompute_);
    if (gif) {
      f.grad_x = dx_.data();
      f.grad_weight = dw_.data();
      f.grad_bias = db_.data();
    }
    edit(f);
    return forward(Device::kCpu, f);
  }
  Status bwd(const std::function<void(BackwardParams&)>& edit) {
    BackwardParams b = backward_params();
    edit(b);
    return backward(Device::kCpu, b);
  }
  Status lgt(const std::function<void(LogitsParams&)>& edit) {
    LogitsParams l = logits_params();
    edit(l);
    return cross_entropy_logits(Device::kCpu, l);
  }

  Case c_;
  Inputs in_;
  std::vector<float> loss_, lse_, logits_;
  TypedBuffer dx_, dw_, db_;
  Plan recompute_, gif_;
  std::unique_ptr<Workspace> ws_;
};

constexpr StatusCode kInvalid = StatusCode::kInvalidArgument;

TEST_F(BadInput, ValidCallsSucceed) {
  EXPECT_TRUE(fwd([](ForwardParams&) {}).ok());
  EXPECT_TRUE(bwd([](BackwardParams&) {}).ok());
  EXPECT_TRUE(fwd([](ForwardParams&) {}, true).ok());
  EXPECT_TRUE(lgt([](LogitsParams&) {}).ok());
}

TEST_F(BadInput, NullPointers) {
  expect_error(fwd([](ForwardParams& f) { f.x = nullptr; }), kInvalid, {"x must not be null"});
  expect_error(fwd([](ForwardParams& f) { f.weight = nullptr; }), kInvalid, {"weight"});
  expect_error(fwd([](ForwardParams& f) { f.labels = nullptr; }), kInvalid, {"labels"});
  expect_error(fwd([](ForwardParams& f) { f.loss = nullptr; }), kInvalid, {"loss"});
  expect_error(fwd([](ForwardParams& f) { f.workspace = nullptr; }), kInvalid, {"workspace"});
  expect_error(bwd([](BackwardParams& b) { b.lse = nullptr; }), kInvalid, {"lse"});
  expect_error(bwd([](BackwardParams& b) { b.grad_loss = nullptr; }), kInvalid, {"grad_loss"});
  expect_error(bwd([](BackwardParams& b) { b.x = nullptr; }), kInvalid, {"x must not be null"});
  expect_error(lgt([](LogitsParams& l) { l.logits = nullptr; }), kInvalid, {"logits"});
  expect_error(lgt([](LogitsParams& l) { l.labels = nullptr; }), kInvalid, {"labels"});
  expect_error(lgt([](LogitsParams& l) { l.loss = nullptr; }), kInvalid, {"loss"});
  Problem p = make_problem(c_);
  expect_error(make_plan(p, Device::kCpu, kRoomyBudget, Strategy::kAuto, nullptr), kInvalid,
               {"plan"});
}

TEST_F(BadInput, SizesAndStrides) {
  expect_error(fwd([](ForwardParams& f) { f.x_row_stride = 3; }), kInvalid,
               {"x_row_stride", "got 3", "17"});
  expect_error(fwd([](ForwardParams& f) { f.num_tokens = -4; }), kInvalid, {"num_tokens", "-4"});
  expect_error(fwd([](ForwardParams& f) { f.vocab_size = 0; }), kInvalid, {"vocab_size", "0"});
  expect_error(fwd([](ForwardParams& f) { f.hidden_size = 0; }), kInvalid, {"hidden_size"});
  expect_error(bwd([](BackwardParams& b) { b.x_row_stride = 2; }), kInvalid, {"x_row_stride"});
  expect_error(lgt([](LogitsParams& l) { l.logits_row_stride = 9; }), kInvalid,
               {"logits_row_stride", "got 9"});
  expect_error(lgt([&](LogitsParams& l) {
                 l.grad_logits = dx_.data();
                 l.grad_row_stride = 1;
               }),
               kInvalid, {"grad_row_stride", "got 1"});
  Problem p = make_problem(c_);
  Plan plan;
  p.hidden_size = -1;
  expect_error(make_plan(p, Device::kCpu, kRoomyBudget, Strategy::kAuto, &plan), kInvalid,
               {"hidden_size", "-1"});
  p = make_problem(c_);
  p.has_bias = false;
  expect_error(make_plan(p, Device::kCpu, kRoomyBudget, Strategy::kAuto, &plan), kInvalid,
               {"needs_grad_bias"});
}

TEST_F(BadInput, Options) {
  expect_error(fwd([](ForwardParams& f) { f.options.label_smoothing = NAN; }), kInvalid,
               {"label_smoothing", "nan"});
  expect_error(fwd([](ForwardParams& f) { f.options.label_smoothing = 1.5f; }), kInvalid,
               {"label_smoothing", "1.5"});
  expect_error(fwd([](ForwardParams& f) { f.options.label_smoothing = -0.1f; }), kInvalid,
               {"label_smoothing"});
  expect_error(fwd([](ForwardParams& f) { f.options.z_loss = -1.0f; }), kInvalid, {"z_loss", "-1"});
  expect_error(fwd([](ForwardParams& f) { f.options.z_loss = INFINITY; }), kInvalid, {"z_loss"});
  expect_error(fwd([](ForwardParams& f) { f.options.softcap = -2.0f; }), kInvalid,
               {"softcap", "-2"});
  expect_error(fwd([](ForwardParams& f) { f.options.softcap = NAN; }), kInvalid, {"softcap"});
  expect_error(fwd([](ForwardParams& f) { f.options.logit_scale = INFINITY; }), kInvalid,
               {"logit_scale", "inf"});
  expect_error(bwd([](BackwardParams& b) { b.options.logit_scale = NAN; }), kInvalid,
               {"logit_scale"});
  expect_error(lgt([](LogitsParams& l) { l.options.z_loss = -3.0f; }), kInvalid, {"z_loss"});
}

TEST_F(BadInput, Enums) {
  expect_error(fwd([](ForwardParams& f) { f.dtype = static_cast<DType>(9); }), kInvalid, {"dtype"});
  expect_error(fwd([](ForwardParams& f) { f.label_type = static_cast<IndexType>(5); }), kInvalid,
               {"label_type"});
  expect_error(fwd([](ForwardParams& f) { f.options.reduction = static_cast<Reduction>(7); }),
               kInvalid, {"reduction", "7"});
  expect_error(lgt([](LogitsParams& l) { l.dtype = static_cast<DType>(-1); }), kInvalid, {"dtype"});
  ForwardParams f = forward_params(recompute_);
  expect_error(forward(static_cast<Device>(3), f), kInvalid, {"device"});
  if (!cuda_available()) {
    EXPECT_EQ(forward(Device::kCuda, f).code, StatusCode::kNotCompiled);
    Plan plan;
    EXPECT_EQ(make_plan(make_problem(c_), Device::kCuda, kRoomyBudget, Strategy::kAuto, &plan).code,
              StatusCode::kNotCompiled);
  }
}

TEST_F(BadInput, Labels) {
  std::vector<int64_t> labels = in_.labels64;
  labels[3] = 53 + 7;
  expect_error(fwd([&](ForwardParams& f) { f.labels = labels.data(); }), kInvalid,
               {"labels[3] = 60", "[0, 53)", "ignore_index (-100)"});
  labels[3] = -5;
  expect_error(bwd([&](BackwardParams& b) { b.labels = labels.data(); }), kInvalid,
               {"labels[3] = -5"});
  expect_error(lgt([&](LogitsParams& l) { l.labels = labels.data(); }), kInvalid,
               {"labels[3] = -5"});
  std::vector<int32_t> labels32(in_.labels64.begin(), in_.labels64.end());
  labels32[17] = 70000;
  expect_error(fwd([&](ForwardParams& f) {
                 f.labels = labels32.data();
                 f.label_type = IndexType::kInt32;
               }),
               kInvalid, {"labels[17] = 70000"});
}

TEST_F(BadInput, ClassWeights) {
  std::vector<float> w = in_.class_weight;
  w[3] = -1.0f;
  expect_error(fwd([&](ForwardParams& f) { f.class_weight = w.data(); }), kInvalid,
               {"class_weight[3] = -1"});
  w[3] = 1.0f;
  w[4] = NAN;
  expect_error(bwd([&](BackwardParams& b) { b.class_weight = w.data(); }), kInvalid,
               {"class_weight[4] = nan"});
  w[4] = INFINITY;
  expect_error(lgt([&](LogitsParams& l) { l.class_weight = w.data(); }), kInvalid,
               {"class_weight[4] = inf"});
}

TEST_F(BadInput, Workspace) {
  const size_t need = recompute_.forward_workspace_bytes;
  expect_error(fwd([&](ForwardParams& f) { f.workspace_bytes = need - 1; }), kInvalid,
               {"workspace_bytes", std::to_string(need - 1), std::to_string(need)});
  expect_error(fwd([&](ForwardParams& f) { f.workspace = static_cast<char*>(f.workspace) + 16; }),
               kInvalid, {"aligned"});
  expect_error(bwd([](BackwardParams& b) { b.workspace_bytes = 8; }), kInvalid,
               {"workspace_bytes"});
  expect_error(lgt([](LogitsParams& l) { l.workspace_bytes = 0; }), kInvalid, {"workspace_bytes"});
}

TEST_F(BadInput, StrategyMismatch) {
  // Gradients asked of a recompute forward.
  expect_error(fwd([&](ForwardParams& f) { f.grad_x = dx_.data(); }), kInvalid,
               {"grad_in_forward"});
  // A grad-in-forward plan given to backward.
  expect_error(bwd([&](BackwardParams& b) { b.plan = gif_; }), kInvalid, {"recompute"});
  expect_error(fwd([](ForwardParams& f) { f.bias = nullptr; }, true), kInvalid, {"grad_bias"});
  expect_error(bwd([](BackwardParams& b) { b.bias = nullptr; }), kInvalid, {"grad_bias"});
  expect_error(fwd([](ForwardParams& f) { f.options.reduction = Reduction::kNone; }, true),
               kInvalid, {"reduction"});
  expect_error(fwd([](ForwardParams& f) { f.plan.forward_token_chunk = 0; }), kInvalid,
               {"forward_token_chunk"});
  expect_error(fwd([](ForwardParams& f) { f.plan.dw_group_tokens = 2; }, true), kInvalid,
               {"dw_group_tokens"});
  expect_error(bwd([](BackwardParams& b) { b.plan.backward_vocab_chunk = 0; }), kInvalid,
               {"backward_vocab_chunk"});
  expect_error(
      bwd([](BackwardParams& b) { b.plan.backward_order = static_cast<BackwardOrder>(4); }),
      kInvalid, {"backward_order", "4"});
  expect_error(fwd([](ForwardParams& f) { f.plan.forward_vocab_chunk = -3; }), kInvalid,
               {"forward_vocab_chunk", "-3"});
  // Split rows cannot give dZ: the gradient needs each row's LSE first.
  expect_error(fwd([](ForwardParams& f) { f.plan.forward_vocab_chunk = 10; }, true), kInvalid,
               {"forward_vocab_chunk", "gradients"});
  expect_error(fwd([](ForwardParams& f) { f.plan.gemm_scratch_bytes = 100; }), kInvalid,
               {"gemm_scratch_bytes", "got 100"});

  Problem p = make_problem(c_);
  Plan plan;
  p.reduction = Reduction::kNone;
  expect_error(make_plan(p, Device::kCpu, kRoomyBudget, Strategy::kGradInForward, &plan), kInvalid,
               {"grad_in_forward"});
  p = make_problem(c_);
  p.needs_grad_lse = true;
  expect_error(make_plan(p, Device::kCpu, kRoomyBudget, Strategy::kGradInForward, &plan), kInvalid,
               {"lse"});
}

// Grad-in-forward with 16-bit W keeps half of its fp32 dW accumulator in grad_weight's own
// memory, so grad_weight must be 16-byte aligned there (the PyTorch op allocates it so).
TEST(BadInputAlignment, GradWeightHoldingTheDwAccumulator) {
  Case c;
  c.n = 20;
  c.v = 389;  // 128 accumulator rows in grad_weight (dw_accumulator_borrowed_rows)
  c.d = 16;
  c.dtype = DType::kBFloat16;
  const Inputs in = make_inputs(c);
  Plan plan;
  plan.strategy = Strategy::kGradInForward;
  plan.forward_token_chunk = 8;  // 3 chunks: dW accumulates
  plan.dw_group_tokens = 8;
  const Problem prob = make_problem(c);
  plan.forward_workspace_bytes =
      detail::forward_layout(prob, plan, detail::backend_traits(Device::kCpu)).total;
  std::vector<float> loss(1, NAN);
  TypedBuffer dx(c.dtype, c.n * c.d), dw(c.dtype, c.v * c.d + 8);
  Workspace ws(plan.forward_workspace_bytes);
  ForwardParams f = forward_inputs(c, in);
  f.loss = loss.data();
  f.grad_x = dx.data();
  f.plan = plan;
  f.workspace = ws.data();
  f.workspace_bytes = ws.bytes();
  // 2 bytes past a 16-byte boundary (the buffer's own alignment is at least 16).
  ASSERT_EQ(reinterpret_cast<uintptr_t>(dw.data()) % 16, 0u);
  f.grad_weight = static_cast<char*>(dw.data()) + 2;
  expect_error(forward(Device::kCpu, f), kInvalid, {"grad_weight", "16-byte aligned"});
  f.grad_weight = static_cast<char*>(dw.data()) + 16;
  EXPECT_TRUE(forward(Device::kCpu, f).ok());
}

}  // namespace
}  // namespace flce::test
