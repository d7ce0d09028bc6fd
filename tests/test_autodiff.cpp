// grad(): fan-in sums, unbroadcast, stop_gradient, zero gradients, errors, second order.
#include <gtest/gtest.h>

#include "dagrad.hpp"

namespace dagrad {
namespace {

double run_scalar(Graph& g, const Value& v, const Feeds& feeds = {}) {
  return compile(g, {v}, {.backend = Backend::reference}).run(feeds)[0].item();
}

TEST(Grad, FanInGradientsAreSummed) {
  // f = x*x + x  =>  df/dx = 2x + 1
  Graph g;
  Value x = g.input("x", {}, DType::f64);
  Value f = x * x + x;
  Value dx = grad(f, {x})[0];
  EXPECT_DOUBLE_EQ(run_scalar(g, dx, {{x, Tensor::scalar(3.0, DType::f64)}}), 7.0);
}

TEST(Grad, BroadcastGradientsAreSummedBackToTheInputShape) {
  Graph g;
  Value x = g.input("x", {3, 4}, DType::f64);
  Value b = g.input("b", {4}, DType::f64);
  Value loss = sum(x + b);
  Value db = grad(loss, {b})[0];
  EXPECT_EQ(db.shape(), Shape({4}));
  auto out = compile(g, {db}).run({{x, Tensor({3, 4}, DType::f64)}, {b, Tensor({4}, DType::f64)}});
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(out[0].at(i), 3.0);
}

TEST(Grad, StopGradientBlocksTheFlow) {
  Graph g;
  Value x = g.input("x", {}, DType::f64);
  Value f = x * stop_gradient(x);  // d/dx treats the second factor as a constant: = x
  Value dx = grad(f, {x})[0];
  EXPECT_DOUBLE_EQ(run_scalar(g, dx, {{x, Tensor::scalar(3.0, DType::f64)}}), 3.0);
}

TEST(Grad, ValueThatDoesNotAffectTheLossHasZeroGradient) {
  Graph g;
  Value x = g.input("x", {2}, DType::f64);
  Value unrelated = g.parameter("u", Tensor::full({2, 2}, 1.0, DType::f64));
  Value loss = sum(exp(x));
  Value du = grad(loss, {unrelated})[0];
  EXPECT_EQ(du.shape(), Shape({2, 2}));
  auto out = compile(g, {du}).run({{x, Tensor({2}, DType::f64)}});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[0].at(i), 0.0);
}

TEST(Grad, NonScalarLossWithoutSeedIsRefused) {
  Graph g;
  Value x = g.input("x", {2, 2});
  try {
    grad(exp(x), {x});
    FAIL();
  } catch (const GraphError& e) {
    EXPECT_NE(std::string(e.what()).find("not a scalar"), std::string::npos) << e.what();
  }
  // With a seed of the loss's shape it is a vector-Jacobian product.
  Value seed = g.constant(Tensor::full({2, 2}, 2.0));
  Value dx = grad(exp(x), {x}, seed)[0];
  auto out = compile(g, {dx}).run({{x, Tensor::full({2, 2}, 0.0)}});
  EXPECT_NEAR(out[0].at(0), 2.0, 1e-6);
}

TEST(Grad, GradcheckReportsTheWorstElement) {
  Graph g;
  Value x = g.input("x", {2, 3}, DType::f64);
  Value y = sum(tanh(x) * exp(x));
  Tensor xs({2, 3}, DType::f64);
  for (int i = 0; i < 6; ++i) xs.set(i, 0.3 * i - 0.8);
  GradcheckResult r = gradcheck(g, y, {{x, xs}});
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.elements_checked, 6u);
  EXPECT_EQ(r.worst_input, "x");
  EXPECT_LT(r.worst_error, 1e-7);
}

TEST(Grad, GradcheckRefusesF32Inputs) {
  Graph g;
  Value x = g.input("x", {2});
  EXPECT_THROW(gradcheck(g, sum(x), {{x, Tensor({2}, DType::f32)}}), Error);
}

TEST(Grad, GradientsOfGradients) {
  // f = x³ → f' = 3x², f'' = 6x
  Graph g;
  Value x = g.input("x", {}, DType::f64);
  Value f = x * x * x;
  Value d1 = grad(f, {x})[0];
  Value d2 = grad(d1, {x})[0];
  EXPECT_DOUBLE_EQ(run_scalar(g, d2, {{x, Tensor::scalar(2.0, DType::f64)}}), 12.0);
}

}  // namespace
}  // namespace dagrad
