#include "tests/registry_support.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace dagrad::testing {

std::vector<std::uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const std::uint8_t*>(t.raw());
  return std::vector<std::uint8_t>(p, p + t.desc().bytes());
}

Tensor uniform_tensor(Shape shape, std::uint64_t seed, double low, double high, DType dtype) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(low, high);
  Tensor t(std::move(shape), dtype);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, dist(rng));
  return t;
}

Tensor make_input(const InputSpec& spec, DType float_dtype, std::mt19937_64& rng) {
  const DType dtype = spec.dtype.value_or(float_dtype);
  Tensor t(spec.shape, dtype);
  if (spec.values) {
    if (static_cast<std::int64_t>(spec.values->size()) != t.numel()) {
      throw Error(
          fmt::format("sample input {}: {} exact values given", spec.shape, spec.values->size()));
    }
    for (std::int64_t i = 0; i < t.numel(); ++i)
      t.set(i, (*spec.values)[static_cast<std::size_t>(i)]);
    return t;
  }
  if (dtype == DType::i32) {
    std::uniform_int_distribution<int> dist(static_cast<int>(spec.low),
                                            static_cast<int>(spec.high) - 1);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, dist(rng));
    return t;
  }
  std::uniform_real_distribution<double> dist(spec.low, spec.high);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    double v = dist(rng);
    if (spec.min_magnitude > 0) {
      // Reflect values that fall too near zero (kinks) out to the allowed magnitude.
      for (int tries = 0; std::abs(v) < spec.min_magnitude && tries < 100; ++tries) v = dist(rng);
      if (std::abs(v) < spec.min_magnitude) v = v < 0 ? -spec.min_magnitude : spec.min_magnitude;
    }
    t.set(i, v);
  }
  return t;
}

BuiltSample build_sample(Graph& graph, const OpDef& op, const std::vector<InputSpec>& inputs,
                         const Attrs& attrs, DType float_dtype, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  BuiltSample built;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    Tensor value = make_input(inputs[i], float_dtype, rng);
    Value v = graph.input(fmt::format("in{}", i), inputs[i].shape, value.dtype());
    built.inputs.push_back(v);
    built.feeds.emplace_back(v, value);
  }
  built.outputs = graph.add_node(op.name, built.inputs, attrs);
  return built;
}

Value combine_outputs(Graph& graph, const std::vector<Value>& outputs, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(0.5, 1.5);
  Value total;
  for (const auto& out : outputs) {
    if (!is_floating(out.dtype())) continue;
    Tensor w(out.shape(), out.dtype());
    for (std::int64_t i = 0; i < w.numel(); ++i) w.set(i, dist(rng) * (i % 2 ? -1 : 1));
    Value term = sum(mul(out, graph.constant(w)));
    total = total.valid() ? add(total, term) : term;
  }
  return total;
}

namespace {

Feeds batch_feeds(const BatchGraph& g, std::int64_t batch) {
  Feeds feeds = g.fixed;
  for (const Value& v : g.batched) {
    std::vector<std::int64_t> dims = v.shape().dims();
    dims[0] = batch;
    const Shape shape(dims);
    std::vector<double> values;
    for (std::int64_t i = 0; i < shape.numel(); ++i) {
      values.push_back(v.dtype() == DType::i32 ? static_cast<double>(i % 2)
                                               : std::sin(0.7 + static_cast<double>(i)));
    }
    feeds.push_back({v, Tensor::from(values, shape, v.dtype())});
  }
  return feeds;
}

}  // namespace

void expect_follows_the_batch(const BatchGraphBuilder& build, std::vector<std::int64_t> batches) {
  auto dynamic = build(batches.at(0), true);
  Plan plan = compile(dynamic->graph, dynamic->outputs);
  for (std::int64_t batch : batches) {
    SCOPED_TRACE(::testing::Message() << "batch " << batch);
    auto fixed = build(batch, false);
    Plan expected_plan = compile(fixed->graph, fixed->outputs);
    std::vector<std::vector<double>> expected;
    for (const Tensor& t : expected_plan.run(batch_feeds(*fixed, batch))) {
      expected.push_back(t.to_doubles());
    }
    const auto& actual = plan.run(batch_feeds(*dynamic, batch));
    ASSERT_EQ(actual.size(), expected.size());
    for (std::size_t k = 0; k < expected.size(); ++k) {
      ASSERT_EQ(actual[k].shape(), fixed->outputs[k].shape()) << "output " << k;
      const auto a = actual[k].to_doubles();
      for (std::size_t i = 0; i < a.size(); ++i) {
        EXPECT_NEAR(a[i], expected[k][i], 1e-6 * (1 + std::abs(expected[k][i])))
            << "output " << k << " element " << i;
      }
    }
  }
}

}  // namespace dagrad::testing
