// Sparse cross-entropy fused into dagrad's own kernels (ops/cross_entropy_kernels.hpp): the
// plan runs them, and their results match the reference backend (sums in double) for every
// reduction, with weights, with intermediate values requested, at shapes around the 8-lane
// vectors and across the parallel threshold; NaN and infinite logits and bad labels behave as
// in the unfused plan.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "dagrad.hpp"
#include "ops/cross_entropy_kernels.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

Tensor labels_tensor(std::int64_t rows, std::int64_t classes, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(classes - 1));
  Tensor t({rows}, DType::i32);
  for (std::int32_t& v : t.span<std::int32_t>()) v = pick(rng);
  return t;
}

bool has_pattern(Plan& plan, const std::string& pattern) {
  const auto patterns = plan.fused_patterns();
  return std::find(patterns.begin(), patterns.end(), pattern) != patterns.end();
}

std::string patterns_of(Plan& plan) {
  std::string all;
  for (const auto& p : plan.fused_patterns()) all += p + "; ";
  return all;
}

void expect_near_all(const std::vector<Tensor>& got, const std::vector<Tensor>& expected,
                     double tolerance, const std::string& what) {
  ASSERT_EQ(got.size(), expected.size());
  for (std::size_t k = 0; k < got.size(); ++k) {
    ASSERT_EQ(got[k].numel(), expected[k].numel());
    for (std::int64_t i = 0; i < got[k].numel(); ++i) {
      ASSERT_NEAR(got[k].at(i), expected[k].at(i), tolerance * (1 + std::abs(expected[k].at(i))))
          << what << ", output " << k << ", element " << i;
    }
  }
}

// The mean loss of logits z = x·w and its gradients, at shapes around the vector width (rows of
// 1, 7, 8, 9 and 1000 classes) and above the kernels' parallel threshold (300 × 300): one step
// each way, against the reference backend; 1 and 2 threads give the same bits.
TEST(LossFusion, MeanSparseCrossEntropyRunsAsTwoSteps) {
  struct Case {
    std::int64_t rows, classes;
  };
  const int saved = num_threads();
  std::uint64_t seed = 1;
  for (const Case& k :
       std::vector<Case>{{1, 1}, {3, 7}, {5, 8}, {4, 9}, {128, 10}, {6, 1000}, {300, 300}}) {
    const std::string what = fmt::format("{} x {}", k.rows, k.classes);
    Graph g;
    Value x = g.input("x", {k.rows, 5});
    Value labels = g.input("labels", {k.rows}, DType::i32);
    Value w = g.parameter("w", testing::uniform_tensor({5, k.classes}, seed++, -3, 3));
    Value z = matmul(x, w);
    Value loss = sparse_cross_entropy(z, labels);
    const std::vector<Value> outputs{loss, grad(loss, {z})[0]};
    const Feeds feeds{{x, testing::uniform_tensor({k.rows, 5}, seed++)},
                      {labels, labels_tensor(k.rows, k.classes, seed++)}};
    Plan reference = compile(g, outputs, {.backend = Backend::reference});
    const auto expected = reference.run(feeds);
    Plan plain = compile(g, outputs, {.fuse = false});
    std::vector<std::vector<std::uint8_t>> bits;
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      Plan plan = compile(g, outputs, {.single_thread_below_bytes = 0});
      expect_near_all(plan.run(feeds), expected, 2e-6, what);
      const auto out = plan.run(feeds);
      bits.push_back(testing::bytes_of(out[0]));
      const auto dz = testing::bytes_of(out[1]);
      bits.back().insert(bits.back().end(), dz.begin(), dz.end());
      if (k.rows == 1) continue;  // one row: the mean's backward has no division to fuse
      EXPECT_TRUE(has_pattern(plan, "log_softmax+pick+neg+mean"))
          << what << ": " << patterns_of(plan);
      EXPECT_TRUE(has_pattern(plan, "div+reshape+broadcast_to+neg+pick_grad+log_softmax_grad"))
          << what << ": " << patterns_of(plan);
      // Nine steps of the loss (log_softmax, pick, neg, mean; div, broadcast_to, neg,
      // pick_grad, log_softmax_grad; the reshape is a view) are two.
      EXPECT_EQ(plan.num_steps() + 7, plain.num_steps()) << what;
      for (const StepProfile& step : plan.profile()) {
        if (step.op.find("pick") != std::string::npos) {
          EXPECT_EQ(step.kernel, "dagrad") << what;  // Kernel::library() in profiles
        }
        if (step.op == "matmul") {
          EXPECT_EQ(step.kernel, "oneDNN") << what;
        }
      }
    }
    EXPECT_EQ(bits[0], bits[1]) << what;
  }
  set_num_threads(saved);
}

// Every reduction, with and without per-example weights: the forward always fuses through
// pick (and neg), the backward from whatever shape the incoming gradient has (a vector, a
// broadcast scalar, the mean's quotient), and all match the reference backend.
TEST(LossFusion, EveryReductionAndWeightsMatchTheReference) {
  std::uint64_t seed = 40;
  for (Reduction reduction : {Reduction::none, Reduction::sum, Reduction::mean}) {
    for (bool weighted : {false, true}) {
      const std::string what =
          fmt::format("reduction {}, weights {}", static_cast<int>(reduction), weighted);
      Graph g;
      Value z = g.input("z", {6, 4});
      Value labels = g.input("labels", {6}, DType::i32);
      Value weights = g.input("weights", {6});
      Value loss = sparse_cross_entropy(z, labels, reduction,
                                        weighted ? std::optional<Value>(weights) : std::nullopt);
      // A vector loss is weighted once more so that its gradient is not uniform.
      Value scalar = reduction == Reduction::none ? sum(loss * weights) : loss;
      const std::vector<Value> outputs{scalar, grad(scalar, {z})[0]};
      const Feeds feeds{{z, testing::uniform_tensor({6, 4}, seed++, -4, 4)},
                        {labels, labels_tensor(6, 4, seed++)},
                        {weights, testing::uniform_tensor({6}, seed++, 0.5, 2)}};
      Plan reference = compile(g, outputs, {.backend = Backend::reference});
      Plan plan = compile(g, outputs);
      expect_near_all(plan.run(feeds), reference.run(feeds), 2e-6, what);
      const auto patterns = plan.fused_patterns();
      EXPECT_TRUE(
          std::any_of(patterns.begin(), patterns.end(),
                      [](const std::string& p) { return p.starts_with("log_softmax+pick"); }))
          << what << ": " << patterns_of(plan);
      EXPECT_TRUE(std::any_of(
          patterns.begin(), patterns.end(),
          [](const std::string& p) { return p.ends_with("pick_grad+log_softmax_grad"); }))
          << what << ": " << patterns_of(plan);
    }
  }
}

// Values inside the fused chain that are requested outputs, or read by other ops, are still
// written: log_softmax's y, pick's p and the per-example losses.
TEST(LossFusion, IntermediateValuesStayAvailable) {
  Graph g;
  Value z = g.input("z", {5, 3});
  Value labels = g.input("labels", {5}, DType::i32);
  Value y = log_softmax(z);
  Value p = pick(y, labels);
  Value per_example = neg(p);
  Value loss = mean(per_example);
  Value other = sum(exp(y));  // another reader of y: 5 (each row of e^y sums to 1)
  const std::vector<Value> outputs{loss, y, p, other, grad(loss + other, {z})[0]};
  const Feeds feeds{{z, testing::uniform_tensor({5, 3}, 3, -2, 2)},
                    {labels, labels_tensor(5, 3, 4)}};
  Plan reference = compile(g, outputs, {.backend = Backend::reference});
  Plan plan = compile(g, outputs);
  const auto got = plan.run(feeds);
  expect_near_all(got, reference.run(feeds), 2e-6, "requested intermediates");
  EXPECT_NEAR(got[3].at(0), 5.0, 1e-5);
  EXPECT_TRUE(has_pattern(plan, "log_softmax+pick+neg+mean")) << patterns_of(plan);
}

// pick without neg after it (a log-likelihood summed by the user): the forward fuses as
// log_softmax+pick, the backward from the vector gradient of the products.
TEST(LossFusion, PickWithoutNegFusesToo) {
  Graph g;
  Value z = g.input("z", {7, 5});
  Value labels = g.input("labels", {7}, DType::i32);
  Value t = g.input("t", {7});
  Value likelihood = sum(pick(log_softmax(z), labels) * t);
  const std::vector<Value> outputs{likelihood, grad(likelihood, {z})[0]};
  const Feeds feeds{{z, testing::uniform_tensor({7, 5}, 8, -3, 3)},
                    {labels, labels_tensor(7, 5, 9)},
                    {t, testing::uniform_tensor({7}, 10)}};
  Plan reference = compile(g, outputs, {.backend = Backend::reference});
  Plan plan = compile(g, outputs);
  expect_near_all(plan.run(feeds), reference.run(feeds), 2e-6, "pick without neg");
  EXPECT_TRUE(has_pattern(plan, "log_softmax+pick")) << patterns_of(plan);
  EXPECT_TRUE(has_pattern(plan, "pick_grad+log_softmax_grad")) << patterns_of(plan);
}

// log_softmax along the columns, or in f64, is not the row pass the kernels compute: the plan
// keeps the ops, and the results match the reference.
TEST(LossFusion, ColumnSoftmaxAndF64AreNotFused) {
  for (DType dtype : {DType::f32, DType::f64}) {
    Graph g;
    Value z = g.input("z", {4, 4}, dtype);
    Value labels = g.input("labels", {4}, DType::i32);
    const std::int64_t axis = dtype == DType::f32 ? 0 : -1;
    Value loss = mean(neg(pick(log_softmax(z, axis), labels)));
    const std::vector<Value> outputs{loss, grad(loss, {z})[0]};
    Tensor logits = testing::uniform_tensor({4, 4}, 11, -2, 2);
    if (dtype == DType::f64) logits = Tensor::from(logits.to_doubles(), {4, 4}, DType::f64);
    const Feeds feeds{{z, logits}, {labels, labels_tensor(4, 4, 12)}};
    Plan plan = compile(g, outputs);
    Plan reference = compile(g, outputs, {.backend = Backend::reference});
    expect_near_all(plan.run(feeds), reference.run(feeds), 2e-6, fmt::format("{}", dtype));
    for (const std::string& p : plan.fused_patterns()) {
      EXPECT_EQ(p.find("pick"), std::string::npos) << p;
    }
  }
}

// A NaN logit makes its row's log-probabilities and gradients and the loss NaN, as the
// reference backend does; an infinitely negative logit has probability 0 (y = -inf, dz = 0) and
// leaves its row finite. (oneDNN's unfused kernels do not keep the NaN in the gradient.)
TEST(LossFusion, NaNAndInfiniteLogitsAsInTheReference) {
  Graph g;
  Value z = g.input("z", {3, 4});
  Value labels = g.input("labels", {3}, DType::i32);
  Value y = log_softmax(z);
  Value loss = mean(neg(pick(y, labels)));
  const std::vector<Value> outputs{loss, y, grad(loss, {z})[0]};
  Tensor logits = testing::uniform_tensor({3, 4}, 5);
  logits.span<float>()[5] = std::numeric_limits<float>::quiet_NaN();  // row 1
  logits.span<float>()[8] = -std::numeric_limits<float>::infinity();  // row 2, class 0
  Tensor l({3}, DType::i32);
  l.span<std::int32_t>()[0] = 0;
  l.span<std::int32_t>()[1] = 2;
  l.span<std::int32_t>()[2] = 3;
  const Feeds feeds{{z, logits}, {labels, l}};
  Plan fused = compile(g, outputs);
  Plan reference = compile(g, outputs, {.backend = Backend::reference});
  ASSERT_TRUE(has_pattern(fused, "log_softmax+pick+neg+mean")) << patterns_of(fused);
  const auto got = fused.run(feeds);
  const auto expected = reference.run(feeds);
  EXPECT_TRUE(std::isnan(got[0].at(0)));
  for (std::size_t k : {1, 2}) {
    for (std::int64_t i = 0; i < 12; ++i) {
      const double want = expected[k].at(i);
      EXPECT_EQ(std::isnan(want), i / 4 == 1) << "output " << k << ", element " << i;
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got[k].at(i))) << "output " << k << ", element " << i;
      } else if (std::isinf(want)) {
        EXPECT_EQ(got[k].at(i), want) << "output " << k << ", element " << i;
      } else {
        EXPECT_NEAR(got[k].at(i), want, 1e-5) << "output " << k << ", element " << i;
      }
    }
  }
  EXPECT_EQ(got[1].at(8), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(got[2].at(8), 0.0);
}

// A label out of range fails the fused forward with pick's message, naming the label, its
// position and the number of classes.
TEST(LossFusion, ALabelOutOfRangeRaisesPicksError) {
  Graph g;
  Value z = g.input("z", {4, 10});
  Value labels = g.input("labels", {4}, DType::i32);
  Value loss = sparse_cross_entropy(z, labels);
  Plan plan = compile(g, {loss, grad(loss, {z})[0]});
  ASSERT_TRUE(has_pattern(plan, "log_softmax+pick+neg+mean")) << patterns_of(plan);
  for (std::int32_t bad : {10, -1}) {
    Tensor l = labels_tensor(4, 10, 6);
    l.span<std::int32_t>()[3] = bad;
    try {
      plan.run({{z, testing::uniform_tensor({4, 10}, 7)}, {labels, l}});
      FAIL() << "label " << bad << " was accepted";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(fmt::format("label {} at position 3 is outside [0, 10)", bad)),
                std::string::npos)
          << message;
      EXPECT_NE(message.find("pick"), std::string::npos) << message;
    }
  }
}

// The vector e^x against std::exp in double: within 2 ulp on the range softmax uses (and
// beyond), 0 below ln(FLT_MIN), +inf above ln(FLT_MAX), NaN for NaN; every length's tail.
TEST(LossFusion, VectorExpMatchesStdExp) {
  std::vector<float> x;
  for (double v = -87.0; v <= 88.0; v += 0.01237) x.push_back(static_cast<float>(v));
  for (float v : {0.f, -0.f, 1e-8f, -1e-8f, 0.34657359f, -0.34657359f}) x.push_back(v);
  std::vector<float> y(x.size());
  exp_f32(x.data(), y.data(), static_cast<std::int64_t>(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double exact = std::exp(static_cast<double>(x[i]));
    const double ulp =
        std::nextafter(static_cast<float>(exact), INFINITY) - static_cast<float>(exact);
    ASSERT_LE(std::abs(y[i] - exact), 2 * ulp) << "e^" << x[i];
  }
  const float specials[] = {-88.f,
                            -1000.f,
                            -std::numeric_limits<float>::infinity(),
                            89.f,
                            1e30f,
                            std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  float out[7];
  exp_f32(specials, out, 7);  // 7 lanes: the masked tail only
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], 0.f) << "e^" << specials[i];
  for (int i = 3; i < 6; ++i) EXPECT_EQ(out[i], INFINITY) << "e^" << specials[i];
  EXPECT_TRUE(std::isnan(out[6]));
  // Every length up to two vectors and a tail writes exactly n values.
  for (std::int64_t n = 0; n <= 17; ++n) {
    std::vector<float> in(20, 0.5f), got(20, -1.f);
    exp_f32(in.data(), got.data(), n);
    for (std::int64_t i = 0; i < 20; ++i) {
      if (i < n) {
        EXPECT_NEAR(got[i], std::exp(0.5), 1e-6) << "n " << n << ", element " << i;
      } else {
        EXPECT_EQ(got[i], -1.f) << "n " << n << ", element " << i;
      }
    }
  }
}

}  // namespace
}  // namespace dagrad
