// Known answers for the indexing ops (concat, split, slice, pad, squeeze/unsqueeze/flatten,
// one_hot, argmax), their run-time and build-time errors, and the refusal of grad() through
// the ops without a gradient. Gradchecks, oneDNN-vs-reference and error samples are covered
// for every op by test_registry.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "dagrad.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

std::vector<double> iota_values(int n) {
  std::vector<double> values;
  for (int i = 0; i < n; ++i) values.push_back(i);
  return values;
}

// Runs `out` with the reference kernels and with oneDNN, checks both agree, and returns
// the values.
std::vector<double> evaluate(Graph& graph, const Value& out, const Feeds& feeds = {}) {
  Plan reference = compile(graph, {out}, {.backend = Backend::reference});
  Plan onednn = compile(graph, {out});
  const Tensor expected = reference.run(feeds)[0].clone();
  const Tensor actual = onednn.run(feeds)[0];
  EXPECT_EQ(expected.desc(), actual.desc());
  EXPECT_EQ(expected.to_doubles(), actual.to_doubles()) << "oneDNN and reference kernels differ";
  return expected.to_doubles();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(Concat, JoinsInputsAlongTheAxis) {
  Graph g;
  Value a = g.constant(Tensor::from({1, 2, 3, 4}, {2, 2}));
  Value b = g.constant(Tensor::from({5, 6}, {2, 1}));
  Value c = g.constant(Tensor::from({7, 8}, {1, 2}));
  Value columns = concat({a, b}, 1);
  EXPECT_EQ(columns.shape(), Shape({2, 3}));
  EXPECT_EQ(evaluate(g, columns), (std::vector<double>{1, 2, 5, 3, 4, 6}));
  Value rows = concat({a, c}, -2);
  EXPECT_EQ(rows.shape(), Shape({3, 2}));
  EXPECT_EQ(evaluate(g, rows), (std::vector<double>{1, 2, 3, 4, 7, 8}));
}

TEST(Concat, JoinsIntegers) {
  Graph g;
  Value a = g.constant(Tensor::from({1, -2}, {2}, DType::i32));
  Value b = g.constant(Tensor::from({3}, {1}, DType::i32));
  Value joined = concat({a, b, a}, 0);
  EXPECT_EQ(joined.dtype(), DType::i32);
  EXPECT_EQ(evaluate(g, joined), (std::vector<double>{1, -2, 3, 1, -2}));
}

TEST(Concat, AcceptsAnEmptyPiece) {
  Graph g;
  Value empty = g.constant(Tensor(Shape({2, 0}), DType::f32));
  Value b = g.constant(Tensor::from({1, 2, 3, 4}, {2, 2}));
  Value joined = concat({empty, b}, 1);
  EXPECT_EQ(joined.shape(), Shape({2, 2}));
  EXPECT_EQ(evaluate(g, joined), (std::vector<double>{1, 2, 3, 4}));
}

TEST(Concat, MismatchedShapesNameBoth) {
  Graph g;
  Value a = g.input("a", {2, 3});
  Value b = g.input("b", {3, 3});
  try {
    concat({a, b}, 1);
    FAIL() << "concat accepted [2,3] and [3,3] on axis 1";
  } catch (const ShapeError& e) {
    EXPECT_TRUE(contains(e.what(), "concat")) << e.what();
    EXPECT_TRUE(contains(e.what(), "f32[2,3]")) << e.what();
    EXPECT_TRUE(contains(e.what(), "f32[3,3]")) << e.what();
  }
}

TEST(Split, PiecesHaveTheGivenSizesAndConcatRestoresTheInput) {
  Graph g;
  Value x = g.constant(Tensor::from(iota_values(12), {3, 4}));
  std::vector<Value> pieces = split(x, {1, 3}, 1);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].shape(), Shape({3, 1}));
  EXPECT_EQ(pieces[1].shape(), Shape({3, 3}));
  EXPECT_EQ(evaluate(g, pieces[0]), (std::vector<double>{0, 4, 8}));
  EXPECT_EQ(evaluate(g, pieces[1]), (std::vector<double>{1, 2, 3, 5, 6, 7, 9, 10, 11}));
  EXPECT_EQ(evaluate(g, concat(pieces, 1)), iota_values(12));
}

TEST(Split, SizesMustSumToTheAxisLength) {
  Graph g;
  Value x = g.input("x", {5, 2});
  try {
    split(x, {2, 2}, 0);
    FAIL() << "split accepted sizes summing to 4 for an axis of length 5";
  } catch (const ShapeError& e) {
    EXPECT_TRUE(contains(e.what(), "split")) << e.what();
    EXPECT_TRUE(contains(e.what(), "sum to 4")) << e.what();
    EXPECT_TRUE(contains(e.what(), "length 5")) << e.what();
  }
}

TEST(Split, GradientIsZeroForPiecesOffTheLoss) {
  Graph g;
  Value x = g.input("x", {4}, DType::f64);
  std::vector<Value> pieces = split(x, {1, 3}, 0);
  Value loss = sum(mul(pieces[1], g.constant(Tensor::from({2, 3, 4}, {3}, DType::f64))));
  Value dx = grad(loss, {x})[0];
  Plan plan = compile(g, {dx});
  auto out = plan.run({{x, Tensor::from({9, 9, 9, 9}, {4}, DType::f64)}});
  EXPECT_EQ(out[0].to_doubles(), (std::vector<double>{0, 2, 3, 4}));
}

TEST(Slice, NegativeIndicesAndSteps) {
  Graph g;
  Value x = g.constant(Tensor::from(iota_values(30), {5, 6}));
  // Rows 1 and 3 (start -4 = 1), columns 1 and 3 (end -1 = 5).
  Value strided = slice(x, {-4, 1}, {slice_to_end, -1}, {2, 2});
  EXPECT_EQ(strided.shape(), Shape({2, 2}));
  EXPECT_EQ(evaluate(g, strided), (std::vector<double>{7, 9, 19, 21}));
  // Only the leading axis listed: the others are taken whole.
  EXPECT_EQ(evaluate(g, slice(x, {1}, {2})), (std::vector<double>{6, 7, 8, 9, 10, 11}));

  Value v = g.constant(Tensor::from(iota_values(6), {6}));
  EXPECT_EQ(evaluate(g, slice(v, {-1}, {-4}, {-1})), (std::vector<double>{5, 4, 3}));
  EXPECT_EQ(evaluate(g, slice(v, {-1}, {slice_to_end}, {-2})), (std::vector<double>{5, 3, 1}));
  EXPECT_EQ(evaluate(g, slice(v, {1}, {6}, {4})), (std::vector<double>{1, 5}));
}

TEST(Slice, OutOfRangeAndEmptySlicesAreRefused) {
  Graph g;
  Value x = g.input("x", {4, 3});
  auto message = [&](auto&& build) -> std::string {
    try {
      build();
    } catch (const ShapeError& e) {
      return e.what();
    }
    return "(no error)";
  };
  const std::string start = message([&] { slice(x, {4}, {slice_to_end}); });
  EXPECT_TRUE(contains(start, "slice")) << start;
  EXPECT_TRUE(contains(start, "start 4 is out of range for axis 0 of size 4")) << start;
  const std::string end = message([&] { slice(x, {0, 0}, {4, -5}); });
  EXPECT_TRUE(contains(end, "end -5 is out of range for axis 1 of size 3")) << end;
  const std::string empty = message([&] { slice(x, {2}, {2}); });
  EXPECT_TRUE(contains(empty, "selects no element")) << empty;
}

TEST(Slice, GradientScattersIntoZeros) {
  Graph g;
  Value x = g.input("x", {5, 6});
  Value w = g.constant(Tensor::from({1, 2, 3, 4}, {2, 2}));
  Value loss = sum(mul(slice(x, {-4, 1}, {slice_to_end, -1}, {2, 2}), w));
  Value dx = grad(loss, {x})[0];
  std::vector<double> expected(30, 0.0);
  expected[1 * 6 + 1] = 1;
  expected[1 * 6 + 3] = 2;
  expected[3 * 6 + 1] = 3;
  expected[3 * 6 + 3] = 4;
  EXPECT_EQ(evaluate(g, dx, {{x, Tensor::full({5, 6}, 0.5)}}), expected);
}

TEST(Pad, SurroundsTheInputWithTheValue) {
  Graph g;
  Value x = g.constant(Tensor::from({1, 2, 3, 4}, {2, 2}));
  Value padded = pad(x, {1, 0}, {0, 1}, 9.0);
  EXPECT_EQ(padded.shape(), Shape({3, 3}));
  EXPECT_EQ(evaluate(g, padded), (std::vector<double>{9, 9, 9, 1, 2, 9, 3, 4, 9}));
  EXPECT_EQ(evaluate(g, pad(x, {0, 2}, {0, 0})), (std::vector<double>{0, 0, 1, 2, 0, 0, 3, 4}));
}

TEST(Pad, GradientIsTheWindowOfTheInput) {
  Graph g;
  Value x = g.input("x", {2});
  Value w = g.constant(Tensor::from({10, 20, 30, 40}, {4}));
  Value dx = grad(sum(mul(pad(x, {1}, {1}, 5.0), w)), {x})[0];
  EXPECT_EQ(evaluate(g, dx, {{x, Tensor::from({1, 2}, {2})}}), (std::vector<double>{20, 30}));
}

// concat's, pad's and slice's gradients on an input declared batch_dynamic: one plan runs at
// the declared batch and at two others (the Trainer's short last batch), against the same graph
// declared at each. Their backward graphs used to hold the declared batch size (slices ending
// there, slice_grad's shape), so any other size was refused.
TEST(Concat, PadAndSliceGradientsFollowTheBatchSize) {
  testing::expect_follows_the_batch([](std::int64_t batch, bool dynamic) {
    auto b = std::make_unique<testing::BatchGraph>();
    Graph& g = b->graph;
    Value x = g.input("x", {batch, 3}, DType::f32, dynamic);
    Value w = g.parameter("w", Tensor::from({0.5, -1, 0.25, 2, 1.5, -0.75}, {3, 2}));
    Value joined = concat({matmul(x, w), x * 2.0}, 1);
    Value padded = pad(joined, {0, 1}, {0, 2}, 0.5);
    Value sliced = slice(padded, {0, 2}, {slice_to_end, -1});
    // Steps other than 1 on the feature axis: slice_grad sizes the batch axis from dy.
    Value strided = slice(padded, {0, 1}, {slice_to_end, slice_to_end}, {1, 3});
    Value reversed = slice(joined, {0, -1}, {slice_to_end, slice_to_end}, {1, -2});
    Value loss = sum(padded * padded * g.scalar(0.5)) + sum(joined) + sum(sliced * sliced) +
                 sum(strided * strided * strided) + sum(reversed * g.scalar(3.0));
    b->batched = {x};
    b->outputs = grad(loss, {x, w});
    b->outputs.push_back(loss);
    return b;
  });
}

// Gradients that need the batch size of a value, not only of dy: a concat along the batch axis
// (split_as sizes the pieces by the inputs) and a slice of the batch axis that is not whole
// (slice_grad shaped like x). Both used to keep the declared batch size, and a plan refused any
// other one with an Error.
TEST(Concat, AlongTheBatchAxisFollowsTheBatchSize) {
  for (int which : {0, 1, 2}) {
    SCOPED_TRACE(which);
    testing::expect_follows_the_batch([which](std::int64_t batch, bool dynamic) {
      auto b = std::make_unique<testing::BatchGraph>();
      Graph& g = b->graph;
      Value x = g.input("x", {batch, 3}, DType::f32, dynamic);
      Value c = g.input("c", {2, 2});  // a piece that keeps its size
      Value w = g.parameter("w", Tensor::from({0.5, -1, 0.25, 2, 1.5, -0.75}, {3, 2}));
      Value y = matmul(x, w);
      Value z = which == 0   ? concat({y, tanh(y) * 2.0, c}, 0)
                : which == 1 ? slice(y, {1}, {slice_to_end}, {2})
                             : slice(concat({c, y}, 0), {-2, 1}, {0, slice_to_end}, {-2, 1});
      b->batched = {x};
      b->fixed = {{c, Tensor::from({0.3, -0.2, 0.7, 0.1}, {2, 2})}};
      b->outputs = grad(sum(z * z * z), {x, w, c});
      return b;
    });
  }
}

// A plan whose shapes cannot follow another batch size says which feeds differ and how.
TEST(Plan, ShapeErrorAtAnotherBatchNamesTheFeeds) {
  Graph g;
  Value x = g.input("x", {4, 3}, DType::f32, /*batch_dynamic=*/true);
  // Reshaping to a fixed [2, 6] holds only 12 elements.
  Plan plan = compile(g, {reshape(x, Shape{2, 6}) * 2.0});
  std::vector<double> values(12, 1.0);
  EXPECT_EQ(plan.run({{x, Tensor::from(values, {4, 3})}})[0].shape(), (Shape{2, 6}));
  values.resize(6);
  try {
    plan.run({{x, Tensor::from(values, {2, 3})}});
    FAIL() << "a plan reshaped 6 elements to [2, 6]";
  } catch (const ShapeError& e) {
    const std::string message = e.what();
    EXPECT_TRUE(contains(message, "reshape")) << message;
    EXPECT_TRUE(contains(message, "for the feeds \"x\" [2,3] (declared [4,3])")) << message;
  }
}

TEST(ReshapeWrappers, SqueezeUnsqueezeAndFlatten) {
  Graph g;
  Value x = g.constant(Tensor::from(iota_values(6), {2, 1, 3, 1}));
  EXPECT_EQ(squeeze(x).shape(), Shape({2, 3}));
  EXPECT_EQ(squeeze(x, {-1}).shape(), Shape({2, 1, 3}));
  EXPECT_EQ(unsqueeze(squeeze(x), {0, -1}).shape(), Shape({1, 2, 3, 1}));
  EXPECT_EQ(flatten(x).shape(), Shape({2, 3}));
  EXPECT_EQ(flatten(x, 0).shape(), Shape({6}));
  EXPECT_EQ(flatten(x, 2).shape(), Shape({2, 1, 3}));
  EXPECT_EQ(squeeze(x).node().op, "reshape");
  EXPECT_EQ(evaluate(g, flatten(x, 0)), iota_values(6));
  try {
    squeeze(x, {0});
    FAIL() << "squeeze removed an axis of size 2";
  } catch (const ShapeError& e) {
    EXPECT_TRUE(contains(e.what(), "squeeze")) << e.what();
    EXPECT_TRUE(contains(e.what(), "has size 2")) << e.what();
  }
  EXPECT_THROW(unsqueeze(x, {5}), ShapeError);
}

TEST(OneHot, EncodesEachLabelAsARow) {
  Graph g;
  Value labels = g.constant(Tensor::from({2, 0, 1, 2}, {4}, DType::i32));
  Value encoded = one_hot(labels, 3);
  EXPECT_EQ(encoded.desc(), (TensorDesc{DType::f32, Shape({4, 3})}));
  EXPECT_EQ(evaluate(g, encoded), (std::vector<double>{0, 0, 1,  //
                                                       1, 0, 0,  //
                                                       0, 1, 0,  //
                                                       0, 0, 1}));
  EXPECT_EQ(one_hot(labels, 3, DType::f64).dtype(), DType::f64);
}

TEST(OneHot, OutOfRangeLabelIsARunTimeErrorNamingLabelAndPosition) {
  Graph g;
  Value labels = g.input("labels", {2, 2}, DType::i32);
  Value encoded = one_hot(labels, 3);
  for (Backend backend : {Backend::reference, Backend::onednn}) {
    Plan plan = compile(g, {encoded}, {.backend = backend});
    try {
      plan.run({{labels, Tensor::from({0, 1, 2, 7}, {2, 2}, DType::i32)}});
      FAIL() << "one_hot accepted label 7 with 3 classes";
    } catch (const Error& e) {
      EXPECT_TRUE(contains(e.what(), "one_hot")) << e.what();
      EXPECT_TRUE(contains(e.what(), "label 7 at position [1,1]")) << e.what();
      EXPECT_TRUE(contains(e.what(), "[0, 3)")) << e.what();
    }
  }
}

TEST(Argmax, TiesGoToTheFirstIndex) {
  Graph g;
  Value x = g.constant(Tensor::from({1, 3, 3,  //
                                     2, 2, 1,  //
                                     0, 5, -1},
                                    {3, 3}));
  Value rows = argmax(x, 1);
  EXPECT_EQ(rows.desc(), (TensorDesc{DType::i32, Shape({3})}));
  EXPECT_EQ(evaluate(g, rows), (std::vector<double>{1, 0, 1}));
  Value columns = argmax(x, 0, /*keepdims=*/true);
  EXPECT_EQ(columns.shape(), Shape({1, 3}));
  EXPECT_EQ(evaluate(g, columns), (std::vector<double>{1, 2, 0}));
}

TEST(Argmax, NaNCountsAsTheLargest) {
  Graph g;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Value x = g.constant(Tensor::from({1, nan, 7, nan}, {4}));
  EXPECT_EQ(evaluate(g, argmax(x, 0)), (std::vector<double>{1}));
}

TEST(NoGradient, ArgmaxAndOneHotRefuseGradByName) {
  Graph g;
  Value x = g.input("x", {2, 3});
  Value w = g.constant(Tensor::from({1, 2, 3, 4, 5, 6}, {2, 3}));
  Value loss = sum(mul(one_hot(argmax(x, 1), 3), w));
  try {
    grad(loss, {x});
    FAIL() << "grad() went through argmax and one_hot";
  } catch (const GraphError& e) {
    EXPECT_TRUE(contains(e.what(), "one_hot")) << e.what();
    EXPECT_TRUE(contains(e.what(), "labels are integers")) << e.what();
    EXPECT_TRUE(contains(e.what(), "argmax")) << e.what();
    EXPECT_TRUE(contains(e.what(), "integer indices")) << e.what();
  }
  // Stopping the gradient explicitly makes it a constant: the gradient is then zero.
  Value stopped = sum(mul(stop_gradient(one_hot(argmax(x, 1), 3)), w));
  Value dx = grad(stopped, {x})[0];
  EXPECT_EQ(evaluate(g, dx, {{x, Tensor::full({2, 3}, 1.0)}}), std::vector<double>(6, 0.0));
}

}  // namespace
}  // namespace dagrad
