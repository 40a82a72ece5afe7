// The PyTorch binding: the only C++ file that includes torch. Each op checks its inputs,
// allocates outputs and the workspace, fills the core's params, takes the current stream and
// calls the core (include/flce/flce.h). Autograd, fake (meta) kernels and the user-facing API
// live in Python (flce/_ops.py, flce/functional.py).
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "flce/flce.h"

#if FLCE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

// An importable, empty module: `import flce._C` loads this library, whose static initializers
// register the ops under torch.ops.flce.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace flce::binding {
namespace {

constexpr size_t kWorkspaceAlignment = 256;

// The plan travels between Python and the ops as an int list in this order.
enum PlanField : int64_t {
  kPlanStrategy = 0,
  kPlanForwardTokenChunk = 1,
  kPlanDwGroupTokens = 2,
  kPlanBackwardTokenChunk = 3,
  kPlanBackwardVocabChunk = 4,
  kPlanForwardWorkspaceBytes = 5,
  kPlanBackwardWorkspaceBytes = 6,
  kPlanMinBudgetBytes = 7,
  kPlanForwardVocabChunk = 8,
  kPlanBackwardOrder = 9,
  kPlanGemmScratchBytes = 10,
  kPlanFusedLogits = 11,
  kPlanCompactBackwardBlocks = 12,
  kPlanCompactForwardBlocks = 13,
  kPlanShiftedTerms = 14,
  kPlanFields = 15,
};

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_status(const Status& s) {
  if (s.ok()) return;
  switch (s.code) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kBudgetTooSmall:
      TORCH_CHECK_VALUE(false, "flce: ", s.message);
    case StatusCode::kNotCompiled:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "flce: ", s.message);
    default:
      TORCH_CHECK(false, "flce: ", s.message);
  }
}

DType to_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, arg, ": expected dtype float32, float16 or bfloat16, got ", t);
  }
}

Device to_device(const at::Device& d, const char* arg) {
  if (d.is_cpu()) return Device::kCpu;
  if (d.is_cuda()) return Device::kCuda;
  TORCH_CHECK_VALUE(false, arg, ": expected a cpu or cuda tensor, got device ", d);
}

Reduction to_reduction(int64_t r) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2, "reduction: expected 0 (mean), 1 (sum) or 2 (none), got ", r);
  return static_cast<Reduction>(r);
}

LossOptions make_options(int64_t ignore_index, int64_t reduction, double label_smoothing,
                         double z_loss, double softcap, double logit_scale) {
  LossOptions o;
  o.ignore_index = ignore_index;
  o.reduction = to_reduction(reduction);
  o.label_smoothing = static_cast<float>(label_smoothing);
  o.z_loss = static_cast<float>(z_loss);
  o.softcap = static_cast<float>(softcap);
  o.logit_scale = static_cast<float>(logit_scale);
  return o;
}

Plan to_plan(c10::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == kPlanFields, "plan: expected ", int64_t(kPlanFields),
                    " integers (from torch.ops.flce.plan), got ", v.size());
  for (int64_t x : v) TORCH_CHECK_VALUE(x >= 0, "plan: expected non-negative entries, got ", v);
  Plan p;
  p.strategy = static_cast<Strategy>(v[kPlanStrategy]);
  p.forward_token_chunk = v[kPlanForwardTokenChunk];
  p.dw_group_tokens = v[kPlanDwGroupTokens];
  p.backward_token_chunk = v[kPlanBackwardTokenChunk];
  p.backward_vocab_chunk = v[kPlanBackwardVocabChunk];
  p.forward_workspace_bytes = static_cast<size_t>(v[kPlanForwardWorkspaceBytes]);
  p.backward_workspace_bytes = static_cast<size_t>(v[kPlanBackwardWorkspaceBytes]);
  p.min_budget_bytes = static_cast<size_t>(v[kPlanMinBudgetBytes]);
  p.forward_vocab_chunk = v[kPlanForwardVocabChunk];
  p.backward_order = static_cast<BackwardOrder>(v[kPlanBackwardOrder]);
  p.gemm_scratch_bytes = static_cast<size_t>(v[kPlanGemmScratchBytes]);
  TORCH_CHECK_VALUE(v[kPlanFusedLogits] <= 2,
                    "plan: fused_logits must be 0 (off), 1 (auto) or 2 (always), got ",
                    v[kPlanFusedLogits]);
  p.fused_logits = static_cast<FusedLogits>(v[kPlanFusedLogits]);
  TORCH_CHECK_VALUE(v[kPlanCompactBackwardBlocks] <= 1,
                    "plan: compact_backward_blocks must be 0 or 1, got ",
                    v[kPlanCompactBackwardBlocks]);
  p.compact_backward_blocks = v[kPlanCompactBackwardBlocks] == 1;
  TORCH_CHECK_VALUE(v[kPlanCompactForwardBlocks] <= 1,
                    "plan: compact_forward_blocks must be 0 or 1, got ",
                    v[kPlanCompactForwardBlocks]);
  p.compact_forward_blocks = v[kPlanCompactForwardBlocks] == 1;
  TORCH_CHECK_VALUE(v[kPlanShiftedTerms] <= 1, "plan: shifted_terms must be 0 or 1, got ",
                    v[kPlanShiftedTerms]);
  p.shifted_terms = v[kPlanShiftedTerms] == 1;
  return p;
}

void* current_stream(const at::Device& d) {
#if FLCE_WITH_CUDA
  if (d.is_cuda()) return at::cuda::getCurrentCUDAStream(d.index()).stream();
#endif
  (void)d;
  return nullptr;
}

bool allow_tf32() { return at::globalContext().allowTF32CuBLAS(); }

// The workspace comes from torch's allocator (the caching allocator on CUDA, stream-ordered, so
// freeing it when the op returns is safe while kernels still run). CUDA blocks are 512-byte
// aligned; the CPU allocator only guarantees 64, so the CPU block is padded and the pointer
// rounded up.
struct Workspace {
  at::Tensor storage;
  void* ptr = nullptr;
  size_t bytes = 0;
};

Workspace make_workspace(size_t bytes, const at::Device& device) {
  Workspace w;
  w.bytes = bytes;
  if (bytes == 0) return w;
  const size_t pad = device.is_cuda() ? 0 : kWorkspaceAlignment;
  w.storage = at::empty({static_cast<int64_t>(bytes + pad)},
                        at::TensorOptions().dtype(at::kByte).device(device));
  const uintptr_t base = reinterpret_cast<uintptr_t>(w.storage.data_ptr());
  const uintptr_t aligned =
      (base + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  TORCH_CHECK(aligned + bytes <= base + bytes + pad,
              "flce: the allocator returned a workspace that cannot be aligned to ",
              kWorkspaceAlignment, " bytes");
  w.ptr = reinterpret_cast<void*>(aligned);
  return w;
}

// x rows may be strided (the core takes a row stride); anything else is made contiguous.
bool rows_usable(const at::Tensor& t) {
  const bool unit_columns = t.size(1) <= 1 || t.stride(1) == 1;
  const bool disjoint_rows = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return unit_columns && disjoint_rows;
}
at::Tensor rows_view(const at::Tensor& t) { return rows_usable(t) ? t : t.contiguous(); }
int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? t.size(1) : std::max<int64_t>(t.stride(0), t.size(1));
}

struct Inputs {
  at::Tensor x, weight, bias, target, class_weight;
  int64_t n = 0, v = 0, d = 0;
  DType dtype = DType::kFloat32;
  IndexType label_type = IndexType::kInt64;
  Device device = Device::kCpu;
};

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* arg,
                       const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), arg, ": expected device ", ref.device(), " (",
                    ref_arg, ".device), got ", t.device());
}

IndexType check_target(const at::Tensor& target, int64_t n, const at::Tensor& ref,
                       const char* ref_arg) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "target: expected dtype int64 or int32, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == n, "target: expected shape [", n,
                    "], got ", shape_str(target));
  check_same_device(target, ref, "target", ref_arg);
  return target.scalar_type() == at::kLong ? IndexType::kInt64 : IndexType::kInt32;
}

at::Tensor check_class_weight(const std::optional<at::Tensor>& cw, int64_t v, const at::Tensor& ref,
                              const char* ref_arg) {
  if (!cw.has_value()) return at::Tensor();
  TORCH_CHECK_TYPE(cw->scalar_type() == at::kFloat, "class_weight: expected dtype float32, got ",
                   cw->scalar_type());
  TORCH_CHECK_VALUE(cw->dim() == 1 && cw->size(0) == v, "class_weight: expected shape [", v,
                    "], got ", shape_str(*cw));
  check_same_device(*cw, ref, "class_weight", ref_arg);
  return cw->contiguous();
}

Inputs check_inputs(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& target,
                    const std::optional<at::Tensor>& class_weight) {
  Inputs in;
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [N, D], got shape ", shape_str(x));
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor [V, D], got shape ",
                    shape_str(weight));
  in.n = x.size(0);
  in.d = x.size(1);
  in.v = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == in.d, "weight: expected shape [V, ", in.d,
                    "] (D from x), got ", shape_str(weight));
  in.dtype = to_dtype(x.scalar_type(), "x");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ",
                   x.scalar_type(), " (x.dtype), got ", weight.scalar_type());
  in.device = to_device(x.device(), "x");
  check_same_device(weight, x, "weight", "x");
  in.x = rows_view(x);
  in.weight = weight.contiguous();
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ",
                     x.scalar_type(), " (x.dtype), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == in.v, "bias: expected shape [", in.v,
                      "], got ", shape_str(*bias));
    check_same_device(*bias, x, "bias", "x");
    in.bias = bias->contiguous();
  }
  in.label_type = check_target(target, in.n, x, "x");
  in.target = target.contiguous();
  in.class_weight = check_class_weight(class_weight, in.v, x, "x");
  return in;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

template <typename P>
void fill_common(P* p, const Inputs& in) {
  p->x = in.n > 0 ? in.x.const_data_ptr() : nullptr;
  p->x_row_stride = row_stride(in.x);
  p->weight = in.weight.const_data_ptr();
  p->bias = ptr_or_null(in.bias);
  p->labels = in.n > 0 ? in.target.const_data_ptr() : nullptr;
  p->label_type = in.label_type;
  p->class_weight = in.class_weight.defined() ? in.class_weight.const_data_ptr<float>() : nullptr;
  p->num_tokens = in.n;
  p->vocab_size = in.v;
  p->hidden_size = in.d;
  p->dtype = in.dtype;
}

// The core wants a loss pointer even when reduction none has no rows to write; an empty
// tensor has none, so a one-element stand-in is handed over instead.
at::Tensor loss_pointer_owner(const at::Tensor& loss) {
  return loss.numel() > 0 ? loss : at::empty({1}, loss.options());
}

at::Tensor maybe_empty(bool wanted, at::IntArrayRef shape, const at::TensorOptions& opts) {
  return wanted ? at::empty(shape, opts) : at::empty({0}, opts);
}

// dx, dW, db in the input dtype; [0] placeholders for those not requested (the schema returns
// all three).
struct GradOutputs {
  at::Tensor x, weight, bias;

  template <typename P>
  void fill(P* p, bool want_x, bool want_weight, bool want_bias) const {
    p->grad_x = want_x ? x.mutable_data_ptr() : nullptr;
    p->grad_weight = want_weight ? weight.mutable_data_ptr() : nullptr;
    p->grad_bias = want_bias ? bias.mutable_data_ptr() : nullptr;
  }
};

GradOutputs allocate_grads(const Inputs& in, const at::TensorOptions& opts, bool grad_x,
                           bool grad_weight, bool grad_bias) {
  return {maybe_empty(grad_x, {in.n, in.d}, opts), maybe_empty(grad_weight, {in.v, in.d}, opts),
          maybe_empty(grad_bias, {in.v}, opts)};
}

// Allocates the call's workspace and points the params at it and at the current stream; the
// returned Workspace must outlive the core call.
template <typename P>
Workspace attach_workspace(P* p, size_t bytes, const at::Device& device) {
  Workspace ws = make_workspace(bytes, device);
  p->workspace = ws.ptr;
  p->workspace_bytes = ws.bytes;
  p->stream = current_stream(device);
  if constexpr (std::is_same_v<P, ForwardParams> || std::is_same_v<P, BackwardParams>) {
    p->allow_tf32 = allow_tf32();
  }
  return ws;
}

// ---------------------------------------------------------------------------------------------
// Planner.

// The upstream gradients of a backward: grad_loss ([N] for reduction none, else one element) and
// the optional grad_lse ([N]), float32 on ref's device; returned contiguous.
struct Upstream {
  at::Tensor grad_loss, grad_lse;
};
Upstream check_upstream(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                        int64_t n, bool per_token, const at::Tensor& ref, const char* ref_arg) {
  TORCH_CHECK_TYPE(grad_loss.scalar_type() == at::kFloat, "grad_loss: expected dtype float32, got ",
                   grad_loss.scalar_type());
  TORCH_CHECK_VALUE(
      per_token ? (grad_loss.dim() == 1 && grad_loss.size(0) == n) : grad_loss.numel() == 1,
      "grad_loss: expected shape ", per_token ? "[N]" : "[] (one element)", " with N = ", n,
      ", got ", shape_str(grad_loss));
  check_same_device(grad_loss, ref, "grad_loss", ref_arg);
  Upstream up;
  up.grad_loss = grad_loss.contiguous();
  if (grad_lse.has_value()) {
    TORCH_CHECK_TYPE(grad_lse->scalar_type() == at::kFloat,
                     "grad_lse: expected dtype float32, got ", grad_lse->scalar_type());
    TORCH_CHECK_VALUE(grad_lse->dim() == 1 && grad_lse->size(0) == n, "grad_lse: expected shape [",
                      n, "], got ", shape_str(*grad_lse));
    check_same_device(*grad_lse, ref, "grad_lse", ref_arg);
    up.grad_lse = grad_lse->contiguous();
  }
  return up;
}

std::vector<int64_t> plan_op(int64_t num_tokens, int64_t vocab_size, int64_t hidden_size,
                             at::ScalarType dtype, at::Device device, int64_t reduction,
                             bool has_bias, bool grad_x, bool grad_weight, bool grad_bias,
                             bool grad_lse, int64_t memory_budget, int64_t strategy,
                             bool has_softcap, bool has_weighted_smoothing, bool compute_metrics) {
  TORCH_CHECK_VALUE(memory_budget >= 0,
                    "memory_budget: expected a positive number of bytes (or 0 for the default), "
                    "got ",
                    memory_budget);
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 2,
                    "strategy: expected 0 (auto), 1 (grad_in_forward) or 2 (recompute), got ",
                    strategy);
  Problem p;
  p.num_tokens = num_tokens;
  p.vocab_size = vocab_size;
  p.hidden_size = hidden_size;
  p.dtype = to_dtype(dtype, "dtype");
  p.reduction = to_reduction(reduction);
  p.has_bias = has_bias;
  p.needs_grad_x = grad_x;
  p.needs_grad_weight = grad_weight;
  p.needs_grad_bias = grad_bias;
  p.needs_grad_lse = grad_lse;
  p.has_softcap = has_softcap;
  p.has_weighted_smoothing = has_weighted_smoothing;
  p.needs_metrics = compute_metrics;
  // The CUDA planner asks the current device what its fused GEMMs can do.
  std::optional<c10::DeviceGuard> guard;
  if (device.is_cuda() && device.has_index() && cuda_available()) guard.emplace(device);
  Plan plan;
  const size_t budget =
      memory_budget == 0 ? default_memory_budget(p) : static_cast<size_t>(memory_budget);
  check_status(
      make_plan(p, to_device(device, "device"), budget, static_cast<Strategy>(strategy), &plan));
  return {static_cast<int64_t>(plan.strategy),
          plan.forward_token_chunk,
          plan.dw_group_tokens,
          plan.backward_token_chunk,
          plan.backward_vocab_chunk,
          static_cast<int64_t>(plan.forward_workspace_bytes),
          static_cast<int64_t>(plan.backward_workspace_bytes),
          static_cast<int64_t>(plan.min_budget_bytes),
          plan.forward_vocab_chunk,
          static_cast<int64_t>(plan.backward_order),
          static_cast<int64_t>(plan.gemm_scratch_bytes),
          static_cast<int64_t>(plan.fused_logits),
          static_cast<int64_t>(plan.compact_backward_blocks),
          static_cast<int64_t>(plan.compact_forward_blocks),
          static_cast<int64_t>(plan.shifted_terms)};
}

int64_t default_memory_budget_op(int64_t num_tokens, int64_t vocab_size, int64_t hidden_size) {
  TORCH_CHECK_VALUE(num_tokens >= 0 && vocab_size >= 0 && hidden_size >= 0,
                    "default_memory_budget: expected sizes >= 0, got num_tokens ", num_tokens,
                    ", vocab_size ", vocab_size, ", hidden_size ", hidden_size);
  Problem p;
  p.num_tokens = num_tokens;
  p.vocab_size = vocab_size;
  p.hidden_size = hidden_size;
  return static_cast<int64_t>(default_memory_budget(p));
}
bool cuda_available_op() { return cuda_available(); }

// ---------------------------------------------------------------------------------------------
// Fused linear cross-entropy.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double z_loss, double softcap, double logit_scale,
    at::IntArrayRef plan, bool grad_x, bool grad_weight, bool grad_bias, bool compute_metrics) {
  const Inputs in = check_inputs(x, weight, bias, target, class_weight);
  TORCH_CHECK_VALUE(!grad_bias || in.bias.defined(), "grad_bias: requested but bias is None");
  const c10::DeviceGuard guard(x.device());
  ForwardParams p;
  fill_common(&p, in);
  p.options = make_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale);
  p.plan = to_plan(plan);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor loss =
      p.options.reduction == Reduction::kNone ? at::empty({in.n}, f32) : at::empty({}, f32);
  at::Tensor lse = at::empty({in.n}, f32);
  at::Tensor metrics = maybe_empty(compute_metrics, {kNumMetrics}, f32);
  const GradOutputs g = allocate_grads(in, x.options(), grad_x, grad_weight, grad_bias);
  const at::Tensor loss_slot = loss_pointer_owner(loss);
  p.loss = loss_slot.mutable_data_ptr<float>();
  p.lse = in.n > 0 ? lse.mutable_data_ptr<float>() : nullptr;
  p.metrics = compute_metrics ? metrics.mutable_data_ptr<float>() : nullptr;
  g.fill(&p, grad_x, grad_weight, grad_bias);
  const Workspace ws = attach_workspace(&p, p.plan.forward_workspace_bytes, x.device());
  check_status(forward(in.device, p));
  return {loss, lse, metrics, g.x, g.weight, g.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, const at::Tensor& lse,
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double z_loss, double softcap, double logit_scale,
    at::IntArrayRef plan, bool grad_x, bool grad_weight, bool grad_bias) {
  const Inputs in = check_inputs(x, weight, bias, target, class_weight);
  TORCH_CHECK_VALUE(!grad_bias || in.bias.defined(), "grad_bias: requested but bias is None");
  const c10::DeviceGuard guard(x.device());
  BackwardParams p;
  fill_common(&p, in);
  p.options = make_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale);
  p.plan = to_plan(plan);

  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype float32, got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == in.n, "lse: expected shape [", in.n, "], got ",
                    shape_str(lse));
  check_same_device(lse, x, "lse", "x");
  const bool per_token = p.options.reduction == Reduction::kNone;
  const at::Tensor lse_c = lse.contiguous();
  const Upstream up = check_upstream(grad_loss, grad_lse, in.n, per_token, x, "x");
  p.lse = in.n > 0 ? lse_c.const_data_ptr<float>() : nullptr;
  p.grad_loss = in.n > 0 ? up.grad_loss.const_data_ptr<float>() : nullptr;
  p.grad_lse = up.grad_lse.defined() && in.n > 0 ? up.grad_lse.const_data_ptr<float>() : nullptr;

  const GradOutputs g = allocate_grads(in, x.options(), grad_x, grad_weight, grad_bias);
  g.fill(&p, grad_x && in.n > 0, grad_weight, grad_bias);
  const Workspace ws = attach_workspace(&p, p.plan.backward_workspace_bytes, x.device());
  check_status(backward(in.device, p));
  return {g.x, g.weight, g.bias};
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy on given logits.

struct LogitsInputs {
  at::Tensor logits, target, class_weight;
  int64_t n = 0, v = 0;
};

LogitsInputs check_logits_inputs(const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& class_weight) {
  LogitsInputs in;
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor [N, V], got shape ",
                    shape_str(logits));
  to_dtype(logits.scalar_type(), "logits");
  to_device(logits.device(), "logits");
  in.n = logits.size(0);
  in.v = logits.size(1);
  TORCH_CHECK_VALUE(in.v >= 1, "logits: expected at least one class, got shape ",
                    shape_str(logits));
  check_target(target, in.n, logits, "logits");
  in.logits = logits;
  in.target = target.contiguous();
  in.class_weight = check_class_weight(class_weight, in.v, logits, "logits");
  return in;
}

LogitsParams make_logits_params(const LogitsInputs& in, const at::Tensor& logits,
                                const LossOptions& options) {
  LogitsParams p;
  p.logits = in.n > 0 ? logits.const_data_ptr() : nullptr;
  p.logits_row_stride = row_stride(logits);
  p.labels = in.n > 0 ? in.target.const_data_ptr() : nullptr;
  p.label_type = in.target.scalar_type() == at::kLong ? IndexType::kInt64 : IndexType::kInt32;
  p.class_weight = in.class_weight.defined() ? in.class_weight.const_data_ptr<float>() : nullptr;
  p.num_tokens = in.n;
  p.vocab_size = in.v;
  p.dtype = to_dtype(logits.scalar_type(), "logits");
  p.options = options;
  return p;
}

// Shared by the three logits ops: loss, lse, metrics, and the gradient into `grad` when defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_logits(
    const LogitsInputs& in, const at::Tensor& logits, const LossOptions& options,
    bool compute_metrics, const at::Tensor& grad, const at::Tensor& grad_scale,
    const at::Tensor& grad_lse) {
  const c10::DeviceGuard guard(logits.device());
  LogitsParams p = make_logits_params(in, logits, options);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss =
      options.reduction == Reduction::kNone ? at::empty({in.n}, f32) : at::empty({}, f32);
  at::Tensor lse = at::empty({in.n}, f32);
  at::Tensor metrics = maybe_empty(compute_metrics, {kNumMetrics}, f32);
  const at::Tensor loss_slot = loss_pointer_owner(loss);
  p.loss = loss_slot.mutable_data_ptr<float>();
  p.lse = in.n > 0 ? lse.mutable_data_ptr<float>() : nullptr;
  p.metrics = compute_metrics ? metrics.mutable_data_ptr<float>() : nullptr;
  if (grad.defined() && in.n > 0) {
    p.grad_logits = grad.data_ptr();
    p.grad_row_stride = row_stride(grad);
  }
  p.grad_scale = grad_scale.defined() ? grad_scale.const_data_ptr<float>() : nullptr;
  p.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr;
  const Workspace ws = attach_workspace(&p, logits_workspace_bytes(in.n), logits.device());
  check_status(cross_entropy_logits(to_device(logits.device(), "logits"), p));
  return {loss, lse, metrics};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward(
    const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, double z_loss, double softcap, double logit_scale,
    bool compute_metrics) {
  const LogitsInputs in = check_logits_inputs(logits, target, class_weight);
  const at::Tensor l = rows_view(logits);
  return run_logits(
      in, l, make_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale),
      compute_metrics, at::Tensor(), at::Tensor(), at::Tensor());
}

// Overwrites `logits` with d loss / d logits for an upstream gradient of 1 (per row for
// reduction none): the caller rescales in backward, so no second [N, V] buffer is needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss, double softcap,
    double logit_scale, bool compute_metrics) {
  const LogitsInputs in = check_logits_inputs(logits, target, class_weight);
  TORCH_CHECK_VALUE(
      rows_usable(logits),
      "logits: the in-place gradient needs rows with unit column stride, got strides ",
      logits.strides());
  return run_logits(
      in, logits,
      make_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale),
      compute_metrics, logits, at::Tensor(), at::Tensor());
}

at::Tensor ce_backward(const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                       const std::optional<at::Tensor>& grad_lse, int64_t ignore_index,
                       int64_t reduction, double label_smoothing, double z_loss, double softcap,
                       double logit_scale) {
  const LogitsInputs in = check_logits_inputs(logits, target, class_weight);
  const LossOptions o =
      make_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale);
  const bool per_token = o.reduction == Reduction::kNone;
  const Upstream up = check_upstream(grad_loss, grad_lse, in.n, per_token, logits, "logits");
  const at::Tensor l = rows_view(logits);
  at::Tensor grad = at::empty({in.n, in.v}, logits.options());
  run_logits(in, l, o, false, grad, up.grad_loss, up.grad_lse);
  return grad;
}

// grad *= scale in place; the kernel reads scale, so nothing waits on the host and a scale of 1
// costs no memory traffic.
void scale_(at::Tensor grad, const at::Tensor& scale) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale: expected dtype float32, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.numel() == 1, "scale: expected one element, got shape ",
                    shape_str(scale));
  check_same_device(scale, grad, "scale", "grad");
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad: expected a contiguous tensor");
  if (grad.numel() == 0) return;
  const c10::DeviceGuard guard(grad.device());
  ScaleParams p;
  p.data = grad.data_ptr();
  p.dtype = to_dtype(grad.scalar_type(), "grad");
  p.count = grad.numel();
  p.scale = scale.const_data_ptr<float>();
  p.stream = current_stream(grad.device());
  check_status(scale_in_place(to_device(grad.device(), "grad"), p));
}

}  // namespace
}  // namespace flce::binding

TORCH_LIBRARY(flce, m) {
  using namespace flce::binding;
  // Ops without tensor arguments run everywhere (they only ask the core).
  m.def(
      "plan(int num_tokens, int vocab_size, int hidden_size, ScalarType dtype, Device device, "
      "int reduction, bool has_bias, bool grad_x, bool grad_weight, bool grad_bias, "
      "bool grad_lse, int memory_budget, int strategy, bool has_softcap=False, "
      "bool has_weighted_smoothing=False, bool compute_metrics=False) -> int[]",
      &plan_op);
  m.def("default_memory_budget(int num_tokens, int vocab_size, int hidden_size) -> int",
        &default_memory_budget_op);
  m.def("scale_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("cuda_available() -> bool", &cuda_available_op);
  // grad_x / grad_weight / grad_bias: compute those gradients in the forward (plan strategy
  // grad_in_forward, upstream gradient 1); the matching outputs are empty [0] otherwise.
  m.def(
      "lce_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "float logit_scale, int[] plan, bool grad_x, bool grad_weight, bool grad_bias, "
      "bool compute_metrics) -> (Tensor loss, Tensor lse, Tensor metrics, Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "lce_backward(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "Tensor lse, Tensor grad_loss, Tensor? grad_lse, int ignore_index, int reduction, "
      "float label_smoothing, float z_loss, float softcap, float logit_scale, int[] plan, "
      "bool grad_x, bool grad_weight, bool grad_bias) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "ce_forward(Tensor logits, Tensor target, Tensor? class_weight, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, float logit_scale, "
      "bool compute_metrics) -> (Tensor loss, Tensor lse, Tensor metrics)");
  m.def(
      "ce_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? class_weight, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "float logit_scale, bool compute_metrics) -> (Tensor loss, Tensor lse, Tensor metrics)");
  m.def(
      "ce_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, "
      "Tensor? grad_lse, int ignore_index, int reduction, float label_smoothing, float z_loss, "
      "float softcap, float logit_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(flce, CPU, m) {
  using namespace flce::binding;
  m.impl("lce_forward", &lce_forward);
  m.impl("lce_backward", &lce_backward);
  m.impl("ce_forward", &ce_forward);
  m.impl("ce_forward_inplace", &ce_forward_inplace);
  m.impl("ce_backward", &ce_backward);
  m.impl("scale_", &scale_);
}

#if FLCE_WITH_CUDA
TORCH_LIBRARY_IMPL(flce, CUDA, m) {
  using namespace flce::binding;
  m.impl("lce_forward", &lce_forward);
  m.impl("lce_backward", &lce_backward);
  m.impl("ce_forward", &ce_forward);
  m.impl("ce_forward_inplace", &ce_forward_inplace);
  m.impl("ce_backward", &ce_backward);
  m.impl("scale_", &scale_);
}
#endif
