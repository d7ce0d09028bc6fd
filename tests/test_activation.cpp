// Known answers for the activation, power, selection and comparison ops. Gradients against
// central differences, oneDNN against the reference and the error inputs are checked for every
// op by the registry-wide tests; here each op meets values worked out by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <numbers>

#include "dagrad.hpp"

namespace dagrad {
namespace {

using UnaryFn = std::function<Value(const Value&)>;
using BinaryFn = std::function<Value(const Value&, const Value&)>;

constexpr Backend both_backends[] = {Backend::reference, Backend::onednn};

std::vector<double> evaluate(Graph& graph, const Value& output, const Feeds& feeds,
                             Backend backend) {
  Plan plan = compile(graph, {output}, {.backend = backend});
  return plan.run(feeds)[0].to_doubles();
}

// f applied to `values` (shape {n}) in `dtype` on `backend`.
std::vector<double> apply_unary(const UnaryFn& f, std::vector<double> values, DType dtype,
                                Backend backend) {
  Graph g;
  const auto n = static_cast<std::int64_t>(values.size());
  Value x = g.input("x", {n}, dtype);
  return evaluate(g, f(x), {{x, Tensor::from(values, {n}, dtype)}}, backend);
}

// d(sum(f(x)))/dx at `values`, in f64 on the reference kernels.
std::vector<double> unary_gradient(const UnaryFn& f, std::vector<double> values) {
  Graph g;
  const auto n = static_cast<std::int64_t>(values.size());
  Value x = g.input("x", {n}, DType::f64);
  Value dx = grad(sum(f(x)), {x})[0];
  return evaluate(g, dx, {{x, Tensor::from(values, {n}, DType::f64)}}, Backend::reference);
}

void expect_values(const std::vector<double>& actual, const std::vector<double>& expected,
                   double tolerance, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], tolerance * (1.0 + std::abs(expected[i])))
        << what << " element " << i;
  }
}

std::string backend_name(Backend backend) {
  return backend == Backend::onednn ? "onednn" : "reference";
}

// f on `values` in f32 on both backends and in f64 on the reference.
void expect_unary(const UnaryFn& f, std::vector<double> values, std::vector<double> expected,
                  const std::string& what) {
  for (Backend backend : both_backends) {
    expect_values(apply_unary(f, values, DType::f32, backend), expected, 1e-6,
                  what + " f32 " + backend_name(backend));
  }
  expect_values(apply_unary(f, values, DType::f64, Backend::reference), expected, 1e-12,
                what + " f64");
}

TEST(Step, FollowsTheThresholdTruthTable) {
  expect_unary([](const Value& x) { return step(x); }, {-2.0, -1e-30, 0.0, 1e-30, 2.0},
               {0, 0, 0, 1, 1}, "step");
}

TEST(Step, RefusesGradientNamingStep) {
  Graph g;
  Value x = g.input("x", {3});
  Value loss = sum(step(x));
  try {
    grad(loss, {x});
    FAIL() << "grad() through step did not refuse";
  } catch (const GraphError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("step"), std::string::npos) << message;
    EXPECT_NE(message.find("piecewise constant"), std::string::npos) << message;
  }
}

// relu's backward on dagrad's own f32 loop: dy where x > 0, else 0 (x = 0 and x = -0 give 0,
// x NaN gives 0, dy NaN passes where x > 0), equal to the reference, on one thread below 32k
// elements and split across two above (odd sizes leave an uneven last part), also when the
// plan writes dx over dy.
TEST(ReluGrad, MasksTheGradientOnEitherPathAsTheReference) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int saved = num_threads();
  for (std::int64_t n : {std::int64_t{9}, std::int64_t{32 * 1024 + 3}, std::int64_t{100003}}) {
    Graph g;
    Value dy_in = g.input("dy", {n});
    Value x = g.input("x", {n});
    Value dy = dy_in * 2.0;  // an op output dying at relu_grad: the plan may reuse its buffer
    Value dx = relu_grad(dy, x);
    Tensor dy_values({n}, DType::f32), x_values({n}, DType::f32);
    for (std::int64_t i = 0; i < n; ++i) {
      const double sign = (i * 7919) % 3 == 0 ? -1.0 : 1.0;
      x_values.set(i, sign * static_cast<double>(i % 13) / 13.0);  // 0 every 13th element
      dy_values.set(i, 0.5 + static_cast<double>(i % 7));
    }
    x_values.span<float>()[1] = -0.0f;
    x_values.span<float>()[2] = nan;
    x_values.span<float>()[3] = 2.0f;
    dy_values.span<float>()[3] = nan;
    const Feeds feeds{{dy_in, dy_values}, {x, x_values}};
    const std::vector<double> expected =
        compile(g, {dx}, {.backend = Backend::reference}).run(feeds)[0].to_doubles();
    EXPECT_EQ(expected[1], 0.0);
    EXPECT_EQ(expected[2], 0.0);
    EXPECT_TRUE(std::isnan(expected[3]));
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      const std::vector<double> got = compile(g, {dx}).run(feeds)[0].to_doubles();
      for (std::int64_t i = 0; i < n; ++i) {
        if (std::isnan(expected[i])) {
          ASSERT_TRUE(std::isnan(got[i])) << "n " << n << ", element " << i;
        } else {
          ASSERT_EQ(got[i], expected[i]) << "n " << n << ", element " << i;
        }
      }
    }
  }
  set_num_threads(saved);
}

TEST(Identity, PassesValuesAndGradientsThrough) {
  expect_unary([](const Value& x) { return identity(x); }, {-1.5, 0.0, 2.25}, {-1.5, 0.0, 2.25},
               "identity");
  expect_values(unary_gradient([](const Value& x) { return identity(x); }, {-1.5, 0.0, 2.25}),
                {1, 1, 1}, 1e-12, "identity gradient");
}

TEST(LeakyRelu, ScalesNegativeInputsByAlpha) {
  auto f = [](const Value& x) { return leaky_relu(x, 0.1); };
  expect_unary(f, {-2.0, 0.0, 3.0}, {-0.2, 0.0, 3.0}, "leaky_relu");
  // Slope alpha on the left and at the kink, 1 on the right.
  expect_values(unary_gradient(f, {-2.0, 0.0, 3.0}), {0.1, 0.1, 1.0}, 1e-12, "leaky_relu gradient");
}

TEST(Elu, SaturatesAtMinusAlpha) {
  auto f = [](const Value& x) { return elu(x, 1.0); };
  expect_unary(f, {-1.0, 0.0, 2.0, -30.0}, {std::exp(-1.0) - 1.0, 0.0, 2.0, std::expm1(-30.0)},
               "elu");
  expect_values(unary_gradient(f, {-1.0, 2.0}), {std::exp(-1.0), 1.0}, 1e-12, "elu gradient");
  auto half = [](const Value& x) { return elu(x, 0.5); };
  expect_unary(half, {-2.0}, {0.5 * std::expm1(-2.0)}, "elu alpha 0.5");
}

TEST(Softplus, IsStableInBothTails) {
  auto f = [](const Value& x) { return softplus(x); };
  expect_unary(f, {0.0, 1.0, -1.0, 100.0},
               {std::log(2.0), std::log1p(std::exp(1.0)), std::log1p(std::exp(-1.0)), 100.0},
               "softplus");
  // ln(1 + e^-100) = e^-100 (to 1e-44 relative): tiny but not NaN, not negative.
  const auto far_left = apply_unary(f, {-100.0}, DType::f64, Backend::reference);
  EXPECT_NEAR(far_left[0] / std::exp(-100.0), 1.0, 1e-12);
  for (Backend backend : both_backends) {
    const auto tails = apply_unary(f, {-100.0, 100.0}, DType::f32, backend);
    EXPECT_TRUE(std::isfinite(tails[0]) && tails[0] >= 0.0 && tails[0] < 1e-30)
        << backend_name(backend) << ": softplus(-100) = " << tails[0];
    EXPECT_EQ(tails[1], 100.0) << backend_name(backend);
  }
  // dy/dx = sigmoid(x).
  expect_values(unary_gradient(f, {0.0, 2.0, -100.0}),
                {0.5, 1.0 / (1.0 + std::exp(-2.0)), std::exp(-100.0)}, 1e-12, "softplus gradient");
}

TEST(Gelu, MatchesTheErfForm) {
  auto f = [](const Value& x) { return gelu(x); };
  expect_unary(f, {1.0, -1.0, 0.0, 2.0},
               {0.8413447460685429, -0.15865525393145707, 0.0, 1.9544997361036416}, "gelu");
  // dy/dx = Φ(x) + x φ(x): at 0 it is 1/2, at 1 it is 0.8413447 + 0.2419707.
  expect_values(unary_gradient(f, {0.0, 1.0}), {0.5, 0.8413447460685429 + 0.24197072451914337},
                1e-12, "gelu gradient");
}

TEST(NormalCdf, KnownQuantiles) {
  auto f = [](const Value& x) { return normal_cdf(x); };
  for (Backend backend : both_backends) {
    expect_values(apply_unary(f, {0.0, 1.959963984540054, -1.0}, DType::f32, backend),
                  {0.5, 0.975, 0.15865525393145707}, 1e-6, "normal_cdf " + backend_name(backend));
  }
  expect_values(unary_gradient(f, {0.0}), {1.0 / std::sqrt(2.0 * std::numbers::pi)}, 1e-12,
                "normal_cdf gradient");
}

TEST(Pow, RaisesToScalarExponents) {
  expect_unary([](const Value& x) { return pow(x, 3.0); }, {2.0, -1.5}, {8.0, -3.375}, "cube");
  expect_unary([](const Value& x) { return pow(x, 0.5); }, {4.0, 2.25}, {2.0, 1.5}, "root");
  expect_unary([](const Value& x) { return pow(x, -1.0); }, {2.0, -4.0}, {0.5, -0.25},
               "reciprocal");
  expect_unary([](const Value& x) { return pow(x, 0.0); }, {3.0, 0.0}, {1.0, 1.0}, "power 0");
  expect_values(unary_gradient([](const Value& x) { return pow(x, 3.0); }, {2.0}), {12.0}, 1e-12,
                "d x^3 / dx at 2");
  expect_values(unary_gradient([](const Value& x) { return pow(x, 0.0); }, {0.0, 2.0}), {0.0, 0.0},
                1e-12, "d x^0 / dx");
}

TEST(Sqrt, KnownRootsAndSlope) {
  auto f = [](const Value& x) { return sqrt(x); };
  expect_unary(f, {9.0, 0.25, 0.0}, {3.0, 0.5, 0.0}, "sqrt");
  expect_values(unary_gradient(f, {4.0}), {0.25}, 1e-12, "sqrt gradient");
}

TEST(Maxout, TakesTheMaximumOfConsecutiveGroups) {
  Graph g;
  Value x = g.input("x", {2, 6});
  Tensor values = Tensor::from({1, 5, 3, 2, 8, 0,  //
                                -1, -2, -3, -6, -5, -4},
                               {2, 6});
  for (Backend backend : both_backends) {
    expect_values(evaluate(g, maxout(x, 3), {{x, values}}, backend), {5, 8, -1, -4}, 0,
                  "pieces 3 " + backend_name(backend));
    expect_values(evaluate(g, maxout(x, 2), {{x, values}}, backend), {5, 3, 8, -1, -3, -4}, 0,
                  "pieces 2 " + backend_name(backend));
    // Along axis 0: groups of 2 rows.
    expect_values(evaluate(g, maxout(x, 2, 0), {{x, values}}, backend), {1, 5, 3, 2, 8, 0}, 0,
                  "axis 0 " + backend_name(backend));
  }
  EXPECT_EQ(maxout(x, 3).shape(), Shape({2, 2}));
  EXPECT_EQ(maxout(x, 2, 0).shape(), Shape({1, 6}));
}

TEST(Maxout, RoutesTheGradientToTheArgMax) {
  Graph g;
  Value x = g.input("x", {1, 6}, DType::f64);
  Value y = maxout(x, 3);
  Value weights = g.constant(Tensor::from({10, 20}, {1, 2}, DType::f64));
  Value dx = grad(sum(mul(y, weights)), {x})[0];
  expect_values(evaluate(g, dx, {{x, Tensor::from({1, 5, 3, 2, 8, 0}, {1, 6}, DType::f64)}},
                         Backend::reference),
                {0, 10, 0, 0, 20, 0}, 0, "maxout gradient");
}

TEST(Maxout, RefusesFeaturesNotDivisibleByPieces) {
  Graph g;
  Value x = g.input("x", {4, 5});
  try {
    maxout(x, 2);
    FAIL() << "maxout accepted 5 features in pieces of 2";
  } catch (const ShapeError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("maxout"), std::string::npos) << message;
    EXPECT_NE(message.find("not divisible by pieces = 2"), std::string::npos) << message;
  }
  EXPECT_THROW(maxout(x, 0), ShapeError);
  EXPECT_THROW(maxout(x, 1, 2), ShapeError);
}

TEST(MaxoutGrad, SendsTiesToTheFirstArgMax) {
  Graph g;
  Value dy = g.input("dy", {2, 2});
  Value x = g.input("x", {2, 4});
  Value dx = maxout_grad(dy, x, 2, 1);
  Feeds feeds{{dy, Tensor::from({3, 4, 5, 6}, {2, 2})},
              {x, Tensor::from({2, 2, 1, 7,  //
                                -1, -1, 0, 0},
                               {2, 4})}};
  for (Backend backend : both_backends) {
    expect_values(evaluate(g, dx, feeds, backend), {3, 0, 0, 4, 5, 0, 6, 0}, 0,
                  "maxout_grad " + backend_name(backend));
  }
}

// Runs a binary op on (a, b) in f32 on both backends and in f64 on the reference.
void expect_binary(const BinaryFn& f, const Tensor& a, const Tensor& b,
                   const std::vector<double>& expected, const std::string& what) {
  for (DType dtype : {DType::f32, DType::f64}) {
    for (Backend backend : both_backends) {
      if (dtype == DType::f64 && backend == Backend::onednn) continue;
      Graph g;
      Value va = g.input("a", a.shape(), dtype);
      Value vb = g.input("b", b.shape(), dtype);
      expect_values(evaluate(g, f(va, vb), {{va, a.to(dtype)}, {vb, b.to(dtype)}}, backend),
                    expected, 0, what + " " + backend_name(backend));
    }
  }
}

TEST(Comparisons, GiveOneWhereTheRelationHolds) {
  Tensor a = Tensor::from({1, 2, 3}, {3});
  Tensor b = Tensor::from({2, 2, 2}, {3});
  expect_binary([](auto x, auto y) { return greater(x, y); }, a, b, {0, 0, 1}, "greater");
  expect_binary([](auto x, auto y) { return greater_equal(x, y); }, a, b, {0, 1, 1},
                "greater_equal");
  expect_binary([](auto x, auto y) { return less(x, y); }, a, b, {1, 0, 0}, "less");
  expect_binary([](auto x, auto y) { return less_equal(x, y); }, a, b, {1, 1, 0}, "less_equal");
  expect_binary([](auto x, auto y) { return equal(x, y); }, a, b, {0, 1, 0}, "equal");
  expect_binary([](auto x, auto y) { return not_equal(x, y); }, a, b, {1, 0, 1}, "not_equal");
}

TEST(Comparisons, BroadcastEitherInput) {
  Tensor matrix = Tensor::from({1, 2, 3, 4}, {2, 2});
  Tensor two = Tensor::scalar(2);
  expect_binary([](auto x, auto y) { return greater(x, y); }, matrix, two, {0, 0, 1, 1},
                "matrix > 2");
  // Only the second input has the output's shape: oneDNN runs the mirrored relation.
  expect_binary([](auto x, auto y) { return greater(x, y); }, two, matrix, {1, 0, 0, 0},
                "2 > matrix");
  expect_binary([](auto x, auto y) { return less_equal(x, y); }, two, matrix, {0, 1, 1, 1},
                "2 <= matrix");
  expect_binary([](auto x, auto y) { return equal(x, y); }, Tensor::from({2, 4}, {2}), matrix,
                {0, 0, 0, 1}, "row == matrix");
}

TEST(Comparisons, RefuseGradientNamingTheOp) {
  Graph g;
  Value a = g.input("a", {3});
  Value b = g.input("b", {3});
  try {
    grad(sum(less(a, b)), {a});
    FAIL() << "grad() through less did not refuse";
  } catch (const GraphError& e) {
    EXPECT_NE(std::string(e.what()).find("less"), std::string::npos) << e.what();
  }
}

TEST(Maximum, SelectsAndSendsTiesToTheFirstInput) {
  Tensor a = Tensor::from({1, 3, 5}, {3});
  Tensor b = Tensor::from({2, 3, 4}, {3});
  expect_binary([](auto x, auto y) { return maximum(x, y); }, a, b, {2, 3, 5}, "maximum");
  expect_binary([](auto x, auto y) { return minimum(x, y); }, a, b, {1, 3, 4}, "minimum");
  for (bool is_max : {true, false}) {
    Graph g;
    Value va = g.input("a", {3}, DType::f64);
    Value vb = g.input("b", {3}, DType::f64);
    Value y = is_max ? maximum(va, vb) : minimum(va, vb);
    auto grads = grad(sum(y), {va, vb});
    Feeds feeds{{va, a.to(DType::f64)}, {vb, b.to(DType::f64)}};
    Plan plan = compile(g, grads, {.backend = Backend::reference});
    auto out = plan.run(feeds);
    const std::string what = is_max ? "maximum" : "minimum";
    expect_values(out[0].to_doubles(),
                  is_max ? std::vector<double>{0, 1, 1} : std::vector<double>{1, 1, 0}, 0,
                  what + " da");
    expect_values(out[1].to_doubles(),
                  is_max ? std::vector<double>{1, 0, 0} : std::vector<double>{0, 0, 1}, 0,
                  what + " db");
  }
}

TEST(Maximum, BroadcastGradientIsSummed) {
  Graph g;
  Value a = g.input("a", {2, 2}, DType::f64);
  Value zero = g.input("zero", {}, DType::f64);
  auto grads = grad(sum(maximum(a, zero)), {a, zero});  // relu through maximum
  Plan plan = compile(g, grads, {.backend = Backend::reference});
  auto out = plan.run({{a, Tensor::from({-1, 2, 3, -4}, {2, 2}, DType::f64)},
                       {zero, Tensor::scalar(0, DType::f64)}});
  expect_values(out[0].to_doubles(), {0, 1, 1, 0}, 0, "da");
  expect_values(out[1].to_doubles(), {2}, 0, "d zero: two elements chose it");
}

TEST(Where, SelectsWithFloatOrIntegerMasks) {
  Graph g;
  Value float_mask = g.input("float_mask", {4});
  Value int_mask = g.input("int_mask", {4}, DType::i32);
  Value a = g.input("a", {4});
  Value b = g.input("b", {});
  Feeds feeds{{float_mask, Tensor::from({1, 0, 0, 1}, {4})},
              {int_mask, Tensor::from({0, 5, 0, -1}, {4}, DType::i32)},
              {a, Tensor::from({10, 20, 30, 40}, {4})},
              {b, Tensor::scalar(-7)}};
  for (Backend backend : both_backends) {
    Plan plan = compile(g, {where(float_mask, a, b), where(int_mask, a, b)}, {.backend = backend});
    auto out = plan.run(feeds);
    expect_values(out[0].to_doubles(), {10, -7, -7, 40}, 0, "float mask");
    expect_values(out[1].to_doubles(), {-7, 20, -7, 40}, 0, "nonzero integers are true");
  }
}

TEST(Where, GradientFlowsToTheSelectedInput) {
  Graph g;
  Value mask = g.input("mask", {3}, DType::f64);
  Value a = g.input("a", {3}, DType::f64);
  Value b = g.input("b", {1}, DType::f64);
  auto grads = grad(sum(where(mask, a, b)), {a, b, mask});
  Plan plan = compile(g, grads, {.backend = Backend::reference});
  auto out = plan.run({{mask, Tensor::from({1, 0, 0}, {3}, DType::f64)},
                       {a, Tensor::from({1, 2, 3}, {3}, DType::f64)},
                       {b, Tensor::from({9}, {1}, DType::f64)}});
  expect_values(out[0].to_doubles(), {1, 0, 0}, 0, "da");
  expect_values(out[1].to_doubles(), {2}, 0, "db summed over the broadcast");
  expect_values(out[2].to_doubles(), {0, 0, 0}, 0, "no gradient to the mask");
}

TEST(Where, RefusesValuesOfDifferentDtypes) {
  Graph g;
  Value mask = g.input("mask", {3});
  Value a = g.input("a", {3});
  Value b = g.input("b", {3}, DType::f64);
  try {
    where(mask, a, b);
    FAIL() << "where accepted f32 and f64 values";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("where"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dagrad
