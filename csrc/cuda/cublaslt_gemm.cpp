// Row-major GEMMs on cuBLASLt (column-major): a row-major [r, c] matrix with leading dimension ld
// is the column-major [c, r] matrix with the same ld, so C = op(A) op(B) is computed as the
// column-major C^T = op(B)^T op(A)^T: cuBLASLt's first operand is our B, its second our A, and
// its (m, n) are our (n, m).
#include "cuda/cublaslt_gemm.h"

#include <cublasLt.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/cuda_check.h"

namespace flce::detail::cuda {
namespace {

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// Largest power of two (up to 256) dividing the address: cuBLASLt's heuristic assumes 256-byte
// aligned operands unless told otherwise, and a pointer into the middle of a matrix (a token
// chunk of x, a row block of dZ) often is not.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

// Everything the descriptors and the chosen algorithm depend on.
struct GemmKey {
  int device = 0;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  DType ab_type = DType::kFloat32, c_type = DType::kFloat32;
  bool trans_a = false, trans_b = false, beta_zero = false, tf32 = false;
  bool measure = false;         // GemmArgs::measure_algorithm
  bool device_scalars = false;  // GemmArgs::device_alpha / device_beta
  uint32_t align_a = 0, align_b = 0, align_c = 0;
  uint64_t workspace_bytes = 0;

  bool operator==(const GemmKey& o) const {
    return device == o.device && m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb &&
           ldc == o.ldc && ab_type == o.ab_type && c_type == o.c_type && trans_a == o.trans_a &&
           trans_b == o.trans_b && beta_zero == o.beta_zero && tf32 == o.tf32 &&
           measure == o.measure && device_scalars == o.device_scalars && align_a == o.align_a &&
           align_b == o.align_b && align_c == o.align_c && workspace_bytes == o.workspace_bytes;
  }
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    size_t h = 0;
    auto mix = [&h](uint64_t v) {
      h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    };
    mix(static_cast<uint64_t>(k.device));
    mix(static_cast<uint64_t>(k.m));
    mix(static_cast<uint64_t>(k.n));
    mix(static_cast<uint64_t>(k.k));
    mix(static_cast<uint64_t>(k.lda));
    mix(static_cast<uint64_t>(k.ldb));
    mix(static_cast<uint64_t>(k.ldc));
    mix(static_cast<uint64_t>(k.ab_type) | (static_cast<uint64_t>(k.c_type) << 8) |
        (uint64_t(k.trans_a) << 16) | (uint64_t(k.trans_b) << 17) | (uint64_t(k.beta_zero) << 18) |
        (uint64_t(k.measure) << 20) | (uint64_t(k.tf32) << 19) |
        (uint64_t(k.device_scalars) << 21));
    mix(static_cast<uint64_t>(k.align_a) | (static_cast<uint64_t>(k.align_b) << 16) |
        (static_cast<uint64_t>(k.align_c) << 32));
    mix(k.workspace_bytes);
    return h;
  }
};

// Measured algorithm choice -----------------------------------------------------------------
//
// cuBLASLt's heuristic ranks its algorithms without running them, and for flce's accumulating
// GEMMs its first choice is often not the fastest: on an H200 (bench/accumulate_gemm_bench.cu),
// each half of grad-in-forward's dW GEMM at qwen-0.5b took 0.445 ms with the first of its
// candidates and 0.384 ms with the sixth (2048-token chunks), and at gemma2 1.78 against 1.54 ms.
// With the choice measured, the first calls of a shape run the heuristic's top kTuneCandidates in
// turn, each between two CUDA events that are read once they have completed (cudaEventQuery,
// never a wait); when every candidate has kTuneTrials times, the shape keeps the one with the
// lowest median. No call synchronizes, and a stream under graph capture runs the current choice
// and times nothing.
//
// By default only the GEMMs whose caller asks for it (GemmArgs::measure_algorithm:
// grad-in-forward's dW accumulation) are measured, among candidates that do not split K: each
// output element then sums its K products in the same order under every candidate (the benchmark's
// candidates gave identical bits at every shape it runs), so the first calls stay reproducible.
// Measuring every GEMM (FLCE_GEMM_TUNING=1) also picked slower algorithms elsewhere: the candidate
// that wins alone can lose inside the call (qwen-0.5b's dx GEMM, 6.9 -> 7.1 ms per call; the lean
// plans' dx accumulation at gemma2, 63.7 -> 67.1 ms per call; bench/NOTES.md, version 12).
constexpr int kTuneCandidates = 8;
constexpr int kTuneTrials = 3;

std::atomic<GemmTuning>& tuning_switch() {
  static std::atomic<GemmTuning> mode{[] {
    const char* v = std::getenv("FLCE_GEMM_TUNING");
    const std::string s = v != nullptr ? v : "";
    if (s == "0") return GemmTuning::kNone;
    if (s == "1") return GemmTuning::kAll;
    return GemmTuning::kRequested;
  }()};
  return mode;
}

// Whether an algorithm splits K (its partial sums then meet in another order).
bool splits_k(const cublasLtMatmulAlgo_t& algo) {
  uint32_t splits = 1;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                           sizeof(splits), &written) != CUBLAS_STATUS_SUCCESS) {
    return true;  // unknown: treat as splitting
  }
  return splits > 1;
}

struct Trial {
  int candidate = 0;
  cudaEvent_t start = nullptr, stop = nullptr;
};

struct Tuning {
  std::vector<cublasLtMatmulAlgo_t> candidates;  // the heuristic's order; [0] is its choice
  std::vector<std::vector<float>> ms;            // completed trials per candidate
  std::vector<int> launched;                     // trials launched per candidate
  std::deque<Trial> pending;                     // launched, not yet read, in launch order
  std::vector<cudaEvent_t> spare;                // events of read trials, for reuse
  bool settled = false;
};

// Descriptors and algorithm of one shape. Cached entries are never destroyed: they live as long
// as the process, because destroying them from static destructors may run after the CUDA context
// is gone.
struct GemmEntry {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr;  // cuBLASLt's first operand (our B)
  cublasLtMatrixLayout_t b = nullptr;  // cuBLASLt's second operand (our A)
  cublasLtMatrixLayout_t c = nullptr;  // C and D
  cublasLtMatmulAlgo_t algo{};
  std::shared_ptr<Tuning> tuning;  // while (and after) the algorithm is measured; else null
};

void destroy_entry(GemmEntry& e) {
  if (e.desc) cublasLtMatmulDescDestroy(e.desc);
  if (e.a) cublasLtMatrixLayoutDestroy(e.a);
  if (e.b) cublasLtMatrixLayoutDestroy(e.b);
  if (e.c) cublasLtMatrixLayoutDestroy(e.c);
  e = GemmEntry();
}

// Owns the descriptors while an entry is being built, so a failure half way releases them.
struct EntryBuilder {
  GemmEntry e;
  cublasLtMatmulPreference_t pref = nullptr;
  bool keep = false;
  ~EntryBuilder() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (!keep) destroy_entry(e);
  }
};

// Shapes cached per device. Variable token counts (the last chunk of each step) add entries; past
// this many, new shapes get descriptors for the one call only (host-side, so they may be destroyed
// as soon as the matmul is enqueued).
constexpr size_t kMaxCachedShapes = 4096;

struct DeviceState {
  std::mutex mu;  // guards cache
  cublasLtHandle_t handle = nullptr;
  std::unordered_map<GemmKey, GemmEntry, GemmKeyHash> cache;
};

// One handle and one cache per device, created on first use and kept for the process (see
// GemmEntry for why they are never destroyed).
Status device_state(int device, DeviceState** out) {
  static std::mutex mu;
  static auto* states = new std::unordered_map<int, std::unique_ptr<DeviceState>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = states->find(device);
  if (it == states->end()) {
    auto state = std::make_unique<DeviceState>();
    FLCE_CUBLAS_CHECK(cublasLtCreate(&state->handle));
    it = states->emplace(device, std::move(state)).first;
  }
  *out = it->second.get();
  return Status::Ok();
}

Status build_entry(cublasLtHandle_t handle, const GemmKey& key, GemmEntry* out) {
  EntryBuilder b;
  const cublasComputeType_t compute = key.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  FLCE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&b.e.desc, compute, CUDA_R_32F));
  // cuBLASLt's op on its first operand (our B) is our trans_b, on its second (our A) our trans_a.
  const cublasOperation_t op_first = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  FLCE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(b.e.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                                   sizeof(op_first)));
  FLCE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(b.e.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                   &op_second, sizeof(op_second)));
  if (key.device_scalars) {
    const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
    FLCE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(b.e.desc, CUBLASLT_MATMUL_DESC_POINTER_MODE,
                                                     &mode, sizeof(mode)));
  }
  // Column-major shapes as stored. Our B is [k, n] row-major (or [n, k] when trans_b), i.e.
  // column-major [n, k] (or [k, n]); our A is [m, k] (or [k, m]), column-major [k, m] (or [m, k]).
  const uint64_t first_rows = key.trans_b ? key.k : key.n;
  const uint64_t first_cols = key.trans_b ? key.n : key.k;
  const uint64_t second_rows = key.trans_a ? key.m : key.k;
  const uint64_t second_cols = key.trans_a ? key.k : key.m;
  const cudaDataType_t ab = cuda_type(key.ab_type);
  FLCE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b.e.a, ab, first_rows, first_cols, key.ldb));
  FLCE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b.e.b, ab, second_rows, second_cols, key.lda));
  FLCE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b.e.c, cuda_type(key.c_type),
                                               static_cast<uint64_t>(key.n),
                                               static_cast<uint64_t>(key.m), key.ldc));

  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&b.pref));
  const uint64_t ws = key.workspace_bytes;
  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      b.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      b.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_b, sizeof(key.align_b)));
  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      b.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_a, sizeof(key.align_a)));
  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      b.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_c, sizeof(key.align_c)));
  FLCE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      b.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_c, sizeof(key.align_c)));

  const GemmTuning mode = tuning_switch().load();
  const bool on_request = mode == GemmTuning::kRequested;
  const bool tune = mode == GemmTuning::kAll || (on_request && key.measure);
  std::vector<cublasLtMatmulHeuristicResult_t> results(tune ? kTuneCandidates : 1);
  int returned = 0;
  FLCE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, b.e.desc, b.e.a, b.e.b, b.e.c, b.e.c,
                                                   b.pref, static_cast<int>(results.size()),
                                                   results.data(), &returned));
  if (returned == 0) {
    return Status::Error(StatusCode::kBackendError,
                         "cuBLASLt has no algorithm for the GEMM m=" + std::to_string(key.m) +
                             " n=" + std::to_string(key.n) + " k=" + std::to_string(key.k) +
                             " lda=" + std::to_string(key.lda) + " ldb=" + std::to_string(key.ldb) +
                             " ldc=" + std::to_string(key.ldc) + " a/b " + dtype_name(key.ab_type) +
                             " c " + dtype_name(key.c_type) + (key.trans_a ? " trans_a" : "") +
                             (key.trans_b ? " trans_b" : ""));
  }
  b.e.algo = results[0].algo;
  if (tune) {
    auto t = std::make_shared<Tuning>();
    // Reproducible by default: no candidate splits K, or nothing is measured.
    if (!(on_request && splits_k(results[0].algo))) {
      for (int i = 0; i < returned; ++i) {
        if (!(on_request && splits_k(results[i].algo))) {
          t->candidates.push_back(results[i].algo);
        }
      }
    }
    if (t->candidates.size() > 1) {
      t->ms.resize(t->candidates.size());
      t->launched.assign(t->candidates.size(), 0);
      b.e.tuning = std::move(t);
    }
  }
  b.keep = true;
  *out = b.e;
  return Status::Ok();
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Status take_event(Tuning& t, cudaEvent_t* out) {
  if (!t.spare.empty()) {
    *out = t.spare.back();
    t.spare.pop_back();
    return Status::Ok();
  }
  FLCE_CUDA_CHECK(cudaEventCreate(out));
  return Status::Ok();
}

// Reads the trials that have completed, oldest first, and settles the entry's algorithm once
// every candidate has kTuneTrials times.
Status collect_trials(GemmEntry& e) {
  Tuning& t = *e.tuning;
  while (!t.pending.empty()) {
    const Trial tr = t.pending.front();
    const cudaError_t q = cudaEventQuery(tr.stop);
    if (q != cudaSuccess) {
      // Not complete yet, or not answerable now (another thread capturing a graph in global
      // mode): read it on a later call. The runtime may keep the answer as the thread's last
      // error, which must not reach the next launch check.
      if (cudaPeekAtLastError() == q) (void)cudaGetLastError();
      break;
    }
    float ms = 0.0f;
    FLCE_CUDA_CHECK(cudaEventElapsedTime(&ms, tr.start, tr.stop));
    t.ms[tr.candidate].push_back(ms);
    t.spare.push_back(tr.start);
    t.spare.push_back(tr.stop);
    t.pending.pop_front();
  }
  size_t best = 0;
  float best_ms = std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < t.ms.size(); ++i) {
    if (t.ms[i].size() < static_cast<size_t>(kTuneTrials)) return Status::Ok();
    const float m = median(t.ms[i]);
    if (m < best_ms) {
      best_ms = m;
      best = i;
    }
  }
  e.algo = t.candidates[best];
  t.settled = true;
  for (cudaEvent_t ev : t.spare) cudaEventDestroy(ev);
  t.spare.clear();
  return Status::Ok();
}

// One call of a shape whose algorithm is being measured (the cache's lock held): the candidate
// with the fewest trials so far runs between two events, so that the candidates take turns and
// meet alike clock states; a candidate that fails to launch is dropped and the call runs the
// heuristic's choice.
template <class Launch>
Status measured_call(GemmEntry& e, cudaStream_t stream, const Launch& launch) {
  FLCE_CUDA_RETURN_IF_ERROR(collect_trials(e));
  Tuning& t = *e.tuning;
  const auto next = std::min_element(t.launched.begin(), t.launched.end());
  if (t.settled || next == t.launched.end() || *next >= kTuneTrials) {
    FLCE_CUBLAS_CHECK(launch(e.algo));  // settled, or every trial launched and some unread
    return Status::Ok();
  }
  const int c = static_cast<int>(next - t.launched.begin());
  Trial tr;
  tr.candidate = c;
  FLCE_CUDA_RETURN_IF_ERROR(take_event(t, &tr.start));
  FLCE_CUDA_RETURN_IF_ERROR(take_event(t, &tr.stop));
  FLCE_CUDA_CHECK(cudaEventRecord(tr.start, stream));
  if (launch(t.candidates[c]) != CUBLAS_STATUS_SUCCESS) {
    t.launched[c] = kTuneTrials;
    t.ms[c].assign(kTuneTrials, std::numeric_limits<float>::infinity());
    t.spare.push_back(tr.start);
    t.spare.push_back(tr.stop);
    FLCE_CUBLAS_CHECK(launch(e.algo));
    return Status::Ok();
  }
  FLCE_CUDA_CHECK(cudaEventRecord(tr.stop, stream));
  ++t.launched[c];
  t.pending.push_back(tr);
  return Status::Ok();
}

// Whether `stream` is capturing a CUDA graph (or cannot tell: then no trial is timed either).
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

Status check_args(const GemmArgs& g) {
  if (g.m < 0 || g.n < 0 || g.k < 0) {
    return invalid("gemm: m, n, k must be >= 0, got " + std::to_string(g.m) + ", " +
                   std::to_string(g.n) + ", " + std::to_string(g.k));
  }
  if (g.a_type != g.b_type) {
    return invalid(std::string("gemm: A and B must share a dtype, got ") + dtype_name(g.a_type) +
                   " and " + dtype_name(g.b_type));
  }
  if (g.c_type != DType::kFloat32 && g.c_type != g.a_type) {
    return invalid(std::string("gemm: C must be float32 or the input dtype (") +
                   dtype_name(g.a_type) + "), got " + dtype_name(g.c_type));
  }
  const int64_t need_lda = g.trans_a ? g.m : g.k;
  const int64_t need_ldb = g.trans_b ? g.k : g.n;
  if (g.lda < std::max<int64_t>(need_lda, 1) || g.ldb < std::max<int64_t>(need_ldb, 1) ||
      g.ldc < std::max<int64_t>(g.n, 1)) {
    return invalid("gemm: leading dimensions too small: lda " + std::to_string(g.lda) +
                   " (need >= " + std::to_string(need_lda) + "), ldb " + std::to_string(g.ldb) +
                   " (need >= " + std::to_string(need_ldb) + "), ldc " + std::to_string(g.ldc) +
                   " (need >= " + std::to_string(g.n) + ")");
  }
  if (g.c == nullptr || (g.k > 0 && (g.a == nullptr || g.b == nullptr))) {
    return invalid("gemm: a, b and c must not be null");
  }
  if ((g.device_alpha == nullptr) != (g.device_beta == nullptr)) {
    return invalid("gemm: device_alpha and device_beta must be given together");
  }
  if (g.device_alpha != nullptr && g.k == 0) {
    return invalid("gemm: device_alpha / device_beta need k > 0 (beta is not read on the host)");
  }
  return Status::Ok();
}

}  // namespace

Status cublaslt_gemm(const GemmArgs& g, cudaStream_t stream, void* workspace,
                     size_t workspace_bytes, bool allow_tf32) {
  if (g.m == 0 || g.n == 0) return Status::Ok();
  FLCE_CUDA_RETURN_IF_ERROR(check_args(g));
  if (g.k == 0) {  // op(A) op(B) is all zeros: C = beta C
    if (g.beta == 1.0f) return Status::Ok();
    if (g.beta != 0.0f) return invalid("gemm: k = 0 is only supported with beta 0 or 1");
    const size_t es = dtype_size(g.c_type);
    FLCE_CUDA_CHECK(cudaMemset2DAsync(g.c, static_cast<size_t>(g.ldc) * es, 0,
                                      static_cast<size_t>(g.n) * es, static_cast<size_t>(g.m),
                                      stream));
    return Status::Ok();
  }
  if (workspace == nullptr) workspace_bytes = 0;

  GemmKey key;
  FLCE_CUDA_CHECK(cudaGetDevice(&key.device));
  key.m = g.m;
  key.n = g.n;
  key.k = g.k;
  key.lda = g.lda;
  key.ldb = g.ldb;
  key.ldc = g.ldc;
  key.ab_type = g.a_type;
  key.c_type = g.c_type;
  key.trans_a = g.trans_a;
  key.trans_b = g.trans_b;
  key.device_scalars = g.device_alpha != nullptr;
  key.beta_zero = !key.device_scalars && g.beta == 0.0f;
  key.measure = g.measure_algorithm;
  key.tf32 = allow_tf32 && g.a_type == DType::kFloat32;
  key.align_a = alignment_of(g.a);
  key.align_b = alignment_of(g.b);
  key.align_c = alignment_of(g.c);
  key.workspace_bytes = workspace_bytes;

  DeviceState* state = nullptr;
  FLCE_CUDA_RETURN_IF_ERROR(device_state(key.device, &state));
  // Host scalars, or (CUBLASLT_POINTER_MODE_DEVICE in the descriptor) the device's.
  const float* alpha = key.device_scalars ? g.device_alpha : &g.alpha;
  const float* beta = key.device_scalars ? g.device_beta : &g.beta;
  GemmEntry entry;
  auto launch = [&](const GemmEntry& e, const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(state->handle, e.desc, alpha, g.b, e.a, g.a, e.b, beta, g.c, e.c, g.c,
                          e.c, &algo, workspace, workspace_bytes, stream);
  };
  bool cached = true;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    auto it = state->cache.find(key);
    if (it == state->cache.end()) {
      FLCE_CUDA_RETURN_IF_ERROR(build_entry(state->handle, key, &entry));
      if (state->cache.size() < kMaxCachedShapes) {
        it = state->cache.emplace(key, entry).first;
      } else {
        cached = false;
      }
    }
    if (cached) {
      GemmEntry& e = it->second;
      if (e.tuning && !e.tuning->settled && !capturing(stream)) {
        return measured_call(e, stream,
                             [&](const cublasLtMatmulAlgo_t& algo) { return launch(e, algo); });
      }
      entry = e;
    }
  }
  const cublasStatus_t st = launch(entry, entry.algo);
  if (!cached) destroy_entry(entry);
  FLCE_CUBLAS_CHECK(st);
  return Status::Ok();
}

void set_cublaslt_tuning(GemmTuning mode) { tuning_switch().store(mode); }

GemmTuning cublaslt_tuning() { return tuning_switch().load(); }

Status cublaslt_tuning_counts(int device, CublasLtTuningCounts* out) {
  DeviceState* state = nullptr;
  FLCE_CUDA_RETURN_IF_ERROR(device_state(device, &state));
  std::lock_guard<std::mutex> lock(state->mu);
  *out = CublasLtTuningCounts();
  for (const auto& kv : state->cache) {
    if (!kv.second.tuning) continue;
    ++(kv.second.tuning->settled ? out->settled : out->measuring);
  }
  return Status::Ok();
}

}  // namespace flce::detail::cuda
