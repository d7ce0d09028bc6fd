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

}  // namespace
}  // namespace dagrad
