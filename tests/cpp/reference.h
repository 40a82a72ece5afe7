// A naive float64 reference of the semantics in include/flce/flce.h, written from the formulas
// there (not from csrc/core/row_math.h) so the library is checked against an independent reading.
#pragma once

#include <cstdint>
#include <vector>

#include "flce/flce.h"

namespace flce::test {

struct RefProblem {
  int64_t n = 0, v = 0, d = 0;
  std::vector<double> x;             // [n, d]
  std::vector<double> weight;        // [v, d]
  std::vector<double> bias;          // [v] or empty
  std::vector<double> class_weight;  // [v] or empty
  std::vector<int64_t> labels;       // [n]
  LossOptions options;
};

struct RefForward {
  std::vector<double> row_loss;  // [n], 0 at ignored rows
  std::vector<double> lse;       // [n]
  double loss = 0.0;             // the reduced loss (mean / sum); sum of rows for none
  double denominator = 0.0;      // sum over valid rows of w[y]
  double metrics[kNumMetrics] = {};
};

// Upstream gradients: grad_loss is [1] for mean / sum and [n] for none; grad_lse is [n] or empty.
struct RefUpstream {
  std::vector<double> grad_loss;
  std::vector<double> grad_lse;
};

struct RefGrads {
  std::vector<double> dx;  // [n, d]
  std::vector<double> dw;  // [v, d]
  std::vector<double> db;  // [v] (also filled without a bias: the gradient a bias would get)
};

RefForward reference_forward(const RefProblem& p);
RefGrads reference_backward(const RefProblem& p, const RefUpstream& up);
// The scalar whose gradient reference_backward returns: sum_j grad_loss_j * loss_j (loss_j the
// reduced loss, or the rows for none) + sum_i grad_lse_i * lse_i. For finite differences.
double reference_objective(const RefProblem& p, const RefUpstream& up);

}  // namespace flce::test
