// Losses: known answers, reductions and weights, clamping, stability for large logits,
// gradients against central differences, and the out-of-range label error.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "dagrad.hpp"

namespace dagrad {
namespace {

// The course's example: three examples, three classes.
const std::vector<double> one_hot_targets{0, 0, 1, 0, 1, 0, 1, 0, 0};
const std::vector<int> target_labels{2, 1, 0};
const std::vector<double> worse_predictions{0.3, 0.3, 0.4, 0.3, 0.4, 0.3, 0.1, 0.2, 0.7};
const std::vector<double> better_predictions{0.1, 0.2, 0.7, 0.1, 0.7, 0.2, 0.3, 0.4, 0.3};

Tensor tensor(const std::vector<double>& values, Shape shape, DType dtype = DType::f32) {
  return Tensor::from(std::span<const double>(values), std::move(shape), dtype);
}

Tensor label_tensor(const std::vector<int>& values) {
  std::vector<std::int32_t> ints(values.begin(), values.end());
  return Tensor::from_ints(ints, Shape{static_cast<std::int64_t>(ints.size())});
}

std::vector<double> logs(const std::vector<double>& values) {
  std::vector<double> out;
  for (double v : values) out.push_back(std::log(v));
  return out;
}

std::vector<double> run(Graph& g, const Value& output, const Feeds& feeds,
                        Backend backend = Backend::onednn) {
  Plan plan = compile(g, {output}, {.backend = backend});
  return plan.run(feeds)[0].to_doubles();
}

double run_scalar(Graph& g, const Value& output, const Feeds& feeds,
                  Backend backend = Backend::onednn) {
  Plan plan = compile(g, {output}, {.backend = backend});
  return plan.run(feeds)[0].item();
}

// ---- the course's cross-entropy example ----------------------------------------------------

struct CrossEntropyCase {
  std::vector<double> predictions;
  double cross_entropy;
};

class CourseExample : public ::testing::TestWithParam<CrossEntropyCase> {};

TEST_P(CourseExample, CrossEntropyOnProbabilitiesMatchesKnownValue) {
  Graph g;
  Value p = g.input("p", {3, 3});
  Value t = g.input("t", {3, 3});
  double value = run_scalar(
      g, cross_entropy(p, t),
      {{p, tensor(GetParam().predictions, {3, 3})}, {t, tensor(one_hot_targets, {3, 3})}});
  EXPECT_NEAR(value, GetParam().cross_entropy, 1e-3);
}

TEST_P(CourseExample, SparseCrossEntropyOnLogLogitsMatchesKnownValue) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value z = g.input("z", {3, 3});
    Value labels = g.input("labels", {3}, DType::i32);
    double value = run_scalar(
        g, sparse_cross_entropy(z, labels),
        {{z, tensor(logs(GetParam().predictions), {3, 3})}, {labels, label_tensor(target_labels)}},
        backend);
    EXPECT_NEAR(value, GetParam().cross_entropy, 1e-3);
  }
}

TEST_P(CourseExample, CrossEntropyWithLogitsMatchesKnownValue) {
  Graph g;
  Value z = g.input("z", {3, 3});
  Value t = g.input("t", {3, 3});
  double value = run_scalar(
      g, cross_entropy_with_logits(z, t),
      {{z, tensor(logs(GetParam().predictions), {3, 3})}, {t, tensor(one_hot_targets, {3, 3})}});
  EXPECT_NEAR(value, GetParam().cross_entropy, 1e-3);
}

TEST_P(CourseExample, ClassificationErrorIsOneThirdWithLabelsAndOneHot) {
  Graph g;
  Value p = g.input("p", {3, 3});
  Value t = g.input("t", {3, 3});
  Value labels = g.input("labels", {3}, DType::i32);
  Feeds feeds{{p, tensor(GetParam().predictions, {3, 3})},
              {t, tensor(one_hot_targets, {3, 3})},
              {labels, label_tensor(target_labels)}};
  EXPECT_NEAR(run_scalar(g, classification_error(p, labels), feeds), 1.0 / 3.0, 1e-7);
  EXPECT_NEAR(run_scalar(g, classification_error(p, t), feeds), 1.0 / 3.0, 1e-7);
}

INSTANTIATE_TEST_SUITE_P(Losses, CourseExample,
                         ::testing::Values(CrossEntropyCase{worse_predictions, 1.378},
                                           CrossEntropyCase{better_predictions, 0.639}));

TEST(ClassificationError, CountsEveryWrongRowAndBreaksTiesTowardTheLowestClass) {
  Graph g;
  Value scores = g.input("scores", {4, 2});
  Value labels = g.input("labels", {4}, DType::i32);
  // argmax: 0, 1, 0 (tie), 1 -> against labels 1, 1, 1, 1: rows 0 and 2 are wrong.
  double value = run_scalar(g, classification_error(scores, labels),
                            {{scores, tensor({0.9, 0.1, 0.2, 0.8, 0.5, 0.5, -1, 3}, {4, 2})},
                             {labels, label_tensor({1, 1, 1, 1})}});
  EXPECT_DOUBLE_EQ(value, 0.5);
}

// ---- regression losses ---------------------------------------------------------------------

struct RegressionFixture : ::testing::Test {
  Graph g;
  Value y = g.input("y", {2, 2});
  Value t = g.input("t", {2, 2});
  Value w = g.input("w", {2});
  // Differences 0, 2, -3, 0: squares 0, 4, 9, 0; absolute values 0, 2, 3, 0.
  Feeds feeds{{y, tensor({1, 2, 3, 4}, {2, 2})},
              {t, tensor({1, 0, 6, 4}, {2, 2})},
              {w, tensor({1, 3}, {2})}};
};

TEST_F(RegressionFixture, MseIsTheMeanOfSquaredDifferences) {
  EXPECT_NEAR(run_scalar(g, mse(y, t), feeds), 13.0 / 4.0, 1e-6);
}

TEST_F(RegressionFixture, SumOfSquaresIsHalfTheSumOfSquaredDifferences) {
  EXPECT_NEAR(run_scalar(g, sum_of_squares(y, t), feeds), 6.5, 1e-6);
  EXPECT_NEAR(run_scalar(g, sum_of_squares(y, t, Reduction::mean), feeds), 6.5 / 2.0, 1e-6);
}

TEST_F(RegressionFixture, MaeIsTheMeanOfAbsoluteDifferences) {
  EXPECT_NEAR(run_scalar(g, mae(y, t), feeds), 5.0 / 4.0, 1e-6);
}

TEST_F(RegressionFixture, ReductionNoneGivesOneValuePerExample) {
  auto values = run(g, mse(y, t, Reduction::none), feeds);
  ASSERT_EQ(values.size(), 2u);
  EXPECT_NEAR(values[0], 2.0, 1e-6);  // (0 + 4) / 2
  EXPECT_NEAR(values[1], 4.5, 1e-6);  // (9 + 0) / 2
  auto weighted = run(g, mse(y, t, Reduction::none, w), feeds);
  EXPECT_NEAR(weighted[0], 2.0, 1e-6);
  EXPECT_NEAR(weighted[1], 13.5, 1e-6);
}

TEST_F(RegressionFixture, ReductionSumAddsPerExampleValues) {
  EXPECT_NEAR(run_scalar(g, mse(y, t, Reduction::sum), feeds), 6.5, 1e-6);
  EXPECT_NEAR(run_scalar(g, mse(y, t, Reduction::sum, w), feeds), 2.0 + 13.5, 1e-6);
}

TEST_F(RegressionFixture, WeightedMeanDividesByTheSumOfWeights) {
  // (1·2 + 3·4.5) / (1 + 3)
  EXPECT_NEAR(run_scalar(g, mse(y, t, Reduction::mean, w), feeds), 15.5 / 4.0, 1e-6);
  EXPECT_NEAR(run_scalar(g, mae(y, t, Reduction::mean, w), feeds), (1 * 1.0 + 3 * 1.5) / 4.0, 1e-6);
}

TEST_F(RegressionFixture, WeightsOfTheWrongShapeAreRefusedAtBuildTime) {
  Value bad = g.input("bad", {3});
  try {
    mse(y, t, Reduction::mean, bad);
    FAIL() << "mse accepted weights [3] for 2 examples";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("mse"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[3]"), std::string::npos) << e.what();
  }
}

TEST_F(RegressionFixture, PredictionAndTargetOfDifferentShapesAreRefused) {
  Value other = g.input("other", {2, 3});
  EXPECT_THROW(mse(y, other), ShapeError);
  EXPECT_THROW(cross_entropy(y, other), ShapeError);
}

// ---- binary cross-entropy ------------------------------------------------------------------

TEST(BinaryCrossEntropy, OnProbabilitiesMatchesKnownValue) {
  Graph g;
  Value p = g.input("p", {2});
  Value t = g.input("t", {2});
  double value = run_scalar(g, binary_cross_entropy(p, t),
                            {{p, tensor({0.9, 0.2}, {2})}, {t, tensor({1, 0}, {2})}});
  EXPECT_NEAR(value, -(std::log(0.9) + std::log(0.8)) / 2.0, 1e-5);  // f32
}

TEST(BinaryCrossEntropy, ClampsProbabilitiesSoZeroAndNegativeGiveFiniteValues) {
  Graph g;
  Value p = g.input("p", {3});
  Value t = g.input("t", {3});
  auto values = run(g, binary_cross_entropy(p, t, Reduction::none),
                    {{p, tensor({0.0, 1.0, -0.5}, {3})}, {t, tensor({1, 0, 0}, {3})}});
  const double clamped = -std::log(probability_epsilon);  // 16.118...
  EXPECT_NEAR(values[0], clamped, 1e-3);
  EXPECT_NEAR(values[1], clamped, 1e-3);
  EXPECT_NEAR(values[2], 0.0, 1e-5);  // log(clip(1.5)) = log 1 (f32)
}

TEST(CrossEntropy, ClampsAZeroProbabilityOfTheTargetClass) {
  Graph g;
  Value p = g.input("p", {1, 2});
  Value t = g.input("t", {1, 2});
  double value = run_scalar(g, cross_entropy(p, t),
                            {{p, tensor({0.0, 1.0}, {1, 2})}, {t, tensor({1, 0}, {1, 2})}});
  EXPECT_TRUE(std::isfinite(value));
  EXPECT_NEAR(value, -std::log(probability_epsilon), 1e-3);
}

TEST(BinaryCrossEntropyWithLogits, IsFiniteAndExactForLogitsOfMagnitude100) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value z = g.input("z", {4});
    Value t = g.input("t", {4});
    Feeds feeds{{z, tensor({100, 100, -100, -100}, {4})}, {t, tensor({1, 0, 0, 1}, {4})}};
    auto values = run(g, binary_cross_entropy_with_logits(z, t, Reduction::none), feeds, backend);
    // max(z, 0) − z·t + log(1 + e^−100): 0, 100, 0, 100 (plus e^−100 ≈ 4e−44).
    const std::vector<double> expected{0, 100, 0, 100};
    for (std::size_t i = 0; i < 4; ++i) {
      EXPECT_TRUE(std::isfinite(values[i]));
      EXPECT_NEAR(values[i], expected[i], 1e-5) << i;
    }
    EXPECT_NEAR(run_scalar(g, binary_cross_entropy_with_logits(z, t), feeds, backend), 50.0, 1e-5);
  }
}

TEST(BinaryCrossEntropyWithLogits, AgreesWithTheProbabilityFormForModerateLogits) {
  Graph g;
  Value z = g.input("z", {3});
  Value t = g.input("t", {3});
  Feeds feeds{{z, tensor({-2, 0.5, 3}, {3})}, {t, tensor({0, 1, 0.25}, {3})}};
  double with_logits = run_scalar(g, binary_cross_entropy_with_logits(z, t), feeds);
  double with_probabilities = run_scalar(g, binary_cross_entropy(sigmoid(z), t), feeds);
  EXPECT_NEAR(with_logits, with_probabilities, 1e-5);
}

TEST(BinaryCrossEntropyWithLogits, GradientAtZeroLogitIsSigmoidMinusTarget) {
  Graph g;
  Value z = g.input("z", {2}, DType::f64);
  Value t = g.input("t", {2}, DType::f64);
  Value loss = binary_cross_entropy_with_logits(z, t, Reduction::sum);
  Value dz = grad(loss, {z})[0];
  auto values =
      run(g, dz, {{z, tensor({0, 0}, {2}, DType::f64)}, {t, tensor({1, 0.25}, {2}, DType::f64)}});
  EXPECT_NEAR(values[0], 0.5 - 1.0, 1e-12);
  EXPECT_NEAR(values[1], 0.5 - 0.25, 1e-12);
}

// ---- sparse cross-entropy errors -----------------------------------------------------------

TEST(SparseCrossEntropy, LabelOutOfRangeRaisesAtRunTimeNamingLabelAndPosition) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value z = g.input("z", {3, 3});
    Value labels = g.input("labels", {3}, DType::i32);
    Value loss = sparse_cross_entropy(z, labels);
    Feeds feeds{{z, Tensor::full({3, 3}, 0.5)}, {labels, label_tensor({0, 3, 1})}};
    try {
      run_scalar(g, loss, feeds, backend);
      FAIL() << "label 3 of 3 classes was accepted";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find("label 3 at position 1"), std::string::npos) << message;
      EXPECT_NE(message.find("[0, 3)"), std::string::npos) << message;
    }
    // Negative labels too.
    Feeds negative{{z, Tensor::full({3, 3}, 0.5)}, {labels, label_tensor({0, 1, -2})}};
    EXPECT_THROW(run_scalar(g, loss, negative, backend), Error);
  }
}

TEST(SparseCrossEntropy, GradientOfAnOutOfRangeLabelRaisesToo) {
  Graph g;
  Value z = g.input("z", {2, 3});
  Value labels = g.input("labels", {2}, DType::i32);
  Value dz = grad(sparse_cross_entropy(z, labels), {z})[0];
  Feeds feeds{{z, Tensor::full({2, 3}, 0.5)}, {labels, label_tensor({7, 0})}};
  try {
    run(g, dz, feeds);
    FAIL() << "label 7 of 3 classes was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("label 7 at position 0"), std::string::npos) << e.what();
  }
}

TEST(SparseCrossEntropy, RefusesFloatLabelsAndTheWrongNumberOfLabelsAtBuildTime) {
  Graph g;
  Value z = g.input("z", {3, 4});
  Value float_labels = g.input("float_labels", {3});
  Value short_labels = g.input("short_labels", {2}, DType::i32);
  for (const Value& labels : {float_labels, short_labels}) {
    try {
      sparse_cross_entropy(z, labels);
      FAIL() << "labels " << labels.desc().str() << " were accepted";
    } catch (const ShapeError& e) {
      EXPECT_NE(std::string(e.what()).find("sparse_cross_entropy"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("i32[3]"), std::string::npos) << e.what();
    }
  }
}

// ---- gradients against central differences (f64, reference kernels) -------------------------

struct GradcheckCase {
  std::string name;
  // Builds the loss from prediction, target and weights inputs of shape [4, 3] / [4].
  std::function<Value(const Value&, const Value&, const Value&)> loss;
  double low, high;  // prediction range
  bool probability_targets;
};

class LossGradient : public ::testing::TestWithParam<GradcheckCase> {};

TEST_P(LossGradient, MatchesCentralDifferences) {
  const GradcheckCase& c = GetParam();
  Graph g;
  Value y = g.input("y", {4, 3}, DType::f64);
  Value t = g.input("t", {4, 3}, DType::f64);
  Value w = g.input("w", {4}, DType::f64);
  // Predictions and targets kept apart (no |y − t| kink for mae).
  std::vector<double> predictions, targets;
  for (int i = 0; i < 12; ++i) {
    predictions.push_back(c.low + (c.high - c.low) * ((i * 7) % 12 + 0.5) / 12.0);
    targets.push_back(c.probability_targets ? (i % 3 == 1 ? 0.7 : 0.15) : 0.05 + 0.1 * (i % 4));
  }
  Value loss = c.loss(y, t, w);
  Feeds feeds{{y, tensor(predictions, {4, 3}, DType::f64)},
              {t, tensor(targets, {4, 3}, DType::f64)},
              {w, tensor({0.5, 1.0, 2.0, 1.5}, {4}, DType::f64)}};
  GradcheckOptions options;
  options.tolerance = 1e-6;
  GradcheckResult result = gradcheck(g, loss, feeds, options);
  EXPECT_TRUE(result.ok) << c.name << ": " << result.report();
  EXPECT_GT(result.elements_checked, 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Losses, LossGradient,
    ::testing::Values(
        GradcheckCase{"mse", [](auto y, auto t, auto w) { return mse(y, t, Reduction::mean, w); },
                      -1, 1, false},
        GradcheckCase{"sum_of_squares", [](auto y, auto t, auto) { return sum_of_squares(y, t); },
                      -1, 1, false},
        GradcheckCase{"mae", [](auto y, auto t, auto w) { return mae(y, t, Reduction::sum, w); },
                      0.51, 1.5, false},
        GradcheckCase{
            "binary_cross_entropy",
            [](auto y, auto t, auto w) { return binary_cross_entropy(y, t, Reduction::mean, w); },
            0.1, 0.9, true},
        GradcheckCase{"binary_cross_entropy_with_logits",
                      [](auto y, auto t, auto) {
                        return binary_cross_entropy_with_logits(y, t, Reduction::none);
                      },
                      -4, 4, true},
        GradcheckCase{"cross_entropy", [](auto y, auto t, auto) { return cross_entropy(y, t); },
                      0.1, 0.9, true},
        GradcheckCase{"cross_entropy_with_logits",
                      [](auto y, auto t, auto w) {
                        return cross_entropy_with_logits(y, t, Reduction::sum, w);
                      },
                      -3, 3, true}),
    [](const auto& info) { return info.param.name; });

TEST(SparseCrossEntropy, GradientMatchesCentralDifferences) {
  Graph g;
  Value z = g.input("z", {4, 3}, DType::f64);
  Value labels = g.input("labels", {4}, DType::i32);
  Value w = g.input("w", {4}, DType::f64);
  Value loss = sparse_cross_entropy(z, labels, Reduction::mean, w);
  Feeds feeds{{z, tensor({0.3, -1.2, 2.0, 0.5, 0.1, -0.4, 1.5, 1.4, -2.0, 0.0, 0.7, -0.9}, {4, 3},
                         DType::f64)},
              {labels, label_tensor({2, 0, 1, 1})},
              {w, tensor({0.5, 1.0, 2.0, 1.5}, {4}, DType::f64)}};
  GradcheckResult result = gradcheck(g, loss, feeds);
  EXPECT_TRUE(result.ok) << result.report();
  GradcheckResult second = gradgradcheck(g, loss, feeds, {.tolerance = 1e-5});
  EXPECT_TRUE(second.ok) << second.report();
}

TEST(SparseCrossEntropy, GradientIsSoftmaxMinusOneHotOverN) {
  Graph g;
  Value z = g.input("z", {2, 3}, DType::f64);
  Value labels = g.input("labels", {2}, DType::i32);
  Value dz = grad(sparse_cross_entropy(z, labels), {z})[0];
  const std::vector<double> logits{1, 2, 3, 0, 0, 0};
  auto values =
      run(g, dz, {{z, tensor(logits, {2, 3}, DType::f64)}, {labels, label_tensor({0, 2})}});
  const double total = std::exp(1) + std::exp(2) + std::exp(3);
  const std::vector<double> expected{(std::exp(1) / total - 1) / 2,
                                     std::exp(2) / total / 2,
                                     std::exp(3) / total / 2,
                                     1.0 / 6,
                                     1.0 / 6,
                                     (1.0 / 3 - 1) / 2};
  for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(values[i], expected[i], 1e-12) << i;
}

// ---- the primitives the losses are built on: known answers and kink choices ----------------

TEST(LossBuildingBlocks, SoftmaxAndLogSoftmaxMatchKnownValuesAndSurviveHugeLogits) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value x = g.input("x", {2, 3});
    Feeds feeds{{x, tensor({1, 2, 3, 1000, 0, -1000}, {2, 3})}};
    auto probabilities = run(g, softmax(x), feeds, backend);
    auto log_probabilities = run(g, log_softmax(x), feeds, backend);
    const double total = std::exp(1) + std::exp(2) + std::exp(3);
    for (int c = 0; c < 3; ++c) {
      EXPECT_NEAR(probabilities[static_cast<std::size_t>(c)], std::exp(c + 1) / total, 1e-6);
      EXPECT_NEAR(log_probabilities[static_cast<std::size_t>(c)], (c + 1) - std::log(total), 1e-5);
    }
    EXPECT_NEAR(probabilities[3], 1.0, 1e-6);
    EXPECT_NEAR(probabilities[5], 0.0, 1e-6);
    EXPECT_NEAR(log_probabilities[3], 0.0, 1e-5);
    EXPECT_NEAR(log_probabilities[4], -1000.0, 1e-2);
  }
}

TEST(LossBuildingBlocks, SoftmaxAlongTheFirstAxisNormalisesColumns) {
  Graph g;
  Value x = g.input("x", {2, 2});
  auto values = run(g, softmax(x, 0), {{x, tensor({0, 5, 0, 5}, {2, 2})}});
  for (double v : values) EXPECT_NEAR(v, 0.5, 1e-6);
}

TEST(LossBuildingBlocks, MatmulMatchesKnownProducts) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value a = g.input("a", {2, 2, 3});
    Value b = g.input("b", {3, 2});
    // Batch 0: [[1,2,3],[4,5,6]]; batch 1: the identity's first two rows.
    Feeds feeds{{a, tensor({1, 2, 3, 4, 5, 6, 1, 0, 0, 0, 1, 0}, {2, 2, 3})},
                {b, tensor({1, 2, 3, 4, 5, 6}, {3, 2})}};
    auto values = run(g, matmul(a, b), feeds, backend);
    const std::vector<double> expected{22, 28, 49, 64, 1, 2, 3, 4};
    ASSERT_EQ(values.size(), expected.size());
    for (std::size_t i = 0; i < expected.size(); ++i)
      EXPECT_NEAR(values[i], expected[i], 1e-5) << i;
  }
}

TEST(LossBuildingBlocks, MatmulGradientOfABroadcastOperandSumsOverTheBatch) {
  Graph g;
  Value a = g.input("a", {2, 1, 2}, DType::f64);
  Value b = g.input("b", {2, 1}, DType::f64);
  Value db = grad(sum(matmul(a, b)), {b})[0];
  auto values = run(
      g, db,
      {{a, tensor({1, 2, 3, 4}, {2, 1, 2}, DType::f64)}, {b, tensor({0, 0}, {2, 1}, DType::f64)}});
  ASSERT_EQ(values.size(), 2u);
  EXPECT_DOUBLE_EQ(values[0], 1 + 3);
  EXPECT_DOUBLE_EQ(values[1], 2 + 4);
}

TEST(LossBuildingBlocks, AbsSignAndClipUseTheDocumentedSubgradients) {
  Graph g;
  Value x = g.input("x", {5}, DType::f64);
  // abs: sign(x), 0 at 0. clip to [-1, 1]: 1 strictly inside, 0 at and beyond the bounds.
  Value d_abs = grad(sum(abs(x)), {x})[0];
  Value d_clip = grad(sum(clip(x, -1, 1)), {x})[0];
  Feeds feeds{{x, tensor({-2, -1, 0, 0.5, 1}, {5}, DType::f64)}};
  const std::vector<double> expected_abs{-1, -1, 0, 1, 1};
  const std::vector<double> expected_clip{0, 0, 1, 1, 0};
  EXPECT_EQ(run(g, d_abs, feeds), expected_abs);
  EXPECT_EQ(run(g, d_clip, feeds), expected_clip);
  const std::vector<double> expected_sign{-1, -1, 0, 1, 1};
  EXPECT_EQ(run(g, sign(x), feeds), expected_sign);
  const std::vector<double> expected_clipped{-1, -1, 0, 0.5, 1};
  EXPECT_EQ(run(g, clip(x, -1, 1), feeds), expected_clipped);
}

}  // namespace
}  // namespace dagrad
