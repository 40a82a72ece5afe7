#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace flce::test {
namespace {

struct RowLogits {
  std::vector<double> r;  // raw logits x.w + b
  std::vector<double> z;  // transformed
  std::vector<double> p;  // softmax(z)
  double lse = 0.0;
};

RowLogits row_logits(const RefProblem& p, int64_t i) {
  RowLogits out;
  out.r.resize(p.v);
  out.z.resize(p.v);
  out.p.resize(p.v);
  const double scale = p.options.logit_scale, cap = p.options.softcap;
  for (int64_t c = 0; c < p.v; ++c) {
    double r = p.bias.empty() ? 0.0 : p.bias[c];
    for (int64_t k = 0; k < p.d; ++k) r += p.x[i * p.d + k] * p.weight[c * p.d + k];
    out.r[c] = r;
    out.z[c] = cap > 0.0 ? cap * std::tanh(scale * r / cap) : scale * r;
  }
  const double m = *std::max_element(out.z.begin(), out.z.end());
  double s = 0.0;
  for (double z : out.z) s += std::exp(z - m);
  out.lse = m + std::log(s);
  for (int64_t c = 0; c < p.v; ++c) out.p[c] = std::exp(out.z[c] - out.lse);
  return out;
}

double class_w(const RefProblem& p, int64_t c) {
  return p.class_weight.empty() ? 1.0 : p.class_weight[c];
}

bool is_valid(const RefProblem& p, int64_t i) { return p.labels[i] != p.options.ignore_index; }

double denominator(const RefProblem& p) {
  double den = 0.0;
  for (int64_t i = 0; i < p.n; ++i) {
    if (is_valid(p, i)) den += class_w(p, p.labels[i]);
  }
  return den;
}

}  // namespace

RefForward reference_forward(const RefProblem& p) {
  RefForward f;
  f.row_loss.assign(p.n, 0.0);
  f.lse.assign(p.n, 0.0);
  const double eps = p.options.label_smoothing, zl = p.options.z_loss;
  double max_logit = -std::numeric_limits<double>::infinity();
  double norm = 0.0, entropy = 0.0, lse2 = 0.0, correct = 0.0;
  int64_t valid = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    const RowLogits row = row_logits(p, i);
    f.lse[i] = row.lse;
    if (!is_valid(p, i)) continue;
    ++valid;
    const int64_t y = p.labels[i];
    double smooth = 0.0;
    for (int64_t c = 0; c < p.v; ++c) smooth += class_w(p, c) * (row.lse - row.z[c]);
    f.row_loss[i] = (1.0 - eps) * class_w(p, y) * (row.lse - row.z[y]) + eps / p.v * smooth +
                    zl * row.lse * row.lse;
    double sq = 0.0, h = 0.0;
    int64_t best = 0;
    for (int64_t c = 0; c < p.v; ++c) {
      sq += row.z[c] * row.z[c];
      if (row.p[c] > 0.0) h -= row.p[c] * std::log(row.p[c]);
      if (row.z[c] > row.z[best]) best = c;
    }
    max_logit = std::max(max_logit, row.z[best]);
    norm += std::sqrt(sq);
    entropy += h;
    lse2 += row.lse * row.lse;
    correct += best == y ? 1.0 : 0.0;
  }
  f.denominator = denominator(p);
  double total = 0.0;
  for (double l : f.row_loss) total += l;
  if (p.options.reduction == Reduction::kMean) {
    f.loss = f.denominator > 0.0 ? total / f.denominator : 0.0;
  } else {
    f.loss = total;
  }
  if (valid > 0) {
    f.metrics[kMetricMaxLogit] = max_logit;
    f.metrics[kMetricLogitNorm] = norm / valid;
    f.metrics[kMetricEntropy] = entropy / valid;
    f.metrics[kMetricLseSquared] = lse2 / valid;
    f.metrics[kMetricAccuracy] = correct / valid;
  }
  f.metrics[kMetricValidTokens] = static_cast<double>(valid);
  return f;
}

RefGrads reference_backward(const RefProblem& p, const RefUpstream& up) {
  RefGrads g;
  g.dx.assign(p.n * p.d, 0.0);
  g.dw.assign(p.v * p.d, 0.0);
  g.db.assign(p.v, 0.0);
  const double eps = p.options.label_smoothing, zl = p.options.z_loss;
  const double scale = p.options.logit_scale, cap = p.options.softcap;
  const double den = denominator(p);
  double wsum = 0.0;
  for (int64_t c = 0; c < p.v; ++c) wsum += class_w(p, c);
  std::vector<double> dr(p.v);
  for (int64_t i = 0; i < p.n; ++i) {
    const RowLogits row = row_logits(p, i);
    const bool valid = is_valid(p, i);
    // d objective / d loss_i
    double gi = 0.0;
    if (valid) {
      switch (p.options.reduction) {
        case Reduction::kMean:
          gi = den > 0.0 ? up.grad_loss[0] / den : 0.0;
          break;
        case Reduction::kSum:
          gi = up.grad_loss[0];
          break;
        case Reduction::kNone:
          gi = up.grad_loss[i];
          break;
      }
    }
    const double glse = up.grad_lse.empty() ? 0.0 : up.grad_lse[i];
    const int64_t y = valid ? p.labels[i] : -1;
    for (int64_t c = 0; c < p.v; ++c) {
      // d loss_i / d z_c from the three terms of the loss, each with dlse/dz_c = p_c.
      double dl = 0.0;
      if (valid) {
        dl += (1.0 - eps) * class_w(p, y) * (row.p[c] - (c == y ? 1.0 : 0.0));
        dl += eps / p.v * (wsum * row.p[c] - class_w(p, c));
        dl += 2.0 * zl * row.lse * row.p[c];
      }
      const double dz = gi * dl + glse * row.p[c];
      double dzdr = scale;
      if (cap > 0.0) {
        const double t = std::tanh(scale * row.r[c] / cap);
        dzdr = scale * (1.0 - t * t);
      }
      dr[c] = dz * dzdr;
    }
    for (int64_t c = 0; c < p.v; ++c) {
      g.db[c] += dr[c];
      for (int64_t k = 0; k < p.d; ++k) {
        g.dx[i * p.d + k] += dr[c] * p.weight[c * p.d + k];
        g.dw[c * p.d + k] += dr[c] * p.x[i * p.d + k];
      }
    }
  }
  return g;
}

double reference_objective(const RefProblem& p, const RefUpstream& up) {
  const RefForward f = reference_forward(p);
  double j = 0.0;
  if (p.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < p.n; ++i) j += up.grad_loss[i] * f.row_loss[i];
  } else {
    j += up.grad_loss[0] * f.loss;
  }
  if (!up.grad_lse.empty()) {
    for (int64_t i = 0; i < p.n; ++i) j += up.grad_lse[i] * f.lse[i];
  }
  return j;
}

}  // namespace flce::test
