// Finite differences in float64 on tiny shapes: they check the reference's analytic gradient
// (so the reference is not merely self-consistent) and the library's fp32 gradients.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "harness.h"

namespace flce::test {
namespace {

// Central differences of the reference objective over every element of `values`.
std::vector<double> numeric_gradient(RefProblem p, const RefUpstream& up,
                                     std::vector<double> RefProblem::*field) {
  std::vector<double> g((p.*field).size());
  for (size_t i = 0; i < g.size(); ++i) {
    const double v = (p.*field)[i];
    const double h = 1e-5 * std::max(1.0, std::abs(v));
    (p.*field)[i] = v + h;
    const double plus = reference_objective(p, up);
    (p.*field)[i] = v - h;
    const double minus = reference_objective(p, up);
    (p.*field)[i] = v;
    g[i] = (plus - minus) / (2 * h);
  }
  return g;
}

struct GradCheckCase {
  std::string name;
  Case c;
  Strategy strategy;
};

void PrintTo(const GradCheckCase& p, std::ostream* os) { *os << p.name; }

std::vector<GradCheckCase> gradcheck_cases() {
  std::vector<GradCheckCase> out;
  uint64_t seed = 900;
  for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
    for (bool options : {false, true}) {
      Case c;
      c.n = 6;
      c.v = 9;
      c.d = 5;
      c.seed = ++seed;
      c.options.reduction = r;
      c.bias = true;
      c.grad_bias = true;
      if (options) {
        c.options.label_smoothing = 0.2f;
        c.options.z_loss = 0.05f;
        c.options.softcap = 2.5f;
        c.options.logit_scale = -1.1f;
        c.class_weights = true;
        c.grad_lse = true;
      }
      const std::string name = std::string(r == Reduction::kMean  ? "mean"
                                           : r == Reduction::kSum ? "sum"
                                                                  : "none") +
                               (options ? "_all_options" : "_plain");
      out.push_back({name + "_recompute", c, Strategy::kRecompute});
      if (r != Reduction::kNone && !c.grad_lse) {
        out.push_back({name + "_gif", c, Strategy::kGradInForward});
      }
    }
  }
  return out;
}

class GradCheck : public ::testing::TestWithParam<GradCheckCase> {};

TEST_P(GradCheck, FiniteDifferences) {
  const GradCheckCase& p = GetParam();
  SCOPED_TRACE(p.c.describe());
  const Inputs in = make_inputs(p.c);
  RefUpstream up = in.up;
  if (p.strategy == Strategy::kGradInForward) {
    up.grad_loss = {1.0};
    up.grad_lse.clear();
  }
  const RefGrads analytic = reference_backward(in.ref, up);
  const std::vector<double> num_dx = numeric_gradient(in.ref, up, &RefProblem::x);
  const std::vector<double> num_dw = numeric_gradient(in.ref, up, &RefProblem::weight);
  const std::vector<double> num_db = numeric_gradient(in.ref, up, &RefProblem::bias);
  expect_close("reference dx vs finite differences", analytic.dx, num_dx, 1e-7);
  expect_close("reference dW vs finite differences", analytic.dw, num_dw, 1e-7);
  expect_close("reference db vs finite differences", analytic.db, num_db, 1e-7);

  PlanChoice choice;
  choice.strategy = p.strategy;
  Outputs out;
  ASSERT_TRUE(run_fused(p.c, in, choice, &out));
  expect_close("flce dx vs finite differences", out.dx.to_double(), num_dx, 1e-5);
  expect_close("flce dW vs finite differences", out.dw.to_double(), num_dw, 1e-5);
  expect_close("flce db vs finite differences", out.db.to_double(), num_db, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Cpu, GradCheck, ::testing::ValuesIn(gradcheck_cases()),
                         [](const ::testing::TestParamInfo<GradCheckCase>& i) {
                           return i.param.name;
                         });

}  // namespace
}  // namespace flce::test
