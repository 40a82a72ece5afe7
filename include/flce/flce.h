// flce: fused linear cross-entropy without materializing the [N, V] logits.
//
// The public, torch-free C++ API. Everything a caller needs is here: plain structs of pointers,
// sizes and strides, a status with a readable message, a planner that turns a memory budget into
// a chunking, and the entry points of each backend.
//
// Semantics (identical in every backend):
//   r = x W^T + b                                  (x [N, D], W [V, D], b [V])
//   z = logit_scale * r;  if softcap > 0: z = softcap * tanh(z / softcap)
//   loss_i = (1 - eps) * w[y_i] * (lse_i - z_{i,y_i})
//          + (eps / V) * sum_c w[c] * (lse_i - z_{i,c})
//          + z_loss * lse_i^2                      (for rows with y_i != ignore_index, else 0)
//   mean: sum_i loss_i / sum_{valid i} w[y_i]     (0 when no row is valid)
//   sum:  sum_i loss_i
//   none: loss_i                                   ([N])
// which is torch.nn.functional.cross_entropy(z, y, weight=w, ignore_index, reduction,
// label_smoothing=eps) plus a PaLM-style z-loss; w = 1 without class weights.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flce {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexType : int32_t { kInt64 = 0, kInt32 = 1 };
enum class Reduction : int32_t { kMean = 0, kSum = 1, kNone = 2 };
enum class Device : int32_t { kCpu = 0, kCuda = 1 };

// How the work is split. Both strategies produce the same numbers (within rounding).
enum class Strategy : int32_t {
  kAuto = 0,
  // Gradients are computed during the forward pass (6NVD flops): per token chunk, logits, then
  // loss and dZ in place, then dx for the chunk and dW. Backward only rescales.
  kGradInForward = 1,
  // The forward keeps only the per-token LSE (2NVD); the backward recomputes the logits block by
  // block (6NVD): O(N) memory beyond a block (and, in the vocabulary-outer order, an fp32 dx).
  kRecompute = 2,
};

// The loop order of the recompute backward.
enum class BackwardOrder : int32_t {
  // For each vocabulary chunk, dZ of all N tokens, so each dW slice is written once and dx
  // accumulates over the chunks (in an fp32 [N, D] workspace unless dx is fp32).
  kVocabOuter = 0,
  // For each token chunk, every vocabulary chunk: dx of the chunk accumulates in an fp32
  // [chunk, D] workspace and is written once; dW accumulates over the token chunks in its own
  // dtype (the planner keeps 16-bit accumulation to a few chunks: bench/NOTES.md measures the
  // error). Needs no [N, D] buffer, so it fits budgets of a few MiB.
  kTokenOuter = 1,
};

enum class StatusCode : int32_t {
  kOk = 0,
  kInvalidArgument = 1,
  kBudgetTooSmall = 2,
  kNotCompiled = 3,   // the backend was not built into this library
  kBackendError = 4,  // a CUDA / cuBLAS / BLAS call failed
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;

  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return {}; }
  static Status Error(StatusCode c, std::string msg) { return {c, std::move(msg)}; }
};

// Indices into the metrics output ([kNumMetrics] float32). All are over rows whose label is not
// ignore_index, computed on the transformed logits z, unweighted by class weights.
enum Metric : int32_t {
  kMetricMaxLogit = 0,     // max_i max_c z_ic
  kMetricLogitNorm = 1,    // mean_i ||z_i||_2
  kMetricEntropy = 2,      // mean_i H(softmax(z_i))
  kMetricLseSquared = 3,   // mean_i lse_i^2 (the z-loss before its coefficient)
  kMetricAccuracy = 4,     // mean_i [argmax_c z_ic == y_i]
  kMetricValidTokens = 5,  // number of rows whose label is not ignore_index
  kNumMetrics = 6,
};

struct LossOptions {
  int64_t ignore_index = -100;
  Reduction reduction = Reduction::kMean;
  float label_smoothing = 0.0f;  // eps in [0, 1]
  float z_loss = 0.0f;           // >= 0
  float softcap = 0.0f;          // > 0 enables z = softcap * tanh(z / softcap); 0 disables
  float logit_scale = 1.0f;      // finite
};

// The sizes and flags that decide the plan. Filled by the caller, checked by validate_*().
struct Problem {
  int64_t num_tokens = 0;   // N
  int64_t vocab_size = 0;   // V
  int64_t hidden_size = 0;  // D
  DType dtype = DType::kFloat32;
  Reduction reduction = Reduction::kMean;
  bool has_bias = false;
  bool needs_grad_x = false;
  bool needs_grad_weight = false;
  bool needs_grad_bias = false;
  // The caller will backpropagate through the returned LSE: only the recompute strategy can.
  bool needs_grad_lse = false;
  // Options that decide whether a backend's fused logits GEMMs can serve the call, and so how
  // much a block of the budget holds: soft-capping (softcap > 0) and label smoothing with class
  // weights take the row kernels.
  bool has_softcap = false;
  bool has_weighted_smoothing = false;
  // The forward will return the monitoring metrics (flce::Metric).
  bool needs_metrics = false;
};

// kAuto: where the backend can run them and expects them to be faster (the CUDA backend fuses
// dZ only for blocks of several waves of CTA tiles); kAlways: wherever it can (tests, tuning);
// kOff: never.
enum class FusedLogits : int32_t { kOff = 0, kAuto = 1, kAlways = 2 };

struct Plan {
  Strategy strategy = Strategy::kRecompute;
  // Rows of one forward logits block [forward_token_chunk, V] (both strategies).
  int64_t forward_token_chunk = 0;
  // Grad-in-forward: tokens whose dZ is kept before one dW GEMM. When it covers all N the dW
  // GEMM writes the output directly and no fp32 dW accumulator is needed; when it equals
  // forward_token_chunk, dZ overwrites the logits block in place.
  int64_t dw_group_tokens = 0;
  // Columns of one forward logits block; 0 (or >= V) means whole rows. Only a forward without
  // gradients may split rows: the row statistics are merged across the blocks.
  int64_t forward_vocab_chunk = 0;
  // Recompute backward: a logits block is [backward_token_chunk, backward_vocab_chunk], walked in
  // backward_order. In the vocabulary-outer order, dZ of all N tokens of one vocabulary chunk is
  // kept (gathered when the token chunks do not cover N) so that slice of dW is written once.
  int64_t backward_token_chunk = 0;
  int64_t backward_vocab_chunk = 0;
  BackwardOrder backward_order = BackwardOrder::kVocabOuter;
  // Scratch for the backend's GEMMs, carved from the workspace; 0 means the backend's preferred
  // size (the planner lowers it under small budgets, never below the backend's minimum).
  size_t gemm_scratch_bytes = 0;
  // Whether statistics-only forward blocks and recompute dZ blocks run through the backend's
  // fused logits GEMMs (CUDA on compute capability 9.0, 16-bit inputs: the row math runs in the
  // GEMM's epilogue and no logits block is stored) instead of a GEMM + the row kernels.
  FusedLogits fused_logits = FusedLogits::kAuto;
  // Recompute backward blocks hold dZ only, in the input dtype (the fused dZ GEMM writes it; no
  // fp32 logits block), so a budget holds blocks twice as large. The planner sets it where the
  // backend expects its fused GEMM to serve the problem; should the GEMM refuse a call anyway
  // (operands not 16-byte aligned, another device), the backward runs the unfused path on
  // vocabulary chunks half as wide, whose fp32 blocks fit the same bytes.
  bool compact_backward_blocks = false;
  // Statistics-only forward blocks (recompute, or no gradients) hold only the fused GEMM's partial
  // row statistics (one 32-byte state per row and 256 columns: 1/32 of the fp32 logits' bytes).
  // Grad-in-forward blocks hold the fp16 terms exp(z - tile max) the fused GEMM stores with them
  // (dZ then overwrites them), about half the fp32 logits' bytes; where one group keeps the dZ of
  // all tokens, the terms go straight into that group's rows and the block holds the statistics.
  // Set where the backend expects its fused statistics GEMM to serve the problem (no metrics asked
  // for); should it refuse a call anyway, the forward computes fp32 logits in blocks that fit the
  // same bytes: fewer rows, split into vocabulary blocks for statistics only (the rows' statistics
  // merged), whole for gradients.
  bool compact_forward_blocks = false;
  // Grad-in-forward compact blocks with 16-bit inputs: the fused GEMM stores the terms
  // exp(z - s_i), in the input dtype, with one shift per row known before the GEMM (the label's
  // logit plus kShiftAboveLabel), so that dZ is a per-row multiple of them. dx and dW then read the
  // terms as they are (the row factors applied to x and to the fp32 dx rows) instead of after a
  // pass that rewrites every term as dZ; only rows the terms cannot represent (a label far below
  // the row's max) are rewritten. dW accumulates per chunk in fp32, or (one group of all tokens)
  // is one GEMM of every token's terms. Serves calls without label smoothing, class weights or a
  // gradient of the LSE; other calls run the compact blocks as above.
  bool shifted_terms = false;
  size_t forward_workspace_bytes = 0;
  size_t backward_workspace_bytes = 0;
  // The smallest budget in which the strategies allowed by the request (all, or the forced one)
  // could run, for error messages.
  size_t min_budget_bytes = 0;
};

// The default budget for working memory beyond inputs and outputs: what any method that computes
// each logit once (6 N V D flops) must hold, the 16-bit logits of all tokens or an fp32 dW
// accumulator, plus 512 MiB: min(N V 2, V D 4) + 512 MiB bytes. The Llama heads get their fastest
// plan in it; where dW accumulates per token chunk a larger budget takes larger chunks, measured
// about 6% faster at Qwen-0.5B's head with 4 GiB (README, "The default budget").
size_t default_memory_budget(const Problem& problem);

// Chooses the strategy and chunking for `problem` on `device` within `memory_budget_bytes`.
// `forced` = kAuto lets the planner choose. Fails with kBudgetTooSmall (message gives the minimum)
// when no strategy fits, or kInvalidArgument when the forced strategy cannot serve the request.
Status make_plan(const Problem& problem, Device device, size_t memory_budget_bytes, Strategy forced,
                 Plan* plan);

// Forward: loss (and per-token LSE and metrics); with kGradInForward and grad pointers set, also
// dx, dW, db for an upstream gradient of 1 (the caller rescales in backward).
struct ForwardParams {
  // Inputs. x rows may be strided (row stride in elements, >= D); W and bias are contiguous.
  const void* x = nullptr;  // [N, D] dtype
  int64_t x_row_stride = 0;
  const void* weight = nullptr;  // [V, D] dtype
  const void* bias = nullptr;    // [V] dtype, or null
  const void* labels = nullptr;  // [N] int64 or int32
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;  // [V] float32, or null
  int64_t num_tokens = 0;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  DType dtype = DType::kFloat32;
  LossOptions options;

  // Outputs (device memory of the backend).
  float* loss = nullptr;        // [1] for mean/sum, [N] for none (0 at ignored rows)
  float* lse = nullptr;         // [N] or null
  float* metrics = nullptr;     // [kNumMetrics] or null
  void* grad_x = nullptr;       // [N, D] dtype, contiguous; only with kGradInForward
  void* grad_weight = nullptr;  // [V, D] dtype; only with kGradInForward
  void* grad_bias = nullptr;    // [V] dtype; only with kGradInForward

  Plan plan;
  void* workspace = nullptr;  // plan.forward_workspace_bytes, any alignment >= 256 B
  size_t workspace_bytes = 0;
  void* stream = nullptr;   // cudaStream_t for the CUDA backend
  bool allow_tf32 = false;  // fp32 GEMMs may use TF32 tensor cores (CUDA)
};

// Backward of the recompute strategy: recomputes logits and produces dx, dW, db for the given
// upstream gradients.
struct BackwardParams {
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;
  int64_t num_tokens = 0;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  DType dtype = DType::kFloat32;
  LossOptions options;

  const float* lse = nullptr;        // [N] saved by the forward
  const float* grad_loss = nullptr;  // [1] (mean/sum) or [N] (none)
  const float* grad_lse = nullptr;   // [N] or null

  void* grad_x = nullptr;       // [N, D] dtype or null
  void* grad_weight = nullptr;  // [V, D] dtype or null
  void* grad_bias = nullptr;    // [V] dtype or null

  Plan plan;
  void* workspace = nullptr;  // plan.backward_workspace_bytes
  size_t workspace_bytes = 0;
  void* stream = nullptr;
  bool allow_tf32 = false;
};

// Cross-entropy on given logits [N, V] (no GEMM): loss, LSE, metrics and, when grad_logits is
// set, the gradient for an upstream gradient of 1 (scaled by grad_scale if non-null, a device
// [1] or [N] float). grad_logits may alias logits (in place).
struct LogitsParams {
  const void* logits = nullptr;  // [N, V] dtype, row stride in elements
  int64_t logits_row_stride = 0;
  const void* labels = nullptr;
  IndexType label_type = IndexType::kInt64;
  const float* class_weight = nullptr;
  int64_t num_tokens = 0;
  int64_t vocab_size = 0;
  DType dtype = DType::kFloat32;
  LossOptions options;

  float* loss = nullptr;
  float* lse = nullptr;
  float* metrics = nullptr;
  void* grad_logits = nullptr;  // [N, V] dtype, row stride grad_row_stride; or null
  int64_t grad_row_stride = 0;
  const float* grad_scale = nullptr;  // [1] or [N] (reduction none); null means 1
  const float* grad_lse = nullptr;    // [N] or null

  void* workspace = nullptr;  // logits_workspace_bytes()
  size_t workspace_bytes = 0;
  void* stream = nullptr;
};

size_t logits_workspace_bytes(int64_t num_tokens);

// Multiplies `count` elements of `data` in place by *scale. `scale` lives where `data` does
// (device memory for CUDA) and is read by the kernel, so the host never waits; when *scale == 1
// the data is neither read nor written. This is how gradients computed in the forward are
// rescaled by the upstream gradient: free for a plain loss.backward().
struct ScaleParams {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t count = 0;
  const float* scale = nullptr;  // [1]
  void* stream = nullptr;
};

// Entry points. Each validates its params (every invalid argument gets a message naming it) and
// never throws. The CUDA ones are asynchronous on `stream` and never synchronize the host; a label
// out of range there cannot be reported synchronously, so it makes that row's loss NaN.
Status forward(Device device, const ForwardParams& params);
Status backward(Device device, const BackwardParams& params);
Status cross_entropy_logits(Device device, const LogitsParams& params);
Status scale_in_place(Device device, const ScaleParams& params);

// True when the CUDA backend was compiled into this build.
bool cuda_available();

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

}  // namespace flce
