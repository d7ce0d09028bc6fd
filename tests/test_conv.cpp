// conv2d, max_pool2d, avg_pool2d, global_avg_pool: answers computed by hand, the bad inputs
// each op refuses, and gradients of a small conv -> relu -> max_pool -> sum chain.
// (The registry tests already compare every kernel with its reference and gradcheck each op.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "dagrad.hpp"

namespace dagrad {
namespace {

std::vector<double> run_both(Graph& g, const Value& out, const Feeds& feeds, Backend backend) {
  CompileOptions options;
  options.backend = backend;
  Plan plan = compile(g, {out}, options);
  return plan.run(feeds)[0].to_doubles();
}

void expect_values(const std::vector<double>& actual, const std::vector<double>& expected,
                   double tolerance = 1e-5) {
  ASSERT_EQ(actual.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], tolerance) << "element " << i;
  }
}

// Every output of the oneDNN plan within 1e-4 (relative) of the reference plan's.
void expect_close_to_reference(const std::vector<Tensor>& actual,
                               const std::vector<Tensor>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (std::size_t k = 0; k < expected.size(); ++k) {
    auto e = expected[k].to_doubles();
    auto a = actual[k].to_doubles();
    ASSERT_EQ(e.size(), a.size());
    for (std::size_t i = 0; i < e.size(); ++i) {
      ASSERT_NEAR(a[i], e[i], 1e-4 * (1 + std::abs(e[i]))) << "output " << k << " element " << i;
    }
  }
}

const Backend backends[] = {Backend::onednn, Backend::reference};

TEST(Conv2d, OneChannel3x3By2x2MatchesHandComputation) {
  // x = [[1,2,3],[4,5,6],[7,8,9]], w = [[1,2],[3,4]], bias 0.5:
  // y[0,0] = 1·1 + 2·2 + 4·3 + 5·4 + 0.5 = 37.5, y[0,1] = 2 + 6 + 15 + 24 + 0.5 = 47.5,
  // y[1,0] = 4 + 10 + 21 + 32 + 0.5 = 67.5, y[1,1] = 5 + 12 + 24 + 36 + 0.5 = 77.5.
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 3, 3});
    Value w = g.input("w", {1, 1, 2, 2});
    Value b = g.input("b", {1});
    Value y = conv2d(x, w, b);
    EXPECT_EQ(y.shape(), (Shape{1, 1, 2, 2}));
    Feeds feeds{{x, Tensor::from({1, 2, 3, 4, 5, 6, 7, 8, 9}, {1, 1, 3, 3})},
                {w, Tensor::from({1, 2, 3, 4}, {1, 1, 2, 2})},
                {b, Tensor::from({0.5}, {1})}};
    expect_values(run_both(g, y, feeds, backend), {37.5, 47.5, 67.5, 77.5});
  }
}

TEST(Conv2d, PaddingStrideAndDilationChangeTheOutputSize) {
  Graph g;
  Value x = g.input("x", {2, 3, 5, 5});
  Value w = g.input("w", {4, 3, 3, 3});
  EXPECT_EQ(conv2d(x, w).shape(), (Shape{2, 4, 3, 3}));
  EXPECT_EQ(conv2d(x, w, std::nullopt, {.stride = {2, 2}, .padding = {1, 1}}).shape(),
            (Shape{2, 4, 3, 3}));
  EXPECT_EQ(conv2d(x, w, std::nullopt, {.padding = {1, 1}}).shape(), (Shape{2, 4, 5, 5}));
  // Dilation 2 makes the 3x3 kernel span 5x5.
  EXPECT_EQ(conv2d(x, w, std::nullopt, {.dilation = {2, 2}}).shape(), (Shape{2, 4, 1, 1}));
  Value grouped = g.input("wg", {4, 1, 3, 3});
  Value x4 = g.input("x4", {2, 4, 5, 5});
  EXPECT_EQ(conv2d(x4, grouped, std::nullopt, {.groups = 4}).shape(), (Shape{2, 4, 3, 3}));
}

TEST(Conv2d, DilationSkipsPixels) {
  // A 2x2 kernel of ones with dilation 2 sums the four corners of a 3x3 image.
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 3, 3});
    Value w = g.input("w", {1, 1, 2, 2});
    Value y = conv2d(x, w, std::nullopt, {.dilation = {2, 2}});
    Feeds feeds{{x, Tensor::from({1, 2, 3, 4, 5, 6, 7, 8, 9}, {1, 1, 3, 3})},
                {w, Tensor::from({1, 1, 1, 1}, {1, 1, 2, 2})}};
    expect_values(run_both(g, y, feeds, backend), {1 + 3 + 7 + 9});
  }
}

TEST(Conv2d, GroupsConvolveChannelsSeparately) {
  // Two groups, one channel each: output channel 0 sees input channel 0 only (times 2), output
  // channel 1 sees input channel 1 only (times -1).
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 2, 1, 2});
    Value w = g.input("w", {2, 1, 1, 1});
    Value y = conv2d(x, w, std::nullopt, {.groups = 2});
    Feeds feeds{{x, Tensor::from({1, 2, 10, 20}, {1, 2, 1, 2})},
                {w, Tensor::from({2, -1}, {2, 1, 1, 1})}};
    expect_values(run_both(g, y, feeds, backend), {2, 4, -10, -20});
  }
}

// x = [[1,5,2,0],[3,4,8,6],[7,0,1,2],[9,3,4,5]]
Tensor pool_input() {
  return Tensor::from({1, 5, 2, 0, 3, 4, 8, 6, 7, 0, 1, 2, 9, 3, 4, 5}, {1, 1, 4, 4});
}

TEST(MaxPool2d, FourByFourKnownInput) {
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 4, 4});
    Value y = max_pool2d(x, {2, 2}, {2, 2});
    expect_values(run_both(g, y, {{x, pool_input()}}, backend), {5, 8, 9, 5});
  }
}

TEST(MaxPool2d, GradientGoesToEachWindowMaximum) {
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 4, 4});
    Value dy = g.input("dy", {1, 1, 2, 2});
    Value dx = max_pool2d_backward(dy, x, {2, 2}, {2, 2});
    Feeds feeds{{x, pool_input()}, {dy, Tensor::from({10, 20, 30, 40}, {1, 1, 2, 2})}};
    // Maxima: 5 at (0,1), 8 at (1,2), 9 at (3,0), 5 at (3,3).
    expect_values(run_both(g, dx, feeds, backend),
                  {0, 10, 0, 0, 0, 0, 20, 0, 0, 0, 0, 0, 30, 0, 0, 40});
  }
}

TEST(MaxPool2d, GatherReadsAtEachWindowMaximum) {
  // The adjoint of max_pool2d_backward: reads g where x has its window maxima.
  Graph g;
  Value x = g.input("x", {1, 1, 4, 4});
  Value source = g.input("g", {1, 1, 4, 4});
  Value y = max_pool2d_gather(source, x, {2, 2}, {2, 2});
  std::vector<double> ramp(16);
  for (std::size_t i = 0; i < ramp.size(); ++i) ramp[i] = static_cast<double>(i);
  Feeds feeds{{x, pool_input()}, {source, Tensor::from(ramp, {1, 1, 4, 4})}};
  // Maxima at flat indices 1, 6, 12, 15.
  expect_values(run_both(g, y, feeds, Backend::reference), {1, 6, 12, 15});
}

TEST(MaxPool2d, TiedMaximaSendTheGradientToTheFirst) {
  Graph g;
  Value x = g.input("x", {1, 1, 2, 2});
  Value dy = g.input("dy", {1, 1, 1, 1});
  Value dx = max_pool2d_backward(dy, x, {2, 2}, {1, 1});
  Feeds feeds{{x, Tensor::from({1, 3, 3, 3}, {1, 1, 2, 2})}, {dy, Tensor::from({1}, {1, 1, 1, 1})}};
  expect_values(run_both(g, dx, feeds, Backend::reference), {0, 1, 0, 0});
}

// Rows of 18 windows: two 8-window blocks of the AVX2 loop and two windows for the scalar tail;
// an odd height leaves the last row to no window. Values are small integers, so most windows
// hold tied maxima (the first must win) and many hold zeros (relu's mask), plus a NaN.
TEST(MaxPool2d, VectorisedLoopsMatchTheReferenceWithTiesAndNaN) {
  const Shape shape{2, 3, 9, 36};
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> level(-2, 2);
  Tensor x(shape, DType::f32), dy(Shape{2, 3, 4, 18}, DType::f32);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.set(i, level(rng));
  x.data<float>()[37] = std::numeric_limits<float>::quiet_NaN();
  for (std::int64_t i = 0; i < dy.numel(); ++i) dy.set(i, 1.0 + static_cast<double>(i));
  std::vector<double> results[2][3];
  for (int b = 0; b < 2; ++b) {
    Graph g;
    Value xv = g.input("x", shape);
    Value dyv = g.input("dy", dy.shape());
    Value y = max_pool2d(xv, {2, 2}, {2, 2});
    Value dx = max_pool2d_backward(dyv, xv, {2, 2}, {2, 2}, {0, 0});
    Value masked = relu_grad(max_pool2d_backward(dyv, xv, {2, 2}, {2, 2}, {0, 0}), xv);
    Plan plan = compile(g, {y, dx, masked}, {.backend = backends[b]});
    const auto& out = plan.run({{xv, x}, {dyv, dy}});
    for (int k = 0; k < 3; ++k) results[b][k] = out[static_cast<std::size_t>(k)].to_doubles();
    if (b == 0) {
      auto patterns = plan.fused_patterns();
      EXPECT_NE(std::find(patterns.begin(), patterns.end(), "max_pool2d_backward+relu_grad"),
                patterns.end());
    }
  }
  for (int k = 0; k < 3; ++k) {
    ASSERT_EQ(results[0][k].size(), results[1][k].size());
    for (std::size_t i = 0; i < results[0][k].size(); ++i) {
      const double a = results[0][k][i], r = results[1][k][i];
      if (std::isnan(r)) {
        EXPECT_TRUE(std::isnan(a)) << "output " << k << " element " << i;
      } else {
        EXPECT_EQ(a, r) << "output " << k << " element " << i;
      }
    }
  }
}

TEST(MaxPool2d, PaddingNeverWins) {
  // All values negative: zero padding would win if it were counted.
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 2, 2});
    Value y = max_pool2d(x, {2, 2}, {2, 2}, {1, 1});
    expect_values(run_both(g, y, {{x, Tensor::from({-1, -2, -3, -4}, {1, 1, 2, 2})}}, backend),
                  {-1, -2, -3, -4});
  }
}

TEST(AvgPool2d, FourByFourKnownInput) {
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 4, 4});
    Value y = avg_pool2d(x, {2, 2}, {2, 2});
    expect_values(run_both(g, y, {{x, pool_input()}}, backend), {3.25, 4, 4.75, 3});
  }
}

TEST(AvgPool2d, PaddingIsExcludedFromTheCount) {
  // Kernel 2, stride 2, padding 1 on 4x4: corner windows hold one pixel, edge windows two.
  for (Backend backend : backends) {
    Graph g;
    Value x = g.input("x", {1, 1, 4, 4});
    Value y = avg_pool2d(x, {2, 2}, {2, 2}, {1, 1});
    EXPECT_EQ(y.shape(), (Shape{1, 1, 3, 3}));
    expect_values(run_both(g, y, {{x, pool_input()}}, backend), {1, 3.5, 0, 5, 3.25, 4, 9, 3.5, 5});
  }
}

TEST(AvgPool2d, GradientSpreadsOverTheWindowsElements) {
  for (Backend backend : backends) {
    Graph g;
    Value dy = g.input("dy", {1, 1, 2, 2});
    Value dx = avg_pool2d_backward(dy, {1, 1, 3, 3}, {2, 2}, {2, 2}, {1, 1});
    // Windows: {x00}, {x01, x02}, {x10, x20}, {x11, x12, x21, x22}.
    Feeds feeds{{dy, Tensor::from({1, 2, 4, 8}, {1, 1, 2, 2})}};
    expect_values(run_both(g, dx, feeds, backend), {1, 1, 1, 2, 2, 2, 2, 2, 2});
  }
}

TEST(GlobalAvgPool, MeansOverHeightAndWidth) {
  Graph g;
  Value x = g.input("x", {1, 2, 2, 2});
  Value y = global_avg_pool(x);
  Value kept = global_avg_pool(x, true);
  EXPECT_EQ(y.shape(), (Shape{1, 2}));
  EXPECT_EQ(kept.shape(), (Shape{1, 2, 1, 1}));
  Feeds feeds{{x, Tensor::from({1, 2, 3, 4, 10, 20, 30, 40}, {1, 2, 2, 2})}};
  expect_values(run_both(g, y, feeds, Backend::onednn), {2.5, 25});
  EXPECT_THROW(global_avg_pool(g.input("flat", {2, 3})), ShapeError);
}

// The message of the ShapeError building `build` raises.
template <class F>
std::string error_of(F build) {
  try {
    build();
  } catch (const ShapeError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Conv2d, RefusesBadInputsWithClearMessages) {
  Graph g;
  Value x = g.input("x", {1, 3, 5, 5});
  std::string message = error_of([&] { conv2d(x, g.input("w4", {4, 4, 3, 3})); });
  EXPECT_NE(message.find("conv2d"), std::string::npos) << message;
  EXPECT_NE(message.find("input has 3 channels but the weights expect 4"), std::string::npos)
      << message;
  EXPECT_NE(message.find("[1,3,5,5]"), std::string::npos) << message;

  message = error_of([&] {
    conv2d(g.input("x4", {1, 4, 5, 5}), g.input("w3", {3, 2, 3, 3}), std::nullopt, {.groups = 2});
  });
  EXPECT_NE(message.find("3 output channels are not divisible by 2 groups"), std::string::npos)
      << message;

  message = error_of([&] {
    conv2d(x, g.input("w8", {4, 3, 8, 8}), std::nullopt, {.padding = {1, 1}});
  });
  EXPECT_NE(message.find("the kernel spans 8x8"), std::string::npos) << message;
  EXPECT_NE(message.find("padded input is only 7x7"), std::string::npos) << message;

  message = error_of([&] { conv2d(g.input("empty", {0, 3, 5, 5}), g.input("w", {4, 3, 3, 3})); });
  EXPECT_NE(message.find("zero-size"), std::string::npos) << message;

  message = error_of([&] {
    conv2d(x, g.input("w5", {4, 3, 3, 3}), std::nullopt, {.stride = {0, 1}});
  });
  EXPECT_NE(message.find("stride must be at least 1"), std::string::npos) << message;

  message = error_of([&] { conv2d(x, g.input("w6", {4, 3, 3, 3}), g.input("b", {3})); });
  EXPECT_NE(message.find("bias must be [4]"), std::string::npos) << message;
}

TEST(Pooling, RefusesBadInputsWithClearMessages) {
  Graph g;
  Value x = g.input("x", {1, 1, 3, 3});
  std::string message = error_of([&] { max_pool2d(x, {4, 4}, {1, 1}); });
  EXPECT_NE(message.find("max_pool2d"), std::string::npos) << message;
  EXPECT_NE(message.find("the kernel 4x4 is larger than the padded input 3x3"), std::string::npos)
      << message;
  message = error_of([&] { avg_pool2d(x, {2, 2}, {1, 0}); });
  EXPECT_NE(message.find("avg_pool2d"), std::string::npos) << message;
  EXPECT_NE(message.find("stride must be at least 1"), std::string::npos) << message;
  message = error_of([&] { max_pool2d(g.input("empty", {1, 0, 3, 3}), {2, 2}, {2, 2}); });
  EXPECT_NE(message.find("leaves no output"), std::string::npos) << message;
  message = error_of([&] { avg_pool2d(x, {2, 2}, {1, 1}, {2, 2}); });
  EXPECT_NE(message.find("must be smaller than the kernel"), std::string::npos) << message;
}

Tensor random_tensor(Shape shape, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<double> values(static_cast<std::size_t>(shape.numel()));
  for (auto& v : values) v = dist(rng);
  return Tensor::from(values, std::move(shape), DType::f64);
}

TEST(Conv2d, ConvReluMaxPoolChainPassesGradcheck) {
  Graph g;
  Value x = g.input("x", {2, 2, 6, 6}, DType::f64);
  Value w = g.input("w", {3, 2, 3, 3}, DType::f64);
  Value b = g.input("b", {3}, DType::f64);
  Value y = conv2d(x, w, b, {.padding = {1, 1}});
  Value pooled = max_pool2d(relu(y), {2, 2}, {2, 2});
  Value loss = sum(pooled);
  std::mt19937_64 rng(3);
  Feeds feeds{{x, random_tensor({2, 2, 6, 6}, rng)},
              {w, random_tensor({3, 2, 3, 3}, rng)},
              {b, random_tensor({3}, rng)}};
  GradcheckResult result = gradcheck(g, loss, feeds);
  EXPECT_TRUE(result.ok) << result.report();
  EXPECT_EQ(result.elements_checked, 2u * 2 * 6 * 6 + 3 * 2 * 3 * 3 + 3);
}

TEST(Conv2d, StridedGroupedConvAvgPoolChainPassesGradgradcheck) {
  Graph g;
  Value x = g.input("x", {1, 4, 7, 7}, DType::f64);
  Value w = g.input("w", {4, 2, 3, 3}, DType::f64);
  Value y = conv2d(x, w, std::nullopt, {.stride = {2, 2}, .padding = {1, 1}, .groups = 2});
  Value pooled = avg_pool2d(y, {2, 2}, {1, 1}, {1, 1});
  Value loss = sum(pooled * pooled);
  std::mt19937_64 rng(5);
  Feeds feeds{{x, random_tensor({1, 4, 7, 7}, rng)}, {w, random_tensor({4, 2, 3, 3}, rng)}};
  GradcheckResult first = gradcheck(g, loss, feeds);
  EXPECT_TRUE(first.ok) << first.report();
  GradcheckResult second = gradgradcheck(g, loss, feeds, {.tolerance = 1e-5});
  EXPECT_TRUE(second.ok) << second.report();
}

TEST(Conv2d, PaddingWiderThanTheKernelMatchesTheReference) {
  Graph g;
  Value x = g.input("x", {1, 2, 4, 5});
  Value w = g.input("w", {3, 2, 3, 2});
  Value y = conv2d(x, w, std::nullopt, {.stride = {3, 2}, .padding = {4, 3}, .dilation = {2, 1}});
  // H: (4 + 8 − 5) / 3 + 1 = 3; W: (5 + 6 − 2) / 2 + 1 = 5.
  EXPECT_EQ(y.shape(), (Shape{1, 3, 3, 5}));
  std::mt19937_64 rng(4);
  Feeds feeds{{x, random_tensor({1, 2, 4, 5}, rng).to(DType::f32)},
              {w, random_tensor({3, 2, 3, 2}, rng).to(DType::f32)}};
  auto expected = run_both(g, y, feeds, Backend::reference);
  auto actual = run_both(g, y, feeds, Backend::onednn);
  expect_values(actual, expected);
}

TEST(Conv2d, ConvMaxPoolChainPassesGradgradcheck) {
  Graph g;
  Value x = g.input("x", {1, 2, 5, 5}, DType::f64);
  Value w = g.input("w", {2, 2, 2, 2}, DType::f64);
  Value pooled =
      max_pool2d(conv2d(x, w, std::nullopt, {.padding = {1, 1}}), {3, 3}, {2, 2}, {1, 1});
  Value loss = sum(pooled * pooled);
  std::mt19937_64 rng(8);
  Feeds feeds{{x, random_tensor({1, 2, 5, 5}, rng)}, {w, random_tensor({2, 2, 2, 2}, rng)}};
  GradcheckResult second = gradgradcheck(g, loss, feeds, {.tolerance = 1e-5});
  EXPECT_TRUE(second.ok) << second.report();
}

TEST(Conv2d, OneDnnGradientsMatchReferenceGradients) {
  // The whole backward graph (conv2d_backward_data/weights, max_pool2d_backward, relu_grad)
  // through oneDNN in f32 against the reference kernels.
  Graph g;
  Value x = g.input("x", {2, 3, 8, 8});
  Value w = g.input("w", {4, 3, 3, 3});
  Value b = g.input("b", {4});
  Value y = conv2d(x, w, b, {.stride = {1, 1}, .padding = {1, 1}});
  Value loss = sum(max_pool2d(relu(y), {2, 2}, {2, 2}));
  auto grads = grad(loss, {x, w, b});
  std::mt19937_64 rng(9);
  Feeds feeds{{x, random_tensor({2, 3, 8, 8}, rng).to(DType::f32)},
              {w, random_tensor({4, 3, 3, 3}, rng).to(DType::f32)},
              {b, random_tensor({4}, rng).to(DType::f32)}};
  Plan fast = compile(g, grads);
  Plan reference = compile(g, grads, {.backend = Backend::reference});
  EXPECT_GE(fast.num_onednn_steps(), 3u);
  expect_close_to_reference(fast.run(feeds), reference.run(feeds));
}

TEST(Conv2d, BlockedLayoutsMatchTheReference) {
  // Enough channels for oneDNN to pick blocked layouts (nChw8c / nChw16c), so the kernels'
  // reorders from and to the plain tensors are exercised; with and without groups.
  for (std::int64_t groups : {1, 2}) {
    SCOPED_TRACE(groups);
    Graph g;
    Value x = g.input("x", {2, 16, 7, 7});
    Value w = g.input("w", {32, 16 / groups, 3, 3});
    Value b = g.input("b", {32});
    Value y = conv2d(x, w, b, {.stride = {2, 2}, .padding = {1, 1}, .groups = groups});
    Value loss = sum(y * y);
    std::vector<Value> outputs = grad(loss, {x, w, b});
    outputs.push_back(y);
    std::mt19937_64 rng(21);
    Feeds feeds{{x, random_tensor({2, 16, 7, 7}, rng).to(DType::f32)},
                {w, random_tensor({32, 16 / groups, 3, 3}, rng).to(DType::f32)},
                {b, random_tensor({32}, rng).to(DType::f32)}};
    Plan fast = compile(g, outputs);
    Plan reference = compile(g, outputs, {.backend = Backend::reference});
    expect_close_to_reference(fast.run(feeds), reference.run(feeds));
  }
}

TEST(Conv2d, FirstLayerBlockMatchesTheReference) {
  // The CNN's first block at a small scale: one input channel, relu, and 2x2 stride 2 max
  // pooling of an odd-sized image (the direct pooling kernels; the last row and column are read
  // by no window, so their gradient is zero). The weights gradient runs on NHWC layouts: without
  // dx (an input image, as in the CNN) as its own step with dy reordered from NCHW, with dx
  // fused with the data gradient.
  for (bool with_dx : {false, true}) {
    SCOPED_TRACE(with_dx);
    Graph g;
    Value x = g.input("x", {3, 1, 13, 11});
    Value w = g.input("w", {20, 1, 5, 5});
    Value b = g.input("b", {20});
    Value pooled = max_pool2d(relu(conv2d(x, w, b, {.padding = {2, 2}})), {2, 2}, {2, 2});
    EXPECT_EQ(pooled.shape(), (Shape{3, 20, 6, 5}));
    Value loss = sum(pooled * pooled);
    std::vector<Value> outputs =
        with_dx ? grad(loss, {x, w, b}) : grad(loss, std::vector<Value>{w, b});
    outputs.push_back(pooled);
    std::mt19937_64 rng(33);
    Feeds feeds{{x, random_tensor({3, 1, 13, 11}, rng).to(DType::f32)},
                {w, random_tensor({20, 1, 5, 5}, rng).to(DType::f32)},
                {b, random_tensor({20}, rng).to(DType::f32)}};
    Plan fast = compile(g, outputs);
    Plan reference = compile(g, outputs, {.backend = Backend::reference});
    EXPECT_GE(fast.num_onednn_steps(), 4u);
    expect_close_to_reference(fast.run(feeds), reference.run(feeds));
  }
}

TEST(Conv2d, OneChannelStridedWeightsGradientMatchesTheReference) {
  // One input channel, stride 2 or 3: oneDNN 2.6's 1x1 weights gradient on NHWC layouts (which
  // the one-channel weights gradient used for every stride) returns wrong values for these
  // shapes, and for some it writes outside its buffers; the kernel now takes NHWC only for
  // stride 1. Kernels 1 and 3, with and without dx (the weights gradient alone, or fused with
  // the data gradient).
  struct Case {
    Shape x;
    std::int64_t filters, kernel, stride;
  };
  for (const Case& c : {Case{{2, 1, 8, 8}, 1, 1, 2}, Case{{8, 1, 6, 12}, 7, 1, 2},
                        Case{{2, 1, 12, 12}, 8, 1, 3}, Case{{3, 1, 10, 9}, 4, 3, 2}}) {
    for (bool with_dx : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << c.x.str() << " " << c.filters << " filters " << c.kernel << "x" << c.kernel
                   << " stride " << c.stride << (with_dx ? " with dx" : ""));
      Graph g;
      Value x = g.input("x", c.x);
      Value w = g.input("w", {c.filters, 1, c.kernel, c.kernel});
      Value y = conv2d(x, w, std::nullopt, {.stride = {c.stride, c.stride}});
      Value loss = sum(y * y);
      std::vector<Value> outputs = with_dx ? grad(loss, {x, w}) : grad(loss, std::vector<Value>{w});
      std::mt19937_64 rng(41);
      Feeds feeds{{x, random_tensor(c.x, rng).to(DType::f32)},
                  {w, random_tensor({c.filters, 1, c.kernel, c.kernel}, rng).to(DType::f32)}};
      Plan fast = compile(g, outputs);
      Plan reference = compile(g, outputs, {.backend = Backend::reference});
      expect_close_to_reference(fast.run(feeds), reference.run(feeds));
    }
  }
}

}  // namespace
}  // namespace dagrad
