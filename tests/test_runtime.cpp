// Plan: feeds are validated before computing, results match known values, memory is reused
// by lifetime, primitives are created once, batch sizes can change.
#include <gtest/gtest.h>

#include "dagrad.hpp"
#include "registry_support.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {
namespace {

TEST(Plan, ComputesKnownValues) {
  Graph g;
  Value x = g.input("x", {2, 2});
  Value y = g.input("y", {2});
  Value z = sum(exp(x) * y + 1.0);
  Plan plan = compile(g, {z});
  Tensor xs = Tensor::from({0, 1, 2, 3}, {2, 2});
  Tensor ys = Tensor::from({1, -1}, {2});
  double expected = 0;
  for (int i = 0; i < 4; ++i) expected += std::exp(double(i)) * (i % 2 ? -1 : 1) + 1;
  EXPECT_NEAR(plan.run({{x, xs}, {y, ys}})[0].item(), expected, 1e-4);
}

TEST(Plan, MissingFeedIsAFeedError) {
  Graph g;
  Value x = g.input("x", {2});
  Value t = g.input("t", {2});
  Plan plan = compile(g, {add(x, t)});
  try {
    plan.run({{x, Tensor::from({1, 2}, {2})}});
    FAIL();
  } catch (const FeedError& e) {
    EXPECT_NE(std::string(e.what()).find("\"t\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not fed"), std::string::npos) << e.what();
  }
}

TEST(Plan, WrongDtypeOrShapeIsAFeedError) {
  Graph g;
  Value x = g.input("x", {2, 3});
  Plan plan = compile(g, {exp(x)});
  EXPECT_THROW(plan.run({{x, Tensor({2, 3}, DType::f64)}}), FeedError);
  try {
    plan.run({{x, Tensor({3, 2}, DType::f32)}});
    FAIL();
  } catch (const FeedError& e) {
    EXPECT_NE(std::string(e.what()).find("declared f32[2,3] but was fed f32[3,2]"),
              std::string::npos)
        << e.what();
  }
}

TEST(Plan, UnknownFeedIsAFeedError) {
  Graph g;
  Value x = g.input("x", {2});
  Value p = g.parameter("p", Tensor::from({1, 2}, {2}));
  Plan plan = compile(g, {add(x, p)});
  EXPECT_THROW(plan.run({{x, Tensor({2}, DType::f32)}, {p, Tensor({2}, DType::f32)}}), FeedError);
  Graph other;
  Value o = other.input("o", {2});
  EXPECT_THROW(plan.run({{x, Tensor({2}, DType::f32)}, {o, Tensor({2}, DType::f32)}}), FeedError);
}

TEST(Plan, MemoryIsReusedByLifetime) {
  Graph g;
  Value x = g.input("x", {256, 256});
  Value v = x;
  for (int i = 0; i < 8; ++i) v = exp(neg(v));
  Value out = sum(v);
  Plan reused = compile(g, {out});
  Plan separate = compile(g, {out}, {.reuse_memory = false});
  // A chain needs at most two live intermediates at once.
  EXPECT_LE(reused.planned_peak_bytes(), 3u * 256 * 256 * 4);
  EXPECT_GE(separate.planned_peak_bytes(), 16u * 256 * 256 * 4);
  Tensor xs = Tensor::full({256, 256}, 0.1);
  EXPECT_NEAR(reused.run({{x, xs}})[0].item(), separate.run({{x, xs}})[0].item(), 1e-2);
}

TEST(Plan, UsesOneDnnPrimitivesAndReusesThemAcrossRuns) {
  Graph g;
  Value x = g.input("x", {4, 4});
  Plan plan = compile(g, {sum(exp(x) + x)});
  Tensor xs = Tensor::full({4, 4}, 1.0);
  double first = plan.run({{x, xs}})[0].item();
  double second = plan.run({{x, xs}})[0].item();
  EXPECT_EQ(first, second);
  EXPECT_EQ(plan.num_specializations(), 1u);
  EXPECT_EQ(plan.num_onednn_steps(), 3u);  // exp, add, sum
}

TEST(Plan, DynamicBatchGetsOneSpecializationPerShape) {
  Graph g;
  Value x = g.input("x", {8, 3}, DType::f32, /*batch_dynamic=*/true);
  Value b = g.parameter("b", Tensor::from({1, 2, 3}, {3}));
  Value m = mean(x + b);
  Plan plan = compile(g, {m});
  EXPECT_NEAR(plan.run({{x, Tensor::full({8, 3}, 1.0)}})[0].item(), 3.0, 1e-6);
  EXPECT_NEAR(plan.run({{x, Tensor::full({5, 3}, 2.0)}})[0].item(), 4.0, 1e-6);
  EXPECT_EQ(plan.num_specializations(), 2u);
  // Other dimensions may not change.
  EXPECT_THROW(plan.run({{x, Tensor::full({5, 4}, 2.0)}}), FeedError);
}

TEST(Plan, ParametersAreReadAtEachRun) {
  Graph g;
  Value w = g.parameter("w", Tensor::from({1, 2}, {2}));
  Plan plan = compile(g, {sum(w)});
  EXPECT_NEAR(plan.run({})[0].item(), 3.0, 1e-6);
  g.value_of(w).fill(5.0);
  EXPECT_NEAR(plan.run({})[0].item(), 10.0, 1e-6);
}

TEST(Plan, CheckFiniteNamesTheFirstBadOp) {
  Graph g;
  Value x = g.input("x", {2});
  Value y = log(x);
  Plan plan = compile(g, {sum(y)}, {.check_finite = true});
  try {
    plan.run({{x, Tensor::from({1, -1}, {2})}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("log"), std::string::npos) << e.what();
  }
}

TEST(Plan, ReferenceAndOneDnnBackendsAgree) {
  Graph g;
  Value x = g.input("x", {3, 5});
  Value y = sum(tanh(x) * sigmoid(x), {1});
  Tensor xs({3, 5}, DType::f32);
  for (int i = 0; i < 15; ++i) xs.set(i, 0.1 * i - 0.7);
  auto a = compile(g, {y}).run({{x, xs}})[0].clone();
  auto b = compile(g, {y}, {.backend = Backend::reference}).run({{x, xs}})[0].clone();
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(a.at(i), b.at(i), 1e-5);
}

// Element-wise steps write over an input that dies at them, reshapes of computed values are
// views; results equal those of a plan without any reuse, and the arena shrinks.
TEST(Plan, InPlaceStepsAndReshapeViewsGiveTheSameResults) {
  for (Backend backend : {Backend::onednn, Backend::reference}) {
    Graph g;
    Value x = g.input("x", {6, 8});
    Value w = g.parameter("w", Tensor::from(std::vector<double>(8 * 4, 0.05), {8, 4}));
    Value h = exp(softplus(tanh(x * 0.5)) + 1.0);  // chain of element-wise steps
    Value r = reshape(h, Shape{8, 6});             // a view of h's buffer
    Value y = relu(neg(r) + 3.0);                  // reads the view; h's buffer dies here
    Value loss = sum(matmul(reshape(y, Shape{6, 8}), w) * 2.0);
    auto grads = grad(loss, {w, x});
    const std::vector<Value> outputs{loss, grads[0], grads[1], r};
    Tensor xs({6, 8}, DType::f32);
    for (std::int64_t i = 0; i < xs.numel(); ++i)
      xs.set(i, 0.1 * static_cast<double>(i % 13) - 0.6);
    Plan reusing = compile(g, outputs, {.backend = backend});
    Plan plain = compile(g, outputs, {.backend = backend, .reuse_memory = false});
    const auto& a = reusing.run({{x, xs}});
    const auto& b = plain.run({{x, xs}});
    for (std::size_t k = 0; k < outputs.size(); ++k) {
      ASSERT_EQ(a[k].shape(), b[k].shape());
      for (std::int64_t i = 0; i < a[k].numel(); ++i) {
        EXPECT_EQ(a[k].at(i), b[k].at(i)) << "output " << k << " element " << i;
      }
    }
    EXPECT_GT(reusing.num_in_place_steps(), 0u);
    EXPECT_GE(reusing.num_views(), 2u);
    EXPECT_EQ(plain.num_in_place_steps(), 0u);
    EXPECT_EQ(plain.num_views(), 0u);
    EXPECT_LT(reusing.num_steps(), plain.num_steps());
    EXPECT_LT(reusing.planned_peak_bytes(), plain.planned_peak_bytes());
  }
}

// A trainer's last batch is often smaller: the profile shows the batch size that ran most.
TEST(Plan, ProfileShowsTheSpecializationThatRanMost) {
  Graph g;
  Value x = g.input("x", {8, 3}, DType::f32, /*batch_dynamic=*/true);
  Value y = tanh(x) * 2.0;
  Plan plan = compile(g, {y}, {.profile = true});
  for (int i = 0; i < 3; ++i) plan.run({{x, Tensor::full({8, 3}, 0.5)}});
  plan.run({{x, Tensor::full({5, 3}, 0.5)}});
  const auto steps = plan.profile();
  ASSERT_FALSE(steps.empty());
  for (const StepProfile& step : steps) {
    EXPECT_EQ(step.runs, 3u) << step.node;
    EXPECT_EQ(step.output, "f32[8,3]") << step.node;
  }
}

// CompileOptions::single_thread_below_bytes: small steps run on one thread, large ones on all;
// the caller's thread setting survives a run, also one that throws; results do not change.
TEST(Plan, SmallStepsRunOnOneThreadAndTheCallersSettingIsRestored) {
  const int saved = num_threads();
  set_num_threads(2);
  Graph g;
  Value x = g.input("x", {256, 256});
  Value labels = g.input("labels", {4}, DType::i32);
  Value big = matmul(x, x);                          // 3 × 256 KiB: all threads
  Value small = slice(big, {0, 0}, {4, 10});         // 4×10: one thread
  Value loss = sparse_cross_entropy(small, labels);  // run-time Error on a bad label
  Tensor xs({256, 256}, DType::f32);
  for (std::int64_t i = 0; i < xs.numel(); ++i) xs.set(i, 0.001 * static_cast<double>(i % 97));
  Tensor good = Tensor::from({1, 2, 3, 4}, {4}).to(DType::i32);
  Tensor bad = Tensor::from({1, 2, 30, 4}, {4}).to(DType::i32);

  Plan plan = compile(g, {loss, big}, {.profile = true});
  Plan all_threads = compile(g, {loss, big}, {.single_thread_below_bytes = 0});
  const double a = plan.run({{x, xs}, {labels, good}})[0].item();
  EXPECT_EQ(num_threads(), 2);
  const double b = all_threads.run({{x, xs}, {labels, good}})[0].item();
  EXPECT_NEAR(a, b, 1e-5 * std::abs(b));
  bool saw_single = false, saw_all = false;
  for (const StepProfile& step : plan.profile()) {
    if (step.op == "matmul") {
      EXPECT_EQ(step.threads, 0) << step.node;
    }
    saw_single = saw_single || step.threads == 1;
    saw_all = saw_all || step.threads == 0;
  }
  EXPECT_TRUE(saw_single);
  EXPECT_TRUE(saw_all);
  EXPECT_THROW(plan.run({{x, xs}, {labels, bad}}), Error);
  EXPECT_EQ(num_threads(), 2);
  set_num_threads(saved);
}

// Kernels' temporary buffers (blocked copies of convolution operands, padded copies and hit
// lists of the pooled gradients) lie in one scratch block that all steps share: the block is as
// large as the largest need, counts in planned_peak_bytes(), and a step finds there whatever the
// step before it left. Two inputs run alternately must still give the reference backend's
// results (padding the pooled kernel did not rewrite, or a buffer read before it is written,
// would differ).
TEST(Plan, KernelsShareOneScratchBlock) {
  Graph g;
  Value x = g.input("x", {2, 3, 12, 12});
  Value w1 = g.parameter("w1", testing::uniform_tensor({8, 3, 3, 3}, 61));
  Value b1 = g.parameter("b1", testing::uniform_tensor({8}, 62));
  Value w2 = g.parameter("w2", testing::uniform_tensor({16, 8, 3, 3}, 63));
  Value b2 = g.parameter("b2", testing::uniform_tensor({16}, 64));
  Value h = max_pool2d(relu(conv2d(x, w1, b1, {.padding = {1, 1}})), {2, 2}, {2, 2});
  h = max_pool2d(relu(conv2d(h, w2, b2, {.padding = {1, 1}})), {2, 2}, {2, 2});
  Value loss = sum(h * h);
  std::vector<Value> outputs{loss};
  for (const Value& v : grad(loss, {w1, b1, w2, b2, x})) outputs.push_back(v);
  Plan plan = compile(g, outputs, {.profile = true});
  Plan reference = compile(g, outputs, {.backend = Backend::reference});
  const Tensor inputs[] = {testing::uniform_tensor({2, 3, 12, 12}, 65),
                           testing::uniform_tensor({2, 3, 12, 12}, 66)};
  for (int run = 0; run < 4; ++run) {
    const Feeds feeds{{x, inputs[run % 2]}};
    const auto expected = reference.run(feeds);
    const auto got = plan.run(feeds);
    for (std::size_t k = 0; k < outputs.size(); ++k) {
      for (std::int64_t i = 0; i < got[k].numel(); ++i) {
        ASSERT_NEAR(got[k].at(i), expected[k].at(i), 1e-4 * (1 + std::abs(expected[k].at(i))))
            << "run " << run << ", output " << k << ", element " << i;
      }
    }
  }
  std::size_t largest = 0, total = 0, users = 0;
  for (const StepProfile& step : plan.profile()) {
    largest = std::max(largest, step.scratch_bytes);
    total += step.scratch_bytes;
    users += step.scratch_bytes > 0;
  }
  EXPECT_GE(users, 3u);  // the two forward convolutions and the two pooled gradients
  EXPECT_GT(largest, 0u);
  EXPECT_EQ(plan.scratch_bytes(), largest);
  EXPECT_LT(plan.scratch_bytes(), total);
  std::size_t output_bytes = 0;  // outputs live in the arena to the end of the run
  for (const Value& v : outputs) output_bytes += v.desc().bytes();
  EXPECT_GE(plan.planned_peak_bytes(), plan.scratch_bytes() + output_bytes);
  EXPECT_GE(plan.unplanned_bytes(), total);
  EXPECT_EQ(reference.scratch_bytes(), 0u);  // plain loops need none
}

// A kernel's scratch layout: 64-byte aligned offsets, and a clear Error when a run gives less
// scratch than the kernel reserved.
TEST(Plan, ScratchLayoutAlignsAndChecksTheBlock) {
  ScratchLayout layout;
  EXPECT_EQ(layout.reserve(100), 0u);
  EXPECT_EQ(layout.reserve(1), 128u);
  EXPECT_EQ(layout.reserve(0), 192u);
  EXPECT_EQ(layout.bytes(), 192u);
  alignas(64) std::byte block[192];
  RunContext context;
  context.scratch = block;
  context.scratch_bytes = sizeof block;
  EXPECT_EQ(layout.base(context, "op"), block);
  context.scratch_bytes = 128;
  try {
    layout.base(context, "conv2d");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv2d: the kernel needs 192 bytes of scratch, the run "
                                         "gives 128"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace dagrad
