// Initialisers: empirical mean and variance on large tensors against the formulas, with
// tolerances of 5 standard errors; reproducibility; fans; bad arguments.
#include <gtest/gtest.h>

#include <cmath>

#include "nn/init.hpp"

namespace dagrad {
namespace {

struct Moments {
  double mean = 0;
  double variance = 0;
  double min = 0;
  double max = 0;
};

Moments moments(const Tensor& tensor) {
  const std::vector<double> values = tensor.to_doubles();
  Moments m{.min = values.front(), .max = values.front()};
  for (double v : values) {
    m.mean += v;
    m.min = std::min(m.min, v);
    m.max = std::max(m.max, v);
  }
  m.mean /= static_cast<double>(values.size());
  for (double v : values) m.variance += (v - m.mean) * (v - m.mean);
  m.variance /= static_cast<double>(values.size() - 1);
  return m;
}

// Normal N(mean, σ²) sample of n: SE(mean) = σ/√n, SE(variance) = σ²·√(2/(n−1)).
void expect_normal(const Tensor& tensor, double mean, double stddev) {
  const Moments m = moments(tensor);
  const double n = static_cast<double>(tensor.numel());
  EXPECT_NEAR(m.mean, mean, 5 * stddev / std::sqrt(n));
  EXPECT_NEAR(m.variance, stddev * stddev, 5 * stddev * stddev * std::sqrt(2 / (n - 1)));
}

// Uniform U(a, b): variance (b−a)²/12; SE(variance) = √((μ4 − σ⁴)/n) with μ4 = (b−a)⁴/80.
void expect_uniform(const Tensor& tensor, double a, double b) {
  const Moments m = moments(tensor);
  const double n = static_cast<double>(tensor.numel());
  const double width = b - a;
  const double variance = width * width / 12;
  const double mu4 = std::pow(width, 4) / 80;
  EXPECT_NEAR(m.mean, (a + b) / 2, 5 * std::sqrt(variance / n));
  EXPECT_NEAR(m.variance, variance, 5 * std::sqrt((mu4 - variance * variance) / n));
  EXPECT_GE(m.min, a);
  EXPECT_LT(m.max, b);
  // Both ends are reached (within 0.1% of the width) on 250 000 draws.
  EXPECT_LT(m.min, a + 1e-3 * width);
  EXPECT_GT(m.max, b - 1e-3 * width);
}

TEST(Init, FansOfDenseAndConvolutionWeights) {
  EXPECT_EQ(init::fans({7}).in, 7);
  EXPECT_EQ(init::fans({7}).out, 7);
  EXPECT_EQ(init::fans({3, 5}).in, 3);  // [in, out] as in matmul(x, W)
  EXPECT_EQ(init::fans({3, 5}).out, 5);
  const init::Fans conv = init::fans({16, 8, 3, 3});  // [O, I, KH, KW]
  EXPECT_EQ(conv.in, 8 * 9);
  EXPECT_EQ(conv.out, 16 * 9);
}

TEST(Init, ZerosAndConstantFillEveryElement) {
  const Tensor z = init::zeros({3, 4}, DType::f64);
  EXPECT_EQ(z.dtype(), DType::f64);
  for (double v : z.to_doubles()) EXPECT_EQ(v, 0.0);
  const Tensor c = init::constant({2, 2}, 0.25);
  EXPECT_EQ(c.shape(), Shape({2, 2}));
  for (double v : c.to_doubles()) EXPECT_EQ(v, 0.25);
  const Tensor i = init::constant({3}, 7, DType::i32);
  for (double v : i.to_doubles()) EXPECT_EQ(v, 7.0);
}

TEST(Init, UniformMatchesMeanAndVarianceOfUAB) {
  expect_uniform(init::uniform({500, 500}, -0.5, 2.0, 1), -0.5, 2.0);
  expect_uniform(init::uniform({500, 500}, 3.0, 4.0, 2, DType::f64), 3.0, 4.0);
}

TEST(Init, NormalMatchesMeanAndStandardDeviation) {
  expect_normal(init::normal({500, 500}, 1.5, 0.3, 3), 1.5, 0.3);
  expect_normal(init::normal({500, 500}, -2.0, 4.0, 4, DType::f64), -2.0, 4.0);
}

TEST(Init, NormalWithZeroDeviationIsTheMean) {
  for (double v : init::normal({10}, 0.5, 0.0, 5).to_doubles()) EXPECT_EQ(v, 0.5);
}

TEST(Init, LecunNormalHasVarianceOneOverFanIn) {
  expect_normal(init::lecun_normal({400, 625}, 6), 0.0, std::sqrt(1.0 / 400));
}

TEST(Init, XavierUniformBoundIsSqrtSixOverFanSum) {
  const double bound = std::sqrt(6.0 / (400 + 625));
  expect_uniform(init::xavier_uniform({400, 625}, 7), -bound, bound);
}

TEST(Init, XavierNormalDeviationIsSqrtTwoOverFanSum) {
  expect_normal(init::xavier_normal({400, 625}, 8), 0.0, std::sqrt(2.0 / (400 + 625)));
  // Convolution weight [O=64, I=160, 5, 5]: fan_in = 4000, fan_out = 1600.
  expect_normal(init::xavier_normal({64, 160, 5, 5}, 9), 0.0, std::sqrt(2.0 / (4000 + 1600)));
}

TEST(Init, HeUniformBoundIsSqrtSixOverFanIn) {
  const double bound = std::sqrt(6.0 / 400);
  expect_uniform(init::he_uniform({400, 625}, 10), -bound, bound);
}

TEST(Init, HeNormalDeviationIsSqrtTwoOverFanIn) {
  expect_normal(init::he_normal({400, 625}, 11, DType::f64), 0.0, std::sqrt(2.0 / 400));
  expect_normal(init::he_normal({64, 160, 5, 5}, 12), 0.0, std::sqrt(2.0 / 4000));
}

TEST(Init, SameSeedSameTensorOtherSeedOtherTensor) {
  const auto a = init::he_normal({50, 20}, 42).to_doubles();
  const auto b = init::he_normal({50, 20}, 42).to_doubles();
  const auto c = init::he_normal({50, 20}, 43).to_doubles();
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // f64 and f32 draw the same numbers, rounded differently.
  const auto wide = init::he_normal({50, 20}, 42, DType::f64).to_doubles();
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], static_cast<float>(wide[i]));
}

TEST(Init, SamplesAreNotCorrelatedWithTheirNeighbour) {
  // Lag-1 autocorrelation of Box–Muller pairs: |r| < 5/√n.
  const auto v = init::normal({500, 500}, 0, 1, 13, DType::f64).to_doubles();
  double sum = 0;
  for (std::size_t i = 1; i < v.size(); ++i) sum += v[i] * v[i - 1];
  EXPECT_LT(std::abs(sum / static_cast<double>(v.size())), 5 / std::sqrt(250000.0));
}

void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    FAIL() << "no error; expected one containing \"" << fragment << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Init, BadArgumentsRaiseErrorsNamingTheInitialiserAndValues) {
  expect_error([] { init::normal({3}, 0, -1, 1); }, "init::normal");
  expect_error([] { init::normal({3}, 0, -1, 1); }, "stddev = -1");
  expect_error([] { init::uniform({3}, 2, 1, 1); }, "a = 2, b = 1");
  expect_error([] { init::uniform({3}, 0, NAN, 1); }, "init::uniform");
  expect_error([] { init::xavier_uniform(Shape{}, 1); }, "init::xavier_uniform");
  expect_error([] { init::he_normal(Shape{}, 1); }, "scalar shape");
  expect_error([] { init::he_normal({0, 3}, 1); }, "fan_in = 0");
  expect_error([] { init::uniform({3}, 0, 1, 1, DType::i32); }, "needs f32 or f64, got i32");
}

}  // namespace
}  // namespace dagrad
