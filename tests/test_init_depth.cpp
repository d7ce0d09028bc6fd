// The course's point about initialisation: through a 10-layer tanh network, Xavier keeps the
// activations spread out, N(0, σ) with σ too small makes them collapse towards 0, and σ too
// large saturates them at ±1.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "dagrad.hpp"
#include "nn/init.hpp"

namespace dagrad {
namespace {

struct Spread {
  double stddev = 0;     // of the last layer's activations
  double saturated = 0;  // fraction with |h| > 0.99
};

Spread last_layer(const std::function<Tensor(Shape, std::uint64_t)>& init) {
  const std::int64_t width = 256, batch = 500, layers = 10;
  Graph g;
  Value x = g.input("x", {batch, width});
  Value h = x;
  for (std::int64_t l = 0; l < layers; ++l) {
    Value w = g.parameter(fmt::format("w{}", l),
                          init({width, width}, 100 + static_cast<std::uint64_t>(l)));
    h = tanh(matmul(h, w));
  }
  Tensor input = init::normal({batch, width}, 0.0, 1.0, 7);
  Tensor out = compile(g, {h}).run({{x, input}})[0].clone();
  double sum = 0, sum_sq = 0, saturated = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i) {
    const double v = out.at(i);
    sum += v;
    sum_sq += v * v;
    saturated += std::abs(v) > 0.99;
  }
  const double n = static_cast<double>(out.numel());
  return {std::sqrt(sum_sq / n - (sum / n) * (sum / n)), saturated / n};
}

TEST(InitDepth, XavierKeepsTheActivationsOfATenLayerTanhNetworkSpread) {
  Spread s =
      last_layer([](Shape shape, std::uint64_t seed) { return init::xavier_normal(shape, seed); });
  EXPECT_GT(s.stddev, 0.2);
  EXPECT_LT(s.saturated, 0.05);
}

TEST(InitDepth, TooSmallANormalCollapsesThem) {
  Spread s = last_layer(
      [](Shape shape, std::uint64_t seed) { return init::normal(shape, 0.0, 0.01, seed); });
  EXPECT_LT(s.stddev, 1e-6);
}

TEST(InitDepth, TooLargeANormalSaturatesThem) {
  Spread s = last_layer(
      [](Shape shape, std::uint64_t seed) { return init::normal(shape, 0.0, 1.0, seed); });
  EXPECT_GT(s.saturated, 0.8);
}

}  // namespace
}  // namespace dagrad
