// Second order: Hessian-vector products of a small MLP loss against central differences of
// the gradient, and hvp()'s argument checks.
#include <gtest/gtest.h>

#include <random>

#include "dagrad.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

Tensor random_tensor(Shape shape, std::uint64_t seed, double scale = 0.5) {
  return testing::uniform_tensor(std::move(shape), seed, -scale, scale, DType::f64);
}

TEST(SecondOrder, HessianVectorProductOfAnMlpLossMatchesFiniteDifferencesOfTheGradient) {
  // loss(W1, b1, W2) = mean cross-entropy of softmax(tanh(x·W1 + b1)·W2) on fixed data.
  Graph g;
  Value x = g.constant(random_tensor({6, 3}, 1, 1.0), "x");
  Value labels =
      g.constant(Tensor::from_ints(std::vector<std::int32_t>{0, 1, 2, 1, 0, 2}, {6}), "labels");
  Value W1 = g.input("W1", {3, 4}, DType::f64);
  Value b1 = g.input("b1", {4}, DType::f64);
  Value W2 = g.input("W2", {4, 3}, DType::f64);
  Value v1 = g.input("v1", {3, 4}, DType::f64);
  Value vb = g.input("vb", {4}, DType::f64);
  Value v2 = g.input("v2", {4, 3}, DType::f64);
  Value loss = sparse_cross_entropy(matmul(tanh(matmul(x, W1) + b1), W2), labels);
  std::vector<Value> params{W1, b1, W2};
  std::vector<Value> grads = grad(loss, params);
  std::vector<Value> hv = hvp(loss, params, {v1, vb, v2});

  Feeds at{{W1, random_tensor({3, 4}, 2)},   {b1, random_tensor({4}, 3)},
           {W2, random_tensor({4, 3}, 4)},   {v1, random_tensor({3, 4}, 5, 1.0)},
           {vb, random_tensor({4}, 6, 1.0)}, {v2, random_tensor({4, 3}, 7, 1.0)}};
  CompileOptions reference{.backend = Backend::reference};
  Plan hv_plan = compile(g, hv, reference);
  std::vector<Tensor> analytic;
  for (const auto& t : hv_plan.run(at)) analytic.push_back(t.clone());

  // H·v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε
  const double eps = 1e-5;
  Plan grad_plan = compile(g, grads, reference);
  auto shifted = [&](double sign) {
    Feeds f;
    for (std::size_t k = 0; k < 3; ++k) {
      Tensor p = at[k].second.clone();
      const Tensor& v = at[k + 3].second;
      for (std::int64_t i = 0; i < p.numel(); ++i) p.set(i, p.at(i) + sign * eps * v.at(i));
      f.emplace_back(at[k].first, p);
    }
    for (std::size_t k = 3; k < 6; ++k) f.push_back(at[k]);
    std::vector<Tensor> out;
    for (const auto& t : grad_plan.run(f)) out.push_back(t.clone());
    return out;
  };
  auto plus = shifted(1.0);
  auto minus = shifted(-1.0);
  double largest = 0;
  for (std::size_t k = 0; k < 3; ++k) {
    for (std::int64_t i = 0; i < analytic[k].numel(); ++i) {
      const double numeric = (plus[k].at(i) - minus[k].at(i)) / (2 * eps);
      EXPECT_NEAR(analytic[k].at(i), numeric, 1e-6 * (1 + std::abs(numeric)))
          << "parameter " << k << " element " << i;
      largest = std::max(largest, std::abs(numeric));
    }
  }
  EXPECT_GT(largest, 1e-3);  // the product is not trivially zero
}

TEST(SecondOrder, HvpChecksItsArguments) {
  Graph g;
  Value w = g.input("w", {3}, DType::f64);
  Value loss = sum(w * w * w);
  EXPECT_THROW(hvp(loss, {w}, {}), GraphError);
  Value wrong = g.input("v", {4}, DType::f64);
  EXPECT_THROW(hvp(loss, {w}, {wrong}), GraphError);
}

TEST(SecondOrder, ExactHessianOfACubic) {
  // L = Σ w³ → H = diag(6w); H·v = 6 w ⊙ v.
  Graph g;
  Value w = g.input("w", {3}, DType::f64);
  Value v = g.input("v", {3}, DType::f64);
  Value hv = hvp(sum(w * w * w), {w}, {v})[0];
  auto out = compile(g, {hv}).run({{w, Tensor::from({1, 2, 3}, {3}, DType::f64)},
                                   {v, Tensor::from({1, -1, 2}, {3}, DType::f64)}});
  EXPECT_DOUBLE_EQ(out[0].at(0), 6.0);
  EXPECT_DOUBLE_EQ(out[0].at(1), -12.0);
  EXPECT_DOUBLE_EQ(out[0].at(2), 36.0);
}

}  // namespace
}  // namespace dagrad
