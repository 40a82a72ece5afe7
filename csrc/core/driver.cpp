// The strategies, written once over the Backend primitives: which block is computed when, where
// it lives in the workspace, and which GEMM consumes it. Never dereferences a tensor pointer (they
// may be device memory).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "backend.h"
#include "backends.h"
#include "flce/flce.h"
#include "row_math.h"
#include "workspace.h"

namespace flce {

Status validate_problem(const Problem& p);  // planner.cpp

namespace detail {

BackendTraits backend_traits(Device device) {
  return device == Device::kCuda ? cuda_traits() : cpu_traits();
}

Status Backend::logits_stats(const LogitsOperands&, const RowForwardArgs&) {
  return Status::Error(StatusCode::kNotCompiled, "this backend has no fused logits GEMMs");
}
Status Backend::logits_grad(const LogitsOperands&, const RowGradArgs&) {
  return Status::Error(StatusCode::kNotCompiled, "this backend has no fused logits GEMMs");
}
Status Backend::label_shift(const LabelShiftArgs&) {
  return Status::Error(StatusCode::kNotCompiled, "this backend has no row-shifted terms");
}
Status Backend::shifted_rows(const ShiftedRowsArgs&) {
  return Status::Error(StatusCode::kNotCompiled, "this backend has no row-shifted terms");
}

namespace {

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

#define FLCE_RETURN_IF_ERROR(expr) \
  do {                             \
    Status _s = (expr);            \
    if (!_s.ok()) return _s;       \
  } while (0)

template <typename T>
char* at(T* base, size_t offset) {
  return reinterpret_cast<char*>(const_cast<std::remove_const_t<T>*>(base)) + offset;
}
const char* offset_ptr(const void* base, int64_t elements, DType type) {
  return static_cast<const char*>(base) + elements * static_cast<int64_t>(dtype_size(type));
}
char* offset_ptr(void* base, int64_t elements, DType type) {
  return static_cast<char*>(base) + elements * static_cast<int64_t>(dtype_size(type));
}

bool valid_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

Status validate_options(const LossOptions& o) {
  if (o.reduction != Reduction::kMean && o.reduction != Reduction::kSum &&
      o.reduction != Reduction::kNone) {
    return invalid("reduction must be mean, sum or none, got code " +
                   std::to_string(static_cast<int>(o.reduction)));
  }
  if (!std::isfinite(o.label_smoothing) || o.label_smoothing < 0.0f || o.label_smoothing > 1.0f) {
    return invalid("label_smoothing must be a finite number in [0, 1], got " +
                   std::to_string(o.label_smoothing));
  }
  if (!std::isfinite(o.z_loss) || o.z_loss < 0.0f) {
    return invalid("z_loss must be a finite number >= 0, got " + std::to_string(o.z_loss));
  }
  if (!std::isfinite(o.softcap) || o.softcap < 0.0f) {
    return invalid("softcap must be a finite number > 0 (or 0 to disable), got " +
                   std::to_string(o.softcap));
  }
  if (!std::isfinite(o.logit_scale)) {
    return invalid("logit_scale must be finite, got " + std::to_string(o.logit_scale));
  }
  return Status::Ok();
}

// Checks shared by the forward and the backward parameters.
template <typename P>
Status validate_common(const P& p) {
  if (!valid_dtype(p.dtype)) return invalid("dtype must be float32, float16 or bfloat16");
  if (p.label_type != IndexType::kInt64 && p.label_type != IndexType::kInt32) {
    return invalid("label_type must be int64 or int32");
  }
  Problem prob;
  prob.num_tokens = p.num_tokens;
  prob.vocab_size = p.vocab_size;
  prob.hidden_size = p.hidden_size;
  FLCE_RETURN_IF_ERROR(validate_problem(prob));
  FLCE_RETURN_IF_ERROR(validate_options(p.options));
  if (p.weight == nullptr) return invalid("weight must not be null");
  if (p.num_tokens > 0) {
    if (p.x == nullptr) return invalid("x must not be null");
    if (p.labels == nullptr) return invalid("labels must not be null");
  }
  if (p.x_row_stride < p.hidden_size) {
    return invalid("x_row_stride must be >= hidden_size (" + std::to_string(p.hidden_size) +
                   "), got " + std::to_string(p.x_row_stride));
  }
  return Status::Ok();
}

Status check_workspace(const void* ws, size_t have, size_t need) {
  if (have < need) {
    return invalid("workspace_bytes is " + std::to_string(have) + " but the plan needs " +
                   std::to_string(need));
  }
  if (need > 0 && ws == nullptr) return invalid("workspace must not be null");
  if (reinterpret_cast<uintptr_t>(ws) % kWorkspaceAlignment != 0) {
    return invalid("workspace must be aligned to " + std::to_string(kWorkspaceAlignment) +
                   " bytes");
  }
  return Status::Ok();
}

std::unique_ptr<Backend> make_backend(Device device, void* gemm_scratch, size_t scratch_bytes,
                                      void* stream, bool allow_tf32) {
  if (device == Device::kCuda) {
    return make_cuda_backend(stream, allow_tf32, gemm_scratch, scratch_bytes);
  }
  return make_cpu_backend(gemm_scratch);
}

// The backend of a fused call, with the GEMM scratch its plan carved.
template <typename Layout>
std::unique_ptr<Backend> make_backend(Device device, const Layout& l, void* ws, const Plan& plan,
                                      const BackendTraits& traits, void* stream, bool allow_tf32) {
  if (l.gemm_scratch == kAbsent) return make_backend(device, nullptr, 0, stream, allow_tf32);
  return make_backend(device, at(ws, l.gemm_scratch), gemm_scratch_bytes(plan, traits), stream,
                      allow_tf32);
}

Status check_gemm_scratch(const Plan& plan, const BackendTraits& traits) {
  if (plan.gemm_scratch_bytes != 0 && (plan.gemm_scratch_bytes < traits.min_gemm_scratch_bytes ||
                                       plan.gemm_scratch_bytes % kWorkspaceAlignment != 0)) {
    return invalid("plan.gemm_scratch_bytes must be 0 (the backend's default) or a multiple of " +
                   std::to_string(kWorkspaceAlignment) +
                   " that is >= " + std::to_string(traits.min_gemm_scratch_bytes) + ", got " +
                   std::to_string(plan.gemm_scratch_bytes));
  }
  return Status::Ok();
}

Status check_device(Device device) {
  if (device != Device::kCpu && device != Device::kCuda)
    return invalid("device must be cpu or cuda");
  if (device == Device::kCuda && !cuda_compiled()) {
    return Status::Error(StatusCode::kNotCompiled, "flce was built without the CUDA backend");
  }
  return Status::Ok();
}

// Leading dimension, in dz elements, of a dZ block written in place over an fp32 logits block of
// leading dimension `ld_f32`: row r starts at the same byte as before.
int64_t in_place_ld(int64_t ld_f32, DType dz_type) {
  return ld_f32 * static_cast<int64_t>(sizeof(float) / dtype_size(dz_type));
}

// A GEMM operand: row-major matrix `ptr` with leading dimension `ld`, used transposed or not.
struct Operand {
  const void* ptr;
  int64_t ld;
  DType type;
  bool transposed;
};

// C[m, n] = op(A) op(B), or += when `accumulate`.
GemmArgs make_gemm(int64_t m, int64_t n, int64_t k, Operand a, Operand b, void* c, int64_t ldc,
                   DType c_type, bool accumulate) {
  GemmArgs g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.ptr;
  g.lda = a.ld;
  g.a_type = a.type;
  g.trans_a = a.transposed;
  g.b = b.ptr;
  g.ldb = b.ld;
  g.b_type = b.type;
  g.trans_b = b.transposed;
  g.c = c;
  g.ldc = ldc;
  g.c_type = c_type;
  g.beta = accumulate ? 1.0f : 0.0f;
  return g;
}

// The planner's view of a forward or backward call: what it computes decides the layout.
template <typename P>
Problem problem_of(const P& p) {
  Problem prob;
  prob.num_tokens = p.num_tokens;
  prob.vocab_size = p.vocab_size;
  prob.hidden_size = p.hidden_size;
  prob.dtype = p.dtype;
  prob.reduction = p.options.reduction;
  prob.has_bias = p.bias != nullptr;
  prob.needs_grad_x = p.grad_x != nullptr;
  prob.needs_grad_weight = p.grad_weight != nullptr;
  prob.needs_grad_bias = p.grad_bias != nullptr;
  if constexpr (std::is_same_v<P, BackwardParams>) prob.needs_grad_lse = p.grad_lse != nullptr;
  if constexpr (std::is_same_v<P, ForwardParams>) prob.needs_metrics = p.metrics != nullptr;
  prob.has_softcap = p.options.softcap > 0.0f;
  prob.has_weighted_smoothing = p.class_weight != nullptr && p.options.label_smoothing > 0.0f;
  return prob;
}

template <typename P>
PrepareArgs prepare_args(const P& p, float* scalars) {
  PrepareArgs prep;
  prep.labels = p.labels;
  prep.label_type = p.label_type;
  prep.class_weight = p.class_weight;
  prep.num_tokens = p.num_tokens;
  prep.vocab_size = p.vocab_size;
  prep.ignore_index = p.options.ignore_index;
  prep.scalars = scalars;
  return prep;
}

// The row arguments of a fused forward's block of `rows` tokens from token t0 (whole rows, fp32
// logits; the caller sets the block and dZ fields).
RowForwardArgs row_forward_args(const ForwardParams& p, int64_t rows, int64_t t0,
                                const float* scalars, float* row_loss, float* lse,
                                float* row_metrics) {
  RowForwardArgs rf;
  rf.logits_type = DType::kFloat32;
  rf.rows = rows;
  rf.vocab_size = p.vocab_size;
  rf.row_offset = t0;
  rf.bias = p.bias;
  rf.bias_type = p.dtype;
  rf.labels = p.labels;
  rf.label_type = p.label_type;
  rf.class_weight = p.class_weight;
  rf.options = p.options;
  rf.scalars = scalars;
  rf.row_loss = row_loss;
  rf.lse = lse;
  rf.row_metrics = row_metrics;
  return rf;
}

// The dZ arguments of a recompute block [rows, cols] at (t0, v0), dZ in place when `dz` is the
// block itself.
RowGradArgs row_grad_args(const BackwardParams& p, const float* scalars, const float* logits,
                          int64_t rows, int64_t cols, int64_t t0, int64_t v0, void* dz, int64_t ldz,
                          DType dz_type) {
  RowGradArgs rg;
  rg.logits = logits;
  rg.ld = cols;
  rg.rows = rows;
  rg.cols = cols;
  rg.row_offset = t0;
  rg.col_offset = v0;
  rg.vocab_size = p.vocab_size;
  rg.bias = p.bias;
  rg.bias_type = p.dtype;
  rg.labels = p.labels;
  rg.label_type = p.label_type;
  rg.class_weight = p.class_weight;
  rg.options = p.options;
  rg.scalars = scalars;
  rg.lse = p.lse;
  rg.grad_loss = p.grad_loss;
  rg.grad_lse = p.grad_lse;
  rg.dz = dz;
  rg.ldz = ldz;
  rg.dz_type = dz_type;
  return rg;
}

// The dZ arguments of a grad-in-forward compact block whose fused statistics GEMM filled `rf`
// (partials and the fp16 terms tile_exp): same rows, labels and options, the LSE just finished.
RowGradArgs grad_from_exp_args(const RowForwardArgs& rf, void* dz, int64_t ldz, DType dz_type) {
  RowGradArgs rg;
  rg.rows = rf.rows;
  rg.cols = rf.cols;
  rg.row_offset = rf.row_offset;
  rg.vocab_size = rf.vocab_size;
  rg.labels = rf.labels;
  rg.label_type = rf.label_type;
  rg.class_weight = rf.class_weight;
  rg.options = rf.options;
  rg.scalars = rf.scalars;
  rg.lse = rf.lse;
  rg.grad_loss = rf.grad_loss;
  rg.grad_lse = rf.grad_lse;
  rg.dz = dz;
  rg.ldz = ldz;
  rg.dz_type = dz_type;
  rg.tile_exp = rf.tile_exp;
  rg.tile_exp_ld = rf.tile_exp_ld;
  rg.partials = rf.partials;
  rg.partials_ld = rf.partials_ld;
  rg.target_z = rf.target_z;
  return rg;
}

// The operands of the logits block x[t0:t0+rows] W[v0:v0+cols]^T (x_block already at row t0).
template <typename P>
LogitsOperands logits_operands(const P& p, const void* x_block, int64_t rows, int64_t v0,
                               int64_t cols) {
  LogitsOperands op;
  op.x = x_block;
  op.ldx = p.x_row_stride;
  op.weight = offset_ptr(p.weight, v0 * p.hidden_size, p.dtype);
  op.ldw = p.hidden_size;
  op.dtype = p.dtype;
  op.rows = rows;
  op.cols = cols;
  op.hidden = p.hidden_size;
  return op;
}

// logits[rows, cols] = x W^T of the operands, in fp32 (ld = cols): the unfused path.
Status logits_gemm(Backend& be, const LogitsOperands& op, float* logits) {
  return be.gemm(make_gemm(op.rows, op.cols, op.hidden, {op.x, op.ldx, op.dtype, false},
                           {op.weight, op.ldw, op.dtype, true}, logits, op.cols, DType::kFloat32,
                           false));
}

int64_t partials_per_row(int64_t cols) {
  return (cols + kPartialStatsCols - 1) / kPartialStatsCols;
}

// Whether a statistics block [rows, cols] may run through the backend's fused logits GEMM: the
// plan allows it, the backend can run the operands, and the partial statistics fit the block's
// `block_bytes`.
bool fused_stats_fit(const Plan& plan, const Backend& be, const LogitsOperands& op,
                     const RowForwardArgs& rf, size_t block_bytes) {
  if (plan.fused_logits == FusedLogits::kOff) return false;
  const size_t bytes =
      static_cast<size_t>(op.rows) * (partials_per_row(op.cols) * sizeof(RowState) + sizeof(float));
  return bytes <= block_bytes && be.fused_stats(op, rf);
}

// A grad-in-forward compact block of `rows` whole rows (block = the forward's logits region):
// the terms at pitch compact_ld(V) (unless `terms` places them elsewhere: the rows of the dZ
// group), then the partial RowStates, then the labels' logits. forward_block_bytes
// (workspace.cpp) sizes it.
void carve_gif_block(void* block, int64_t rows, RowForwardArgs* rf, void* terms = nullptr) {
  const int64_t ld = compact_ld(rf->vocab_size);
  char* stats = static_cast<char*>(block);
  if (terms == nullptr) {
    terms = block;
    stats += rows * ld * kExpBytes;
  }
  rf->cols = rf->vocab_size;
  rf->tile_exp = terms;
  rf->tile_exp_ld = ld;
  rf->partials_ld = partials_per_row(rf->vocab_size);
  rf->partials = reinterpret_cast<RowState*>(stats);
  rf->target_z = reinterpret_cast<float*>(rf->partials + rows * rf->partials_ld);
}

// Statistics (no gradient) of the block [rows, cols] at (t0, v0) into `rf` (whose block and carry
// fields the caller set): through the fused GEMM when it may run, else fp32 logits into `logits`
// (block_bytes long) and the row kernel.
Status stats_block(Backend& be, const Plan& plan, const LogitsOperands& op, RowForwardArgs rf,
                   float* logits, size_t block_bytes) {
  if (fused_stats_fit(plan, be, op, rf, block_bytes)) {
    rf.partials_ld = partials_per_row(op.cols);
    rf.partials = reinterpret_cast<RowState*>(logits);
    rf.target_z = reinterpret_cast<float*>(rf.partials + op.rows * rf.partials_ld);
    FLCE_RETURN_IF_ERROR(be.logits_stats(op, rf));
    return be.rows_forward(rf);
  }
  if (static_cast<size_t>(op.rows * op.cols) * sizeof(float) > block_bytes) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "statistics block [" + std::to_string(op.rows) + ", " +
                             std::to_string(op.cols) + "] does not fit its workspace block");
  }
  FLCE_RETURN_IF_ERROR(logits_gemm(be, op, logits));
  rf.logits = logits;
  rf.ld = op.cols;
  return be.rows_forward(rf);
}

// dZ of a recompute block (rg filled by row_grad_args, logits = the fp32 block scratch): through
// the fused GEMM when the plan asks for it (kAuto: where the backend expects a gain) and the
// backend can, else logits then the row kernel.
// With compact blocks (`compact`: no room for fp32 logits) only the fused GEMM may run.
Status grad_block(Backend& be, const Plan& plan, bool compact, const LogitsOperands& op,
                  const RowGradArgs& rg, float* logits) {
  if (compact) return be.logits_grad(op, rg);
  const bool fused = plan.fused_logits == FusedLogits::kAlways ||
                     (plan.fused_logits == FusedLogits::kAuto && be.fused_grad_pays(op));
  if (fused && be.fused_grad(op, rg)) {
    return be.logits_grad(op, rg);
  }
  FLCE_RETURN_IF_ERROR(logits_gemm(be, op, logits));
  return be.rows_grad(rg);
}

// An fp32 accumulator of a GEMM's `rows` x n output for a 16-bit result, split in two: its first
// `borrowed_rows` rows in the result's own bytes, which hold nothing until the accumulator is
// converted into them (the end of dx in a recompute backward, dx_accumulator_borrows_dx; all of dW
// in grad-in-forward, dw_accumulator_borrowed_rows), the others in the workspace. Without
// borrowing all rows are in the workspace.
struct SplitAccumulator {
  float* borrowed = nullptr;  // rows [0, borrowed_rows)
  int64_t borrowed_rows = 0;
  float* own = nullptr;  // rows [borrowed_rows, rows), in the workspace
  int64_t rows = 0;
};

// The accumulator of dx rows [t0, t0 + rows) of a recompute backward with 16-bit dx: its borrowed
// rows in the last bytes of dx (rows >= t0 of dx are not written yet).
SplitAccumulator dx_accumulator(const BackwardParams& p, bool borrow, float* workspace_rows,
                                int64_t t0, int64_t rows) {
  SplitAccumulator acc;
  acc.own = workspace_rows;
  acc.rows = rows;
  if (borrow) {
    const int64_t n = p.num_tokens, d = p.hidden_size;
    // The last rows' bytes of dx: half as many fp32 rows as there are 16-bit rows left.
    acc.borrowed_rows = std::min(rows, (n - t0) / 2);
    char* end = offset_ptr(p.grad_x, n * d, p.dtype);
    acc.borrowed = reinterpret_cast<float*>(end - acc.borrowed_rows * d * sizeof(float));
  }
  return acc;
}

// `a` from row m of the product on.
Operand from_row(Operand a, int64_t m) {
  a.ptr = offset_ptr(a.ptr, a.transposed ? m : m * a.ld, a.type);
  return a;
}

// The accumulator's rows (+)= a b (k terms each, n columns): one GEMM per part.
// measure_algorithm: GemmArgs::measure_algorithm of both.
Status accumulate_gemm(Backend& be, const SplitAccumulator& acc, int64_t n, int64_t k, Operand a,
                       Operand b, bool accumulate, bool measure_algorithm) {
  const auto part = [&](int64_t rows, Operand a_rows, float* c) {
    GemmArgs g = make_gemm(rows, n, k, a_rows, b, c, n, DType::kFloat32, accumulate);
    g.measure_algorithm = measure_algorithm;
    return be.gemm(g);
  };
  if (acc.borrowed_rows > 0) FLCE_RETURN_IF_ERROR(part(acc.borrowed_rows, a, acc.borrowed));
  const int64_t own_rows = acc.rows - acc.borrowed_rows;
  if (own_rows == 0) return Status::Ok();
  return part(own_rows, from_row(a, acc.borrowed_rows), acc.own);
}

// dst = src * (row_factor[r] * factor) in dst_type over `rows` contiguous rows of `cols` elements
// (Backend::cast; null factors count as 1).
Status cast_rows(Backend& be, const void* src, DType src_type, void* dst, DType dst_type,
                 int64_t rows, int64_t cols, const float* row_factor = nullptr,
                 const float* factor = nullptr) {
  CastArgs c;
  c.src = src;
  c.ld_src = cols;
  c.src_type = src_type;
  c.dst = dst;
  c.ld_dst = cols;
  c.dst_type = dst_type;
  c.rows = rows;
  c.cols = cols;
  c.row_factor = row_factor;
  c.factor = factor;
  return be.cast(c);
}

// dst[i] = src[i] * factor (null for 1) in dst_type (16-bit), where dst may overlap src from below
// (dst <= src in bytes): in runs [lo, hi) whose output ends before the input of element lo, so no
// run overwrites an input it has not read yet (one element first when dst == src, then runs that
// double).
Status cast_narrowing_in_place(Backend& be, const float* src, void* dst, DType dst_type,
                               int64_t count, const float* factor) {
  const int64_t out_size = static_cast<int64_t>(dtype_size(dst_type));
  const int64_t gap =
      static_cast<const char*>(static_cast<const void*>(src)) - static_cast<const char*>(dst);
  if (gap < 0 || out_size >= static_cast<int64_t>(sizeof(float))) {
    return Status::Error(StatusCode::kBackendError,
                         "cast_narrowing_in_place: expects a 16-bit output at or below its input");
  }
  const int64_t in_size = static_cast<int64_t>(sizeof(float));
  for (int64_t lo = 0; lo < count;) {
    // Output bytes [lo * out, hi * out) must end at or before the input of lo: gap + lo * in.
    const int64_t hi = std::min(count, std::max(lo + 1, (gap + lo * in_size) / out_size));
    FLCE_RETURN_IF_ERROR(cast_rows(be, src + lo, DType::kFloat32, offset_ptr(dst, lo, dst_type),
                                   dst_type, 1, hi - lo, nullptr, factor));
    lo = hi;
  }
  return Status::Ok();
}

// dst (16-bit, `acc.rows` rows of n) = the accumulator times factor (null for 1): the borrowed
// part first (its output lies at or below its input and may overlap it), then the workspace part,
// whose output may cover the borrowed part's input.
Status finish_accumulator(Backend& be, const SplitAccumulator& acc, int64_t n, void* dst,
                          DType dst_type, const float* factor) {
  if (acc.borrowed_rows > 0) {
    FLCE_RETURN_IF_ERROR(
        cast_narrowing_in_place(be, acc.borrowed, dst, dst_type, acc.borrowed_rows * n, factor));
  }
  const int64_t own_rows = acc.rows - acc.borrowed_rows;
  if (own_rows == 0) return Status::Ok();
  return cast_rows(be, acc.own, DType::kFloat32, offset_ptr(dst, acc.borrowed_rows * n, dst_type),
                   dst_type, own_rows, n, nullptr, factor);
}

// Whether a call's options let grad-in-forward keep row-shifted terms (Plan::shifted_terms): dZ
// must be a per-row multiple of p except at the label (no smoothing, class weights or soft-cap;
// no bias, which the fused GEMM does not add).
bool shifted_terms_serve(const ForwardParams& p) {
  return p.options.label_smoothing == 0.0f && p.options.softcap == 0.0f &&
         p.class_weight == nullptr && p.bias == nullptr && p.dtype != DType::kFloat32;
}

// One token chunk of grad-in-forward with row-shifted terms (rf: the chunk's row arguments with
// its compact block carved; sl_base: the buffers of ShiftedLayout sl; group_row: the chunk's first
// row within its dW group; g: the upstream factor, null for 1; dw: the fp32 dW accumulator, or
// none when one group covers every token). The GEMMs read the terms as they are, in the input
// dtype: dx rows = g * factor * (e' W), dW (+)= e'^T (factor * x), the dW factor g applied when
// the accumulator is converted (or by the group's dW GEMM, group_dw_gemm).
Status shifted_chunk(Backend& be, const ForwardParams& p, const LogitsOperands& op,
                     RowForwardArgs rf, char* sl_base, const ShiftedLayout& sl, int64_t group_row,
                     const float* g, const SplitAccumulator& dw) {
  const int64_t rows = rf.rows, v = p.vocab_size, d = p.hidden_size;
  float* shift = reinterpret_cast<float*>(sl_base + sl.shift);
  float* row_max = reinterpret_cast<float*>(sl_base + sl.row_max);
  float* row_factor = reinterpret_cast<float*>(sl_base + sl.row_factor);
  void* x_scaled = offset_ptr(sl_base + sl.x_scaled, group_row * d, p.dtype);

  LabelShiftArgs ls;
  ls.x = op.x;
  ls.ldx = op.ldx;
  ls.weight = p.weight;
  ls.dtype = p.dtype;
  ls.rows = rows;
  ls.hidden = d;
  ls.vocab_size = v;
  ls.row_offset = rf.row_offset;
  ls.labels = p.labels;
  ls.label_type = p.label_type;
  ls.ignore_index = p.options.ignore_index;
  ls.logit_scale = p.options.logit_scale;
  ls.shift = shift;
  FLCE_RETURN_IF_ERROR(be.label_shift(ls));

  rf.row_shift = shift;
  rf.row_max = row_max;
  FLCE_RETURN_IF_ERROR(be.logits_stats(op, rf));
  FLCE_RETURN_IF_ERROR(be.rows_forward(rf));

  ShiftedRowsArgs sr;
  sr.grad = grad_from_exp_args(rf, rf.tile_exp, rf.tile_exp_ld, p.dtype);
  sr.shift = shift;
  sr.row_max = row_max;
  sr.target_z = rf.target_z;
  sr.x = op.x;
  sr.ldx = op.ldx;
  sr.x_type = p.dtype;
  sr.hidden = d;
  sr.row_factor = row_factor;
  sr.x_scaled = x_scaled;
  sr.rewrite_rows = reinterpret_cast<int32_t*>(sl_base + sl.rewrite_rows);
  sr.rewrite_count = reinterpret_cast<int32_t*>(sl_base + sl.rewrite_count);
  FLCE_RETURN_IF_ERROR(be.shifted_rows(sr));

  const Operand terms{rf.tile_exp, rf.tile_exp_ld, p.dtype, false};
  if (p.grad_x) {
    float* dx32 = reinterpret_cast<float*>(sl_base + sl.dx);
    FLCE_RETURN_IF_ERROR(be.gemm(make_gemm(rows, d, v, terms, {p.weight, d, p.dtype, false}, dx32,
                                           d, DType::kFloat32, false)));
    FLCE_RETURN_IF_ERROR(cast_rows(be, dx32, DType::kFloat32,
                                   offset_ptr(p.grad_x, rf.row_offset * d, p.dtype), p.dtype, rows,
                                   d, row_factor, g));
  }
  if (dw.rows == 0) return Status::Ok();  // no dW, or one GEMM over every token's terms at the end
  return accumulate_gemm(be, dw, d, rows, {terms.ptr, terms.ld, p.dtype, true},
                         {x_scaled, d, p.dtype, false}, rf.row_offset > 0,
                         /*measure_algorithm=*/true);
}

// dW of one group of row-shifted terms that covers every token: terms^T (factor * x), times the
// upstream factor g (null for 1), which stays on the device: the GEMM reads it when it runs.
Status group_dw_gemm(Backend& be, const ForwardParams& p, const void* terms, int64_t ld_terms,
                     const void* x_scaled, const float* g, const float* scalars) {
  const int64_t v = p.vocab_size, d = p.hidden_size;
  GemmArgs gemm = make_gemm(v, d, p.num_tokens, {terms, ld_terms, p.dtype, true},
                            {x_scaled, d, p.dtype, false}, p.grad_weight, d, p.dtype, false);
  if (g != nullptr) {
    gemm.device_alpha = g;
    gemm.device_beta = scalars + kScalarZero;
  }
  return be.gemm(gemm);
}

}  // namespace

Status run_forward(Device device, const ForwardParams& p) {
  FLCE_RETURN_IF_ERROR(check_device(device));
  FLCE_RETURN_IF_ERROR(validate_common(p));
  if (p.loss == nullptr) return invalid("loss must not be null");
  const Plan& plan = p.plan;
  const int64_t n = p.num_tokens, v = p.vocab_size, d = p.hidden_size;
  const bool grads = p.grad_x || p.grad_weight || p.grad_bias;
  if (grads && plan.strategy != Strategy::kGradInForward) {
    return invalid(
        "grad_x / grad_weight / grad_bias were given to forward, but plan.strategy is "
        "not grad_in_forward (the recompute strategy computes them in backward)");
  }
  if (grads && p.options.reduction == Reduction::kNone) {
    return invalid("gradients in the forward need reduction mean or sum, got none");
  }
  if (p.grad_bias && !p.bias) return invalid("grad_bias was given but bias is null");
  if (plan.forward_token_chunk < 1) {
    return invalid("plan.forward_token_chunk must be >= 1, got " +
                   std::to_string(plan.forward_token_chunk));
  }
  if (grads && !(plan.dw_group_tokens == plan.forward_token_chunk || plan.dw_group_tokens >= n)) {
    return invalid("plan.dw_group_tokens must equal plan.forward_token_chunk or cover all tokens");
  }
  if (plan.forward_vocab_chunk < 0) {
    return invalid("plan.forward_vocab_chunk must be >= 0, got " +
                   std::to_string(plan.forward_vocab_chunk));
  }

  const Problem prob = problem_of(p);
  const BackendTraits traits = backend_traits(device);
  FLCE_RETURN_IF_ERROR(check_gemm_scratch(plan, traits));
  int64_t block_cols = forward_cols(prob, plan);
  if (grads && block_cols < v) {
    return invalid(
        "plan.forward_vocab_chunk must be 0 or >= vocab_size when the forward computes "
        "gradients (dZ needs each row's LSE before any of its block is written)");
  }
  const ForwardLayout l = forward_layout(prob, plan, traits);
  FLCE_RETURN_IF_ERROR(check_workspace(p.workspace, p.workspace_bytes, l.total));
  void* ws = p.workspace;
  auto be = make_backend(device, l, ws, plan, traits, p.stream, p.allow_tf32);
  if (!be) return Status::Error(StatusCode::kNotCompiled, "backend unavailable");

  float* scalars = reinterpret_cast<float*>(at(ws, l.scalars));
  FLCE_RETURN_IF_ERROR(be->prepare(prepare_args(p, scalars)));

  float* lse = p.lse ? p.lse : reinterpret_cast<float*>(at(ws, l.lse));
  float* row_loss = p.options.reduction == Reduction::kNone
                        ? p.loss
                        : reinterpret_cast<float*>(at(ws, l.row_loss));
  // Per-row metrics only when the caller asked for them (the row math then skips their sums).
  float* row_metrics =
      p.metrics != nullptr ? reinterpret_cast<float*>(at(ws, l.row_metrics)) : nullptr;
  float* logits = reinterpret_cast<float*>(at(ws, l.logits));
  const size_t block_bytes = forward_block_bytes(prob, plan);
  const DType dz_type = traits.dz_type(p.dtype);
  int64_t chunk = plan.forward_token_chunk;
  // Compact blocks hold partial statistics only. Every block is alike in alignment, so the first
  // one decides whether the fused GEMM serves them; if not, fp32 blocks of up to
  // kFallbackStatsCols columns and as many rows as fit the same bytes run instead (a compact
  // block holds >= 36 bytes per row, so at least 9 columns of one row).
  if (compact_forward(prob, plan)) {
    const int64_t rows = std::min(chunk, n);
    RowForwardArgs rf = row_forward_args(p, rows, 0, scalars, row_loss, lse, row_metrics);
    rf.cols = block_cols;
    if (!fused_stats_fit(plan, *be, logits_operands(p, p.x, rows, 0, block_cols), rf,
                         block_bytes)) {
      constexpr int64_t kFallbackStatsCols = 16384;
      const int64_t floats = static_cast<int64_t>(block_bytes / sizeof(float));
      block_cols = std::min({v, kFallbackStatsCols, floats});
      chunk = std::clamp<int64_t>(floats / block_cols, 1, chunk);
    }
  }
  const bool in_place = dz_in_place(plan);
  // Where the terms (or dZ) of the dZ group's rows live, at pitch compact_ld(V).
  void* dz_group = l.dz_group == kAbsent ? nullptr : at(ws, l.dz_group);
  // Grad-in-forward compact blocks: the fused GEMM stores the fp16 terms exp(z - tile max) (in the
  // block, or in the dZ group's rows) and the partials, then the row kernels finish the LSE and
  // turn the terms into dZ in place. If the fused GEMM refuses the first block, fp32 blocks of as
  // many whole rows as fit the same bytes run (the layout holds at least one).
  bool gif_compact = compact_gif(prob, plan);
  if (gif_compact) {
    const int64_t rows = std::min(chunk, n);
    RowForwardArgs rf = row_forward_args(p, rows, 0, scalars, row_loss, lse, row_metrics);
    carve_gif_block(logits, rows, &rf, dz_group);
    gif_compact = plan.fused_logits != FusedLogits::kOff &&
                  be->fused_stats(logits_operands(p, p.x, rows, 0, v), rf);
    if (!gif_compact) {
      chunk = std::max<int64_t>(1, static_cast<int64_t>(block_bytes / (sizeof(float) * v)));
    }
  }
  RowCarry* carry = block_cols < v ? reinterpret_cast<RowCarry*>(at(ws, l.row_carry)) : nullptr;
  // Row-shifted terms where the plan and the call's options allow them.
  const bool shifted = gif_compact && shifted_terms(prob, plan) && shifted_terms_serve(p);
  const ShiftedLayout shifted_l =
      shifted ? shifted_layout(plan.forward_token_chunk, shifted_group_rows(plan), d, p.dtype,
                               p.grad_x != nullptr)
              : ShiftedLayout{};
  // The upstream factor of every row (mean: 1 / denominator), applied to dx and dW at the end.
  const float* shifted_g =
      p.options.reduction == Reduction::kMean ? scalars + kScalarInvDenominator : nullptr;

  // Where dW accumulates across token chunks with 16-bit W: an fp32 accumulator that borrows
  // grad_weight's own bytes for its first rows (dw_accumulator_borrowed_rows). Otherwise dW is one
  // GEMM straight into the output (one group covers all tokens), or accumulates in the fp32 output.
  SplitAccumulator dw_acc;
  if (p.grad_weight && l.dw_accum != kAbsent) {
    dw_acc.rows = v;
    dw_acc.borrowed_rows = dw_accumulator_borrowed_rows(v);
    dw_acc.borrowed = static_cast<float*>(p.grad_weight);
    dw_acc.own = reinterpret_cast<float*>(at(ws, l.dw_accum));
    if (dw_acc.borrowed_rows > 0 && reinterpret_cast<uintptr_t>(p.grad_weight) % 16 != 0) {
      return invalid(
          "grad_weight must be 16-byte aligned: this plan accumulates dW in fp32 partly in "
          "grad_weight's own memory");
    }
  }
  float* db_accum = l.db_accum == kAbsent ? nullptr : reinterpret_cast<float*>(at(ws, l.db_accum));

  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t rows = std::min(chunk, n - t0);
    const void* x_chunk = offset_ptr(p.x, t0 * p.x_row_stride, p.dtype);

    if (carry != nullptr) {  // statistics only, merged across vocabulary blocks
      for (int64_t v0 = 0; v0 < v; v0 += block_cols) {
        const int64_t cols = std::min(block_cols, v - v0);
        RowForwardArgs rf = row_forward_args(p, rows, t0, scalars, row_loss, lse, row_metrics);
        rf.cols = cols;
        rf.col_offset = v0;
        rf.carry = carry;
        FLCE_RETURN_IF_ERROR(stats_block(*be, plan, logits_operands(p, x_chunk, rows, v0, cols), rf,
                                         logits, block_bytes));
      }
      continue;
    }
    if (!grads) {  // statistics of whole rows
      RowForwardArgs rf = row_forward_args(p, rows, t0, scalars, row_loss, lse, row_metrics);
      rf.cols = v;
      FLCE_RETURN_IF_ERROR(
          stats_block(*be, plan, logits_operands(p, x_chunk, rows, 0, v), rf, logits, block_bytes));
      continue;
    }

    const int64_t group_start = in_place ? t0 : 0;
    void* dz = nullptr;
    int64_t ldz = 0;
    if (in_place) {
      dz = logits;
      ldz = gif_compact ? compact_ld(v) : in_place_ld(v, dz_type);
    } else {
      ldz = compact_ld(v);
      dz = offset_ptr(dz_group, (t0 - group_start) * ldz, dz_type);
    }

    RowForwardArgs rf = row_forward_args(p, rows, t0, scalars, row_loss, lse, row_metrics);
    const LogitsOperands op = logits_operands(p, x_chunk, rows, 0, v);
    if (shifted) {
      carve_gif_block(logits, rows, &rf, in_place ? nullptr : dz);
      FLCE_RETURN_IF_ERROR(shifted_chunk(*be, p, op, rf, static_cast<char*>(at(ws, l.shifted)),
                                         shifted_l, t0 - group_start, shifted_g, dw_acc));
      continue;
    }
    if (gif_compact) {
      carve_gif_block(logits, rows, &rf, in_place ? nullptr : dz);
      FLCE_RETURN_IF_ERROR(be->logits_stats(op, rf));
      FLCE_RETURN_IF_ERROR(be->rows_forward(rf));
      FLCE_RETURN_IF_ERROR(be->rows_grad(grad_from_exp_args(rf, dz, ldz, dz_type)));
    } else {
      // fp32 logits of the chunk, then the loss and dZ by the row kernel
      FLCE_RETURN_IF_ERROR(logits_gemm(*be, op, logits));
      rf.logits = logits;
      rf.ld = v;
      rf.dz = dz;
      rf.ldz = ldz;
      rf.dz_type = dz_type;
      FLCE_RETURN_IF_ERROR(be->rows_forward(rf));
    }

    if (p.grad_x) {  // dx[chunk] = dZ W
      FLCE_RETURN_IF_ERROR(
          be->gemm(make_gemm(rows, d, v, {dz, ldz, dz_type, false}, {p.weight, d, p.dtype, false},
                             offset_ptr(p.grad_x, t0 * d, p.dtype), d, p.dtype, false)));
    }
    if (db_accum) {
      ColumnSumArgs cs;
      cs.block = dz;
      cs.ld = ldz;
      cs.type = dz_type;
      cs.rows = rows;
      cs.cols = v;
      cs.acc = db_accum;
      cs.accumulate = t0 > 0;
      FLCE_RETURN_IF_ERROR(be->column_sum(cs));
    }
    const bool group_ends = in_place || t0 + rows == n;
    if (p.grad_weight && group_ends) {  // dW (+)= dZ_group^T x_group
      const int64_t group_rows = t0 + rows - group_start;
      const Operand dz_t{in_place ? dz : dz_group, ldz, dz_type, true};
      const Operand x_group{offset_ptr(p.x, group_start * p.x_row_stride, p.dtype), p.x_row_stride,
                            p.dtype, false};
      if (dw_acc.rows > 0) {
        FLCE_RETURN_IF_ERROR(accumulate_gemm(*be, dw_acc, d, group_rows, dz_t, x_group,
                                             group_start > 0,
                                             /*measure_algorithm=*/true));
      } else {
        FLCE_RETURN_IF_ERROR(be->gemm(make_gemm(v, d, group_rows, dz_t, x_group, p.grad_weight, d,
                                                p.dtype, group_start > 0)));
      }
    }
  }

  FinalizeArgs fin;
  fin.row_loss = row_loss;
  fin.lse = lse;
  fin.row_metrics = row_metrics;
  fin.scalars = scalars;
  fin.num_tokens = n;
  fin.reduction = p.options.reduction;
  fin.loss = p.loss;
  fin.metrics = p.metrics;
  FLCE_RETURN_IF_ERROR(be->finalize(fin));

  if (grads) {
    if (n == 0) {  // no chunk ran: the gradients are zero
      if (p.grad_weight)
        FLCE_RETURN_IF_ERROR(be->fill_zero(p.grad_weight, v * d * dtype_size(p.dtype)));
      if (p.grad_bias) FLCE_RETURN_IF_ERROR(be->fill_zero(p.grad_bias, v * dtype_size(p.dtype)));
    } else {
      if (dw_acc.rows > 0) {  // with shifted terms it still lacks the upstream factor g
        FLCE_RETURN_IF_ERROR(finish_accumulator(*be, dw_acc, d, p.grad_weight, p.dtype,
                                                shifted ? shifted_g : nullptr));
      } else if (shifted && p.grad_weight) {
        // One group covers every token: the terms of all of them (in the dZ group's rows, or in
        // the block of the one chunk that holds them all) for one dW GEMM.
        const void* x_scaled = static_cast<char*>(at(ws, l.shifted)) + shifted_l.x_scaled;
        FLCE_RETURN_IF_ERROR(group_dw_gemm(*be, p, in_place ? logits : dz_group, compact_ld(v),
                                           x_scaled, shifted_g, scalars));
      }
      if (p.grad_bias) {
        FLCE_RETURN_IF_ERROR(cast_rows(*be, db_accum, DType::kFloat32, p.grad_bias, p.dtype, 1, v));
      }
    }
  }
  return Status::Ok();
}

Status run_backward(Device device, const BackwardParams& p) {
  FLCE_RETURN_IF_ERROR(check_device(device));
  FLCE_RETURN_IF_ERROR(validate_common(p));
  const Plan& plan = p.plan;
  const int64_t n = p.num_tokens, v = p.vocab_size, d = p.hidden_size;
  if (plan.strategy != Strategy::kRecompute) {
    return invalid(
        "backward needs a recompute plan; with grad_in_forward the forward already "
        "produced the gradients");
  }
  if (p.grad_bias && !p.bias) return invalid("grad_bias was given but bias is null");
  if (n > 0 && p.lse == nullptr) return invalid("lse must not be null (the forward's output)");
  if (n > 0 && p.grad_loss == nullptr) return invalid("grad_loss must not be null");
  const bool grads = p.grad_x || p.grad_weight || p.grad_bias;
  if (!grads) return Status::Ok();
  if (plan.backward_token_chunk < 1 || plan.backward_vocab_chunk < 1) {
    return invalid("plan.backward_token_chunk and plan.backward_vocab_chunk must be >= 1");
  }
  if (plan.backward_order != BackwardOrder::kVocabOuter &&
      plan.backward_order != BackwardOrder::kTokenOuter) {
    return invalid("plan.backward_order must be vocab_outer or token_outer, got code " +
                   std::to_string(static_cast<int>(plan.backward_order)));
  }

  const Problem prob = problem_of(p);
  const BackendTraits traits = backend_traits(device);
  FLCE_RETURN_IF_ERROR(check_gemm_scratch(plan, traits));
  const BackwardLayout l = backward_layout(prob, plan, traits);
  FLCE_RETURN_IF_ERROR(check_workspace(p.workspace, p.workspace_bytes, l.total));
  void* ws = p.workspace;
  auto be = make_backend(device, l, ws, plan, traits, p.stream, p.allow_tf32);
  if (!be) return Status::Error(StatusCode::kNotCompiled, "backend unavailable");

  if (n == 0) {
    if (p.grad_weight)
      FLCE_RETURN_IF_ERROR(be->fill_zero(p.grad_weight, v * d * dtype_size(p.dtype)));
    if (p.grad_bias) FLCE_RETURN_IF_ERROR(be->fill_zero(p.grad_bias, v * dtype_size(p.dtype)));
    return Status::Ok();
  }

  float* scalars = reinterpret_cast<float*>(at(ws, l.scalars));
  FLCE_RETURN_IF_ERROR(be->prepare(prepare_args(p, scalars)));

  const DType dz_type = traits.dz_type(p.dtype);
  const int64_t bt = plan.backward_token_chunk;
  float* logits = reinterpret_cast<float*>(at(ws, l.logits));
  float* dx_accum = l.dx_accum == kAbsent ? nullptr : reinterpret_cast<float*>(at(ws, l.dx_accum));
  float* db_accum = l.db_accum == kAbsent ? nullptr : reinterpret_cast<float*>(at(ws, l.db_accum));
  const bool borrow_dx = dx_accum != nullptr && dx_accumulator_borrows_dx(prob, plan);
  if (borrow_dx && reinterpret_cast<uintptr_t>(p.grad_x) % 16 != 0) {
    return invalid(
        "grad_x must be 16-byte aligned: this plan accumulates dx in fp32 partly in dx's own "
        "memory");
  }
  // Where a block's dZ goes: in place over the logits block (fp32 rows hold the dZ row at their
  // start, or compact rows at compact_ld) or, vocabulary-outer with several token blocks, in
  // dz_vocab. Every block is alike in alignment, so the first one decides whether compact blocks
  // can be fused; if not, the unfused path runs on half-width vocabulary chunks.
  const bool gathered = !token_outer(plan) && bt < n;
  void* const dz_base = gathered ? at(ws, l.dz_vocab) : static_cast<void*>(logits);
  int64_t bv = plan.backward_vocab_chunk;
  bool compact = false;
  if (plan.compact_backward_blocks) {
    const int64_t rows = std::min(bt, n), cols = std::min(bv, v);
    compact = plan.fused_logits != FusedLogits::kOff &&
              be->fused_grad(logits_operands(p, p.x, rows, 0, cols),
                             row_grad_args(p, scalars, logits, rows, cols, 0, 0, dz_base,
                                           compact_ld(cols), dz_type));
    if (!compact) bv = fallback_vocab_chunk(plan);
  }
  const auto block_ldz = [&](int64_t cols) {
    return gathered || compact ? compact_ld(cols) : in_place_ld(cols, dz_type);
  };

  if (token_outer(plan)) {
    for (int64_t t0 = 0; t0 < n; t0 += bt) {
      const int64_t rows = std::min(bt, n - t0);
      const void* x_block = offset_ptr(p.x, t0 * p.x_row_stride, p.dtype);
      // dx of this token chunk: straight into the output when it is fp32 or when one vocabulary
      // chunk covers V, else accumulated in fp32 and converted once.
      const SplitAccumulator acc = dx_accumulator(p, borrow_dx, dx_accum, t0, rows);
      for (int64_t v0 = 0; v0 < v; v0 += bv) {
        const int64_t cols = std::min(bv, v - v0);
        const void* w_chunk = offset_ptr(p.weight, v0 * d, p.dtype);
        // dZ of x[t0:] W[v0:]^T, in place over the logits block.
        const int64_t ldz = block_ldz(cols);
        FLCE_RETURN_IF_ERROR(grad_block(
            *be, plan, compact, logits_operands(p, x_block, rows, v0, cols),
            row_grad_args(p, scalars, logits, rows, cols, t0, v0, logits, ldz, dz_type), logits));
        if (dx_accum) {  // dx[chunk] (+)= dZ W[v0:v0+cols]
          FLCE_RETURN_IF_ERROR(accumulate_gemm(*be, acc, d, cols, {logits, ldz, dz_type, false},
                                               {w_chunk, d, p.dtype, false}, v0 > 0,
                                               /*measure_algorithm=*/false));
        } else if (p.grad_x) {
          FLCE_RETURN_IF_ERROR(be->gemm(
              make_gemm(rows, d, cols, {logits, ldz, dz_type, false}, {w_chunk, d, p.dtype, false},
                        offset_ptr(p.grad_x, t0 * d, p.dtype), d, p.dtype, v0 > 0)));
        }
        if (p.grad_weight) {  // dW[v0:v0+cols] (+)= dZ^T x[chunk], in dW's own dtype
          FLCE_RETURN_IF_ERROR(
              be->gemm(make_gemm(cols, d, rows, {logits, ldz, dz_type, true},
                                 {x_block, p.x_row_stride, p.dtype, false},
                                 offset_ptr(p.grad_weight, v0 * d, p.dtype), d, p.dtype, t0 > 0)));
        }
        if (p.grad_bias) {
          ColumnSumArgs cs;
          cs.block = logits;
          cs.ld = ldz;
          cs.type = dz_type;
          cs.rows = rows;
          cs.cols = cols;
          cs.acc = db_accum + v0;
          cs.accumulate = t0 > 0;
          FLCE_RETURN_IF_ERROR(be->column_sum(cs));
        }
      }
      if (dx_accum) {
        FLCE_RETURN_IF_ERROR(finish_accumulator(*be, acc, d, offset_ptr(p.grad_x, t0 * d, p.dtype),
                                                p.dtype, nullptr));
      }
    }
    if (p.grad_bias) {
      FLCE_RETURN_IF_ERROR(cast_rows(*be, db_accum, DType::kFloat32, p.grad_bias, p.dtype, 1, v));
    }
    return Status::Ok();
  }

  // Vocabulary-outer: dZ of all N tokens for one vocabulary chunk, then its GEMMs.
  const SplitAccumulator acc = dx_accumulator(p, borrow_dx, dx_accum, 0, n);
  for (int64_t v0 = 0; v0 < v; v0 += bv) {
    const int64_t cols = std::min(bv, v - v0);
    const void* w_chunk = offset_ptr(p.weight, v0 * d, p.dtype);
    const int64_t ldz = block_ldz(cols);
    for (int64_t t0 = 0; t0 < n; t0 += bt) {
      const int64_t rows = std::min(bt, n - t0);
      // dZ of x[t0:] W[v0:]^T
      const void* x_block = offset_ptr(p.x, t0 * p.x_row_stride, p.dtype);
      FLCE_RETURN_IF_ERROR(
          grad_block(*be, plan, compact, logits_operands(p, x_block, rows, v0, cols),
                     row_grad_args(p, scalars, logits, rows, cols, t0, v0,
                                   offset_ptr(dz_base, t0 * ldz, dz_type), ldz, dz_type),
                     logits));
    }

    if (p.grad_weight) {  // dW[v0:v0+cols] = dZ^T x, written once
      FLCE_RETURN_IF_ERROR(be->gemm(make_gemm(
          cols, d, n, {dz_base, ldz, dz_type, true}, {p.x, p.x_row_stride, p.dtype, false},
          offset_ptr(p.grad_weight, v0 * d, p.dtype), d, p.dtype, false)));
    }
    if (dx_accum) {  // dx (+)= dZ W[v0:v0+cols]
      FLCE_RETURN_IF_ERROR(accumulate_gemm(*be, acc, d, cols, {dz_base, ldz, dz_type, false},
                                           {w_chunk, d, p.dtype, false}, v0 > 0,
                                           /*measure_algorithm=*/false));
    } else if (p.grad_x) {
      FLCE_RETURN_IF_ERROR(
          be->gemm(make_gemm(n, d, cols, {dz_base, ldz, dz_type, false},
                             {w_chunk, d, p.dtype, false}, p.grad_x, d, p.dtype, v0 > 0)));
    }
    if (p.grad_bias) {
      ColumnSumArgs cs;
      cs.block = dz_base;
      cs.ld = ldz;
      cs.type = dz_type;
      cs.rows = n;
      cs.cols = cols;
      cs.acc = db_accum;
      FLCE_RETURN_IF_ERROR(be->column_sum(cs));
      FLCE_RETURN_IF_ERROR(cast_rows(*be, db_accum, DType::kFloat32,
                                     offset_ptr(p.grad_bias, v0, p.dtype), p.dtype, 1, cols));
    }
  }
  if (dx_accum) {
    FLCE_RETURN_IF_ERROR(finish_accumulator(*be, acc, d, p.grad_x, p.dtype, nullptr));
  }
  return Status::Ok();
}

Status run_cross_entropy_logits(Device device, const LogitsParams& p) {
  FLCE_RETURN_IF_ERROR(check_device(device));
  if (!valid_dtype(p.dtype)) return invalid("dtype must be float32, float16 or bfloat16");
  if (p.label_type != IndexType::kInt64 && p.label_type != IndexType::kInt32) {
    return invalid("label_type must be int64 or int32");
  }
  if (p.num_tokens < 0)
    return invalid("num_tokens must be >= 0, got " + std::to_string(p.num_tokens));
  if (p.vocab_size < 1)
    return invalid("vocab_size must be >= 1, got " + std::to_string(p.vocab_size));
  FLCE_RETURN_IF_ERROR(validate_options(p.options));
  if (p.loss == nullptr) return invalid("loss must not be null");
  if (p.num_tokens > 0 && (p.logits == nullptr || p.labels == nullptr)) {
    return invalid(p.logits == nullptr ? "logits must not be null" : "labels must not be null");
  }
  if (p.logits_row_stride < p.vocab_size) {
    return invalid("logits_row_stride must be >= vocab_size (" + std::to_string(p.vocab_size) +
                   "), got " + std::to_string(p.logits_row_stride));
  }
  if (p.grad_logits && p.grad_row_stride < p.vocab_size) {
    return invalid("grad_row_stride must be >= vocab_size (" + std::to_string(p.vocab_size) +
                   "), got " + std::to_string(p.grad_row_stride));
  }
  const size_t need = logits_workspace_bytes(p.num_tokens);
  FLCE_RETURN_IF_ERROR(check_workspace(p.workspace, p.workspace_bytes, need));
  // No GEMM runs here, so no scratch is needed.
  auto be = make_backend(device, nullptr, 0, p.stream, false);
  if (!be) return Status::Error(StatusCode::kNotCompiled, "backend unavailable");

  const int64_t n = p.num_tokens;
  char* ws = static_cast<char*>(p.workspace);
  auto region = [&](int i) {  // same carving as logits_workspace_bytes()
    const size_t stride =
        (static_cast<size_t>(std::max<int64_t>(n, kNumScalars)) * kNumRowMetrics * sizeof(float) +
         kWorkspaceAlignment - 1) /
        kWorkspaceAlignment * kWorkspaceAlignment;
    return reinterpret_cast<float*>(ws + i * stride);
  };
  float* scalars = region(0);
  float* row_loss = p.options.reduction == Reduction::kNone ? p.loss : region(1);
  float* lse = p.lse ? p.lse : region(2);
  float* row_metrics = region(3);

  FLCE_RETURN_IF_ERROR(be->prepare(prepare_args(p, scalars)));

  if (n > 0) {
    RowForwardArgs rf;
    rf.logits = p.logits;
    rf.ld = p.logits_row_stride;
    rf.logits_type = p.dtype;
    rf.rows = n;
    rf.vocab_size = p.vocab_size;
    rf.labels = p.labels;
    rf.label_type = p.label_type;
    rf.class_weight = p.class_weight;
    rf.options = p.options;
    rf.scalars = scalars;
    rf.row_loss = row_loss;
    rf.lse = lse;
    rf.row_metrics = row_metrics;
    rf.dz = p.grad_logits;
    rf.ldz = p.grad_row_stride;
    rf.dz_type = p.dtype;
    rf.grad_loss = p.grad_scale;
    rf.grad_lse = p.grad_lse;
    FLCE_RETURN_IF_ERROR(be->rows_forward(rf));
  }
  FinalizeArgs fin;
  fin.row_loss = row_loss;
  fin.lse = lse;
  fin.row_metrics = row_metrics;
  fin.scalars = scalars;
  fin.num_tokens = n;
  fin.reduction = p.options.reduction;
  fin.loss = p.loss;
  fin.metrics = p.metrics;
  return be->finalize(fin);
}

Status run_scale_in_place(Device device, const ScaleParams& p) {
  FLCE_RETURN_IF_ERROR(check_device(device));
  if (!valid_dtype(p.dtype)) return invalid("dtype must be float32, float16 or bfloat16");
  if (p.count < 0) return invalid("count must be >= 0, got " + std::to_string(p.count));
  if (p.count == 0) return Status::Ok();
  if (p.data == nullptr) return invalid("data must not be null");
  if (p.scale == nullptr) return invalid("scale must not be null");
  auto be = make_backend(device, nullptr, 0, p.stream, false);
  if (!be) return Status::Error(StatusCode::kNotCompiled, "backend unavailable");
  return be->scale(p.data, p.dtype, p.count, p.scale);
}

}  // namespace detail

size_t logits_workspace_bytes(int64_t num_tokens) {
  const size_t stride = (static_cast<size_t>(std::max<int64_t>(num_tokens, detail::kNumScalars)) *
                             detail::kNumRowMetrics * sizeof(float) +
                         detail::kWorkspaceAlignment - 1) /
                        detail::kWorkspaceAlignment * detail::kWorkspaceAlignment;
  return 4 * stride;
}

Status forward(Device device, const ForwardParams& params) {
  return detail::run_forward(device, params);
}
Status backward(Device device, const BackwardParams& params) {
  return detail::run_backward(device, params);
}
Status cross_entropy_logits(Device device, const LogitsParams& params) {
  return detail::run_cross_entropy_logits(device, params);
}
Status scale_in_place(Device device, const ScaleParams& params) {
  return detail::run_scale_in_place(device, params);
}
bool cuda_available() { return detail::cuda_compiled(); }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace flce
