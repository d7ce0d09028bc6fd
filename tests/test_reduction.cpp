// sum and mean: the fast f32 kernels (a total in chunks, bias gradients over N,H,W, row and
// column sums) against the reference kernel (double accumulation) on shapes larger than the
// registry samples, so every chunk and tail of the loops runs; and the same total whatever the
// thread count.
#include <gtest/gtest.h>

#include "dagrad.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

Tensor random_tensor(Shape shape, std::uint64_t seed) {
  return testing::uniform_tensor(std::move(shape), seed);
}

struct ReductionCase {
  Shape shape;
  std::vector<std::int64_t> axes;  // empty: all
};

TEST(Reduction, FastKernelsMatchTheReferenceOnLargeShapes) {
  const std::vector<ReductionCase> cases{
      {{70001}, {}},                // a total over 4 full chunks and a tail
      {{3, 50000}, {}},             // a total over a matrix
      {{64, 32, 7, 7}, {0, 2, 3}},  // a convolution's bias gradient
      {{300, 257}, {0}},            // a dense layer's bias gradient (column sums)
      {{300, 257}, {1}},            // row sums
      {{5, 300, 7}, {1}},           // a middle axis
  };
  std::uint64_t seed = 1;
  for (const ReductionCase& c : cases) {
    for (bool average : {false, true}) {
      Graph g;
      Value x = g.input("x", c.shape);
      Value y = average ? mean(x, c.axes) : sum(x, c.axes);
      const Feeds feeds{{x, random_tensor(c.shape, seed++)}};
      Plan fast = compile(g, {y});
      Plan reference = compile(g, {y}, {.backend = Backend::reference});
      EXPECT_EQ(fast.num_onednn_steps(), 1u) << c.shape.str();
      const std::vector<double> actual = fast.run(feeds)[0].to_doubles();
      const std::vector<double> expected = reference.run(feeds)[0].to_doubles();
      ASSERT_EQ(actual.size(), expected.size());
      for (std::size_t i = 0; i < expected.size(); ++i) {
        EXPECT_NEAR(actual[i], expected[i], 1e-4 * (1 + std::abs(expected[i])))
            << (average ? "mean" : "sum") << " of " << c.shape.str() << " element " << i;
      }
    }
  }
}

TEST(Reduction, ATotalDoesNotDependOnTheThreadCount) {
  Graph g;
  Value x = g.input("x", {100003});
  Value y = sum(x);
  const Feeds feeds{{x, random_tensor({100003}, 9)}};
  Plan plan = compile(g, {y});
  const int saved = num_threads();
  set_num_threads(1);
  const double one = plan.run(feeds)[0].item();
  set_num_threads(2);
  const double two = plan.run(feeds)[0].item();
  set_num_threads(saved);
  EXPECT_EQ(one, two);
}

// A plan whose input is batch_dynamic, run at other batch sizes, must give the gradients of the
// same graph declared at that batch. mean's gradient divided by the declared count, so at a
// batch of 2 (declared 4) every gradient through a mean over the batch was half what it should
// be, in every backend alike (the reference backend runs the same gradient graph, so comparing
// against it could not show it). Means over all axes, over the batch, over features only, and
// the losses that average over examples (sparse cross-entropy, fused into dagrad's kernels, and
// mean squared error).
TEST(Reduction, MeanGradientsFollowTheBatchSize) {
  for (int which = 0; which < 6; ++which) {
    SCOPED_TRACE(which);
    testing::expect_follows_the_batch([which](std::int64_t batch, bool dynamic) {
      auto b = std::make_unique<testing::BatchGraph>();
      Graph& g = b->graph;
      Value x = g.input("x", {batch, 3}, DType::f32, dynamic);
      Value labels = g.input("labels", {batch}, DType::i32, dynamic);
      Value w = g.parameter("w", Tensor::from({0.5, -1, 0.25, 2, 1.5, -0.75}, {3, 2}));
      Value h = matmul(x, w);
      Value loss;
      switch (which) {
        case 0:
          loss = mean(h * h);
          break;
        case 1:
          loss = sum(mean(h * h, {0}));
          break;
        case 2:
          loss = sum(mean(h * h, {-1}));
          break;
        case 3:
          loss = sum(mean(h * h, {0, 1}, /*keepdims=*/true));
          break;
        case 4:
          loss = sparse_cross_entropy(h, labels);
          break;
        default:
          loss = mse(h, h * 0.5 + 1.0);
          break;
      }
      b->batched = {x, labels};
      b->outputs = grad(loss, {x, w});
      b->outputs.push_back(loss);
      return b;
    });
  }
}

}  // namespace
}  // namespace dagrad
