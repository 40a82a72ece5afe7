#include "harness.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>

#include "core/backend.h"
#include "core/workspace.h"
#include "cpu/cpu_half.h"

namespace flce::test {

using detail::cpu::bf16_to_float;
using detail::cpu::float_to_bf16;
using detail::cpu::float_to_half;
using detail::cpu::half_to_float;

TypedBuffer::TypedBuffer(DType type, int64_t count)
    : type_(type), count_(count), bytes_(static_cast<size_t>(count) * dtype_size(type)) {}

double TypedBuffer::get(int64_t i) const {
  uint16_t h;
  switch (type_) {
    case DType::kFloat16:
      std::memcpy(&h, bytes_.data() + 2 * i, 2);
      return half_to_float(h);
    case DType::kBFloat16:
      std::memcpy(&h, bytes_.data() + 2 * i, 2);
      return bf16_to_float(h);
    default: {
      float f;
      std::memcpy(&f, bytes_.data() + 4 * i, 4);
      return f;
    }
  }
}

void TypedBuffer::set(int64_t i, double v) {
  const float f = static_cast<float>(v);
  uint16_t h;
  switch (type_) {
    case DType::kFloat16:
      h = float_to_half(f);
      std::memcpy(bytes_.data() + 2 * i, &h, 2);
      break;
    case DType::kBFloat16:
      h = float_to_bf16(f);
      std::memcpy(bytes_.data() + 2 * i, &h, 2);
      break;
    default:
      std::memcpy(bytes_.data() + 4 * i, &f, 4);
      break;
  }
}

void TypedBuffer::poison() {
  for (int64_t i = 0; i < count_; ++i) set(i, std::numeric_limits<double>::quiet_NaN());
}

std::vector<double> TypedBuffer::to_double() const {
  std::vector<double> out(count_);
  for (int64_t i = 0; i < count_; ++i) out[i] = get(i);
  return out;
}

Workspace::Workspace(size_t bytes) : bytes_(bytes) {
  const size_t total = (bytes + kCanary + 255) / 256 * 256;
  base_ = static_cast<unsigned char*>(std::aligned_alloc(256, total));
  std::memset(base_, 0xff, bytes);  // NaN floats: nothing may rely on a zeroed workspace
  for (size_t i = 0; i < kCanary; ++i) base_[bytes + i] = static_cast<unsigned char>(0xa5 ^ i);
}

Workspace::~Workspace() { std::free(base_); }

bool Workspace::canary_intact() const {
  for (size_t i = 0; i < kCanary; ++i) {
    if (base_[bytes_ + i] != static_cast<unsigned char>(0xa5 ^ i)) return false;
  }
  return true;
}

std::string Case::describe() const {
  std::ostringstream s;
  s << "N=" << n << " V=" << v << " D=" << d << " dtype=" << dtype_name(dtype)
    << " reduction=" << static_cast<int>(options.reduction) << " eps=" << options.label_smoothing
    << " z_loss=" << options.z_loss << " softcap=" << options.softcap
    << " scale=" << options.logit_scale << " ignore_index=" << options.ignore_index
    << " bias=" << bias << " class_weights=" << class_weights << " int32=" << int32_labels
    << " x_pad=" << x_pad << " all_ignored=" << all_ignored << " grads(x,w,b,lse)=" << grad_x
    << grad_weight << grad_bias << grad_lse << " seed=" << seed;
  return s.str();
}

Inputs make_inputs(const Case& c) {
  std::mt19937_64 rng(c.seed * 7919 + 17);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  Inputs in;
  RefProblem& r = in.ref;
  r.n = c.n;
  r.v = c.v;
  r.d = c.d;
  r.options = c.options;

  in.x_stride = c.d + c.x_pad;
  in.x = TypedBuffer(c.dtype, std::max<int64_t>(c.n * in.x_stride, 1));
  in.x.poison();  // the padding stays NaN
  r.x.resize(c.n * c.d);
  for (int64_t i = 0; i < c.n; ++i) {
    for (int64_t k = 0; k < c.d; ++k) {
      in.x.set(i * in.x_stride + k, normal(rng));
      r.x[i * c.d + k] = in.x.get(i * in.x_stride + k);
    }
  }
  in.weight = TypedBuffer(c.dtype, c.v * c.d);
  r.weight.resize(c.v * c.d);
  const double wstd = c.logit_std / std::sqrt(static_cast<double>(c.d));
  for (int64_t j = 0; j < c.v * c.d; ++j) {
    in.weight.set(j, normal(rng) * wstd);
    r.weight[j] = in.weight.get(j);
  }
  if (c.bias) {
    in.bias = TypedBuffer(c.dtype, c.v);
    r.bias.resize(c.v);
    for (int64_t j = 0; j < c.v; ++j) {
      in.bias.set(j, 0.7 * normal(rng));
      r.bias[j] = in.bias.get(j);
    }
  }
  if (c.class_weights) {
    in.class_weight.resize(c.v);
    r.class_weight.resize(c.v);
    for (int64_t j = 0; j < c.v; ++j) {
      in.class_weight[j] = static_cast<float>(0.25 + 1.75 * uniform(rng));
      if (j % 11 == 5) in.class_weight[j] = 0.0f;  // a zero weight is legal
      r.class_weight[j] = in.class_weight[j];
    }
  }
  r.labels.resize(c.n);
  for (int64_t i = 0; i < c.n; ++i) {
    int64_t y = static_cast<int64_t>(uniform(rng) * c.v) % c.v;
    if (y == c.options.ignore_index) y = (y + 1) % c.v;
    const bool ignored =
        c.all_ignored || (c.ignore_fraction > 0 && (i == 1 || uniform(rng) < c.ignore_fraction));
    r.labels[i] = ignored ? c.options.ignore_index : y;
  }
  if (c.n > 0 && !c.all_ignored && r.labels[0] == c.options.ignore_index) r.labels[0] = 0;
  if (c.int32_labels) {
    in.labels32.assign(r.labels.begin(), r.labels.end());
  } else {
    in.labels64 = r.labels;
  }

  if (c.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < c.n; ++i)
      in.grad_loss.push_back(static_cast<float>(uniform(rng) * 2.5 - 1.0));
  } else {
    in.grad_loss.push_back(0.75f);
  }
  if (c.grad_lse) {
    for (int64_t i = 0; i < c.n; ++i) in.grad_lse.push_back(static_cast<float>(0.3 * normal(rng)));
  }
  in.up.grad_loss.assign(in.grad_loss.begin(), in.grad_loss.end());
  in.up.grad_lse.assign(in.grad_lse.begin(), in.grad_lse.end());
  return in;
}

Problem make_problem(const Case& c) {
  Problem p;
  p.num_tokens = c.n;
  p.vocab_size = c.v;
  p.hidden_size = c.d;
  p.dtype = c.dtype;
  p.reduction = c.options.reduction;
  p.has_bias = c.bias;
  p.needs_grad_x = c.grad_x;
  p.needs_grad_weight = c.grad_weight;
  p.needs_grad_bias = c.grad_bias && c.bias;
  p.needs_grad_lse = c.grad_lse;
  p.has_softcap = c.options.softcap > 0.0f;
  p.has_weighted_smoothing = c.class_weights && c.options.label_smoothing > 0.0f;
  return p;
}

ForwardParams forward_inputs(const Case& c, const Inputs& in) {
  ForwardParams f;
  f.x = in.x.data();
  f.x_row_stride = in.x_stride;
  f.weight = in.weight.data();
  f.bias = c.bias ? in.bias.data() : nullptr;
  f.labels = in.labels();
  f.label_type = in.label_type();
  f.class_weight = c.class_weights ? in.class_weight.data() : nullptr;
  f.num_tokens = c.n;
  f.vocab_size = c.v;
  f.hidden_size = c.d;
  f.dtype = c.dtype;
  f.options = c.options;
  return f;
}

bool run_fused(const Case& c, const Inputs& in, const PlanChoice& choice, Outputs* out) {
  const Problem prob = make_problem(c);
  Plan plan;
  if (choice.manual) {
    plan = choice.plan;
    const detail::BackendTraits traits = detail::backend_traits(Device::kCpu);
    plan.forward_workspace_bytes = detail::forward_layout(prob, plan, traits).total;
    plan.backward_workspace_bytes = detail::backward_layout(prob, plan, traits).total;
  } else {
    const Status s = make_plan(prob, Device::kCpu, choice.budget, choice.strategy, &plan);
    if (!s.ok()) {
      ADD_FAILURE() << "make_plan failed: " << s.message;
      return false;
    }
    EXPECT_LE(std::max(plan.forward_workspace_bytes, plan.backward_workspace_bytes), choice.budget);
  }
  out->plan = plan;
  const bool gif = plan.strategy == Strategy::kGradInForward;
  const bool any_grad = prob.needs_grad_x || prob.needs_grad_weight || prob.needs_grad_bias;
  out->has_grads = any_grad;

  out->loss.assign(c.options.reduction == Reduction::kNone ? std::max<int64_t>(c.n, 1) : 1, NAN);
  out->lse.assign(std::max<int64_t>(c.n, 1), NAN);
  out->metrics.assign(kNumMetrics, NAN);
  out->dx = TypedBuffer(c.dtype, c.n * c.d);
  out->dw = TypedBuffer(c.dtype, c.v * c.d);
  out->db = TypedBuffer(c.dtype, c.v);
  out->dx.poison();
  out->dw.poison();
  out->db.poison();

  ForwardParams f = forward_inputs(c, in);
  f.loss = out->loss.data();
  f.lse = out->lse.data();
  f.metrics = out->metrics.data();
  if (gif) {
    f.grad_x = prob.needs_grad_x ? out->dx.data() : nullptr;
    f.grad_weight = prob.needs_grad_weight ? out->dw.data() : nullptr;
    f.grad_bias = prob.needs_grad_bias ? out->db.data() : nullptr;
  }
  f.plan = plan;
  Workspace fws(plan.forward_workspace_bytes);
  f.workspace = fws.data();
  f.workspace_bytes = fws.bytes();
  const Status fs = forward(Device::kCpu, f);
  if (!fs.ok()) {
    ADD_FAILURE() << "forward failed: " << fs.message;
    return false;
  }
  EXPECT_TRUE(fws.canary_intact()) << "forward wrote past its workspace";

  if (!gif && any_grad) {
    BackwardParams b;
    b.x = f.x;
    b.x_row_stride = f.x_row_stride;
    b.weight = f.weight;
    b.bias = f.bias;
    b.labels = f.labels;
    b.label_type = f.label_type;
    b.class_weight = f.class_weight;
    b.num_tokens = c.n;
    b.vocab_size = c.v;
    b.hidden_size = c.d;
    b.dtype = c.dtype;
    b.options = c.options;
    b.lse = out->lse.data();
    b.grad_loss = in.grad_loss.data();
    b.grad_lse = c.grad_lse ? in.grad_lse.data() : nullptr;
    b.grad_x = prob.needs_grad_x ? out->dx.data() : nullptr;
    b.grad_weight = prob.needs_grad_weight ? out->dw.data() : nullptr;
    b.grad_bias = prob.needs_grad_bias ? out->db.data() : nullptr;
    b.plan = plan;
    Workspace bws(plan.backward_workspace_bytes);
    b.workspace = bws.data();
    b.workspace_bytes = bws.bytes();
    const Status bs = backward(Device::kCpu, b);
    if (!bs.ok()) {
      ADD_FAILURE() << "backward failed: " << bs.message;
      return false;
    }
    EXPECT_TRUE(bws.canary_intact()) << "backward wrote past its workspace";
  }
  return true;
}

Tolerance tolerance_for(DType dtype) {
  // Inputs are exact in fp32 after their rounding, so loss, lse and metrics carry fp32 error
  // only. Gradients are rounded once into the output dtype: half an ulp of it, element-wise.
  switch (dtype) {
    case DType::kFloat16:
      return {2e-5, 1.0 / 1024};
    case DType::kBFloat16:
      return {2e-5, 1.0 / 256};
    default:
      return {2e-5, 3e-5};
  }
}

void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& ref, double norm_rtol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double diff2 = 0.0, ref2 = 0.0, ref_max = 0.0;
  int64_t worst = -1;
  double worst_err = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << " is not finite (not written?)";
      return;
    }
    const double e = std::abs(got[i] - ref[i]);
    diff2 += e * e;
    ref2 += ref[i] * ref[i];
    ref_max = std::max(ref_max, std::abs(ref[i]));
    if (e > worst_err) {
      worst_err = e;
      worst = static_cast<int64_t>(i);
    }
  }
  if (ref2 == 0.0) {
    EXPECT_EQ(diff2, 0.0) << what << ": the reference is exactly zero, so must the result be";
    return;
  }
  const double rel = std::sqrt(diff2 / ref2);
  EXPECT_LE(rel, norm_rtol) << what << ": norm-wise relative error " << rel << ", worst element ["
                            << worst << "] got " << got[worst] << " want " << ref[worst];
  // Element-wise: no single element far off even when the norm hides it.
  EXPECT_LE(worst_err, 8.0 * norm_rtol * ref_max + 1e-30)
      << what << "[" << worst << "] got " << got[worst] << " want " << ref[worst] << " (max |ref| "
      << ref_max << ")";
}

namespace {

void expect_scalar(const std::string& what, double got, double ref, double rtol) {
  EXPECT_TRUE(std::isfinite(got)) << what << " = " << got << " is not finite";
  EXPECT_NEAR(got, ref, rtol * std::max(1.0, std::abs(ref))) << what;
}

}  // namespace

void expect_matches_reference(const Case& c, const Inputs& in, const Outputs& out) {
  const Tolerance tol = tolerance_for(c.dtype);
  const RefForward f = reference_forward(in.ref);
  if (c.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < c.n; ++i) {
      expect_scalar("loss[" + std::to_string(i) + "]", out.loss[i], f.row_loss[i], tol.loss);
      if (in.ref.labels[i] == c.options.ignore_index) {
        EXPECT_EQ(out.loss[i], 0.0f) << "ignored row " << i << " must have loss exactly 0";
      }
    }
  } else {
    expect_scalar("loss", out.loss[0], f.loss, tol.loss);
  }
  for (int64_t i = 0; i < c.n; ++i) {
    expect_scalar("lse[" + std::to_string(i) + "]", out.lse[i], f.lse[i], tol.loss);
  }
  const double valid = f.metrics[kMetricValidTokens];
  EXPECT_EQ(out.metrics[kMetricValidTokens], valid);
  expect_scalar("metric max_logit", out.metrics[kMetricMaxLogit], f.metrics[kMetricMaxLogit],
                tol.loss);
  expect_scalar("metric logit_norm", out.metrics[kMetricLogitNorm], f.metrics[kMetricLogitNorm],
                tol.loss);
  expect_scalar("metric entropy", out.metrics[kMetricEntropy], f.metrics[kMetricEntropy],
                10 * tol.loss);
  expect_scalar("metric lse_squared", out.metrics[kMetricLseSquared], f.metrics[kMetricLseSquared],
                tol.loss);
  // An argmax may flip on a near tie between fp32 and fp64 logits: allow one row.
  EXPECT_NEAR(out.metrics[kMetricAccuracy], f.metrics[kMetricAccuracy],
              valid > 0 ? 1.01 / valid : 0.0);

  if (!out.has_grads) return;
  RefUpstream up = in.up;
  if (out.plan.strategy == Strategy::kGradInForward) {
    up.grad_loss = {1.0};
    up.grad_lse.clear();
  }
  const RefGrads g = reference_backward(in.ref, up);
  if (c.grad_x) expect_close("dx", out.dx.to_double(), g.dx, tol.grad);
  if (c.grad_weight) expect_close("dW", out.dw.to_double(), g.dw, tol.grad);
  if (c.grad_bias && c.bias) expect_close("db", out.db.to_double(), g.db, tol.grad);
}

int64_t Fuzz::uniform(int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
}

bool Fuzz::coin(double p) { return std::bernoulli_distribution(p)(rng_); }

void Fuzz::mix_options(Case* c) {
  c->bias = coin(0.3);
  c->grad_bias = c->bias && coin(0.7);
  c->class_weights = coin(0.3);
  c->int32_labels = coin(0.3);
  c->x_pad = coin(0.5) ? uniform(1, 9) : 0;
  c->options.label_smoothing = coin(0.3) ? 0.1f : 0.0f;
  c->options.z_loss = coin(0.3) ? 1e-3f : 0.0f;
  c->options.softcap = coin(0.3) ? 9.0f : 0.0f;
  c->options.logit_scale = coin(0.3) ? 0.7f : 1.0f;
}

void Fuzz::mix_labels(Case* c) {
  c->ignore_fraction = coin(0.2) ? 0.0 : 0.15;
  c->all_ignored = coin(0.05);
  c->options.reduction = coin(0.5) ? Reduction::kMean : Reduction::kSum;
}

Plan Fuzz::plan_for(Case* c, double compact_p) {
  Plan p;
  if (coin(0.4)) {
    p.strategy = Strategy::kGradInForward;
    p.forward_token_chunk = uniform(1, c->n);
    p.dw_group_tokens = coin(0.5) ? p.forward_token_chunk : c->n;
    p.compact_forward_blocks = coin(compact_p);
    if (p.compact_forward_blocks) p.shifted_terms = coin(0.5);
    return p;
  }
  p.strategy = Strategy::kRecompute;
  if (coin(0.2)) c->options.reduction = Reduction::kNone;
  c->grad_lse = coin(0.2);
  p.forward_token_chunk = uniform(1, c->n);
  p.forward_vocab_chunk = coin(0.35) ? uniform(1, c->v) : 0;
  p.compact_forward_blocks = coin(compact_p);
  p.compact_backward_blocks = coin(compact_p);
  p.backward_order = coin(0.5) ? BackwardOrder::kTokenOuter : BackwardOrder::kVocabOuter;
  const bool rounded_dw =
      p.backward_order == BackwardOrder::kTokenOuter && c->dtype != DType::kFloat32;
  p.backward_token_chunk = uniform(rounded_dw ? (c->n + 1) / 2 : 1, c->n);
  p.backward_vocab_chunk = uniform(1, c->v);
  return p;
}

std::string describe_plan(const Plan& p) {
  std::ostringstream s;
  s << (p.strategy == Strategy::kGradInForward ? "grad_in_forward" : "recompute") << " fwd "
    << p.forward_token_chunk << "x" << p.forward_vocab_chunk << " dw_group " << p.dw_group_tokens
    << " bwd " << p.backward_token_chunk << "x" << p.backward_vocab_chunk
    << (p.backward_order == BackwardOrder::kTokenOuter ? " token_outer" : " vocab_outer")
    << (p.compact_forward_blocks ? " compact_fwd" : "")
    << (p.compact_backward_blocks ? " compact_bwd" : "")
    << (p.shifted_terms ? " shifted_terms" : "") << " fused_logits "
    << static_cast<int>(p.fused_logits);
  return s.str();
}

}  // namespace flce::test
