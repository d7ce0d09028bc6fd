// Registry-wide tests: every registered op, on its own samples, with no per-op test code.
//   - coverage: samples, error samples, a reference kernel, and a backward rule or a reason;
//   - gradcheck in f64 on the reference kernels (and the gradient of the gradient where the op
//     claims second order); ops without a gradient must refuse grad() by name;
//   - the oneDNN kernel against the reference kernel in f32;
//   - every error sample raises dagrad::Error with the promised message.
#include <gtest/gtest.h>

#include "tests/registry_support.hpp"

namespace dagrad {
namespace {

using testing::build_sample;
using testing::combine_outputs;

std::vector<std::string> op_names() {
  std::vector<std::string> names;
  for (const OpDef* def : op_registry().all()) names.push_back(def->name);
  return names;
}

class EveryOp : public ::testing::TestWithParam<std::string> {
 protected:
  const OpDef& op() const { return op_registry().get(GetParam()); }
};

TEST_P(EveryOp, IsFullyRegistered) {
  const OpDef& def = op();
  ASSERT_TRUE(def.samples) << def.name << " has no sample inputs";
  EXPECT_FALSE(def.samples().empty()) << def.name << " has no sample inputs";
  EXPECT_TRUE(def.error_samples) << def.name << " has no error samples";
  EXPECT_TRUE(def.reference) << def.name << " has no reference kernel";
  EXPECT_TRUE(def.backward || !def.no_gradient.empty())
      << def.name << " has neither a backward rule nor a reason for having none";
  EXPECT_FALSE(def.formula.empty()) << def.name << " does not say what it computes";
}

TEST_P(EveryOp, GradientMatchesCentralDifferences) {
  const OpDef& def = op();
  if (!def.samples) GTEST_SKIP();
  for (const Sample& sample : def.samples()) {
    SCOPED_TRACE(sample.label);
    Graph g;
    auto built = build_sample(g, def, sample.inputs, sample.attrs, DType::f64, 11);
    Value scalar = combine_outputs(g, built.outputs, 5);
    if (!scalar.valid()) continue;  // no floating output
    bool any_differentiable = false;
    Feeds feeds;
    for (std::size_t i = 0; i < built.feeds.size(); ++i) {
      if (sample.inputs[i].differentiable && is_floating(built.feeds[i].second.dtype())) {
        any_differentiable = true;
      }
      feeds.push_back(built.feeds[i]);
    }
    if (!any_differentiable) continue;
    std::vector<Value> wrt;
    for (std::size_t i = 0; i < built.inputs.size(); ++i) {
      if (sample.inputs[i].differentiable && is_floating(built.inputs[i].dtype()))
        wrt.push_back(built.inputs[i]);
    }
    if (!def.backward) {
      try {
        grad(scalar, wrt);
        ADD_FAILURE() << def.name << " has no gradient but grad() did not refuse";
      } catch (const GraphError& e) {
        EXPECT_NE(std::string(e.what()).find(def.name), std::string::npos) << e.what();
      }
      continue;
    }
    // Non-differentiable inputs (labels, masks) are fed as they are but not perturbed:
    // gradcheck only perturbs f64 feeds, so convert non-differentiable floating feeds by
    // treating them as constants.
    GradcheckOptions options;
    options.step = sample.step;
    options.tolerance = sample.tolerance;
    options.run.training = true;
    Graph g2;
    std::vector<Value> inputs2;
    Feeds feeds2;
    std::mt19937_64 rng(11);
    for (std::size_t i = 0; i < sample.inputs.size(); ++i) {
      Tensor value = testing::make_input(sample.inputs[i], DType::f64, rng);
      if (sample.inputs[i].differentiable || !is_floating(value.dtype())) {
        Value v = g2.input(fmt::format("in{}", i), sample.inputs[i].shape, value.dtype());
        inputs2.push_back(v);
        feeds2.emplace_back(v, value);
      } else {
        inputs2.push_back(g2.constant(value, fmt::format("in{}", i)));
      }
    }
    auto outputs2 = g2.add_node(def.name, inputs2, sample.attrs);
    Value scalar2 = combine_outputs(g2, outputs2, 5);
    GradcheckResult result = gradcheck(g2, scalar2, feeds2, options);
    EXPECT_TRUE(result.ok) << def.name << " [" << sample.label << "] " << result.report();
    if (!def.second_order) {
      // An op that does not claim second order must refuse a gradient of its gradient clearly,
      // rather than return something silently wrong.
      Graph g4;
      std::vector<Value> inputs4;
      for (std::size_t i = 0; i < sample.inputs.size(); ++i) {
        const DType dtype = sample.inputs[i].dtype.value_or(DType::f64);
        inputs4.push_back(g4.input(fmt::format("in{}", i), sample.inputs[i].shape, dtype));
      }
      auto outputs4 = g4.add_node(def.name, inputs4, sample.attrs);
      Value scalar4 = combine_outputs(g4, outputs4, 5);
      std::vector<Value> wrt4;
      for (std::size_t i = 0; i < inputs4.size(); ++i) {
        if (sample.inputs[i].differentiable && is_floating(inputs4[i].dtype()))
          wrt4.push_back(inputs4[i]);
      }
      auto first = grad(scalar4, wrt4);
      Value inner = combine_outputs(g4, first, 9);
      EXPECT_THROW(grad(inner, wrt4), GraphError)
          << def.name << " [" << sample.label << "] claims no second order, but grad of its grad "
          << "did not refuse: declare second_order = true if that is right";
    }
    if (def.second_order) {
      Graph g3;
      std::vector<Value> inputs3;
      Feeds feeds3;
      std::mt19937_64 rng3(11);
      for (std::size_t i = 0; i < sample.inputs.size(); ++i) {
        Tensor value = testing::make_input(sample.inputs[i], DType::f64, rng3);
        if (sample.inputs[i].differentiable || !is_floating(value.dtype())) {
          Value v = g3.input(fmt::format("in{}", i), sample.inputs[i].shape, value.dtype());
          inputs3.push_back(v);
          feeds3.emplace_back(v, value);
        } else {
          inputs3.push_back(g3.constant(value, fmt::format("in{}", i)));
        }
      }
      auto outputs3 = g3.add_node(def.name, inputs3, sample.attrs);
      Value scalar3 = combine_outputs(g3, outputs3, 5);
      GradcheckOptions second = options;
      second.tolerance = std::max(options.tolerance, 1e-5);
      GradcheckResult result2 = gradgradcheck(g3, scalar3, feeds3, second);
      EXPECT_TRUE(result2.ok) << def.name << " [" << sample.label
                              << "] second order: " << result2.report();
    }
  }
}

TEST_P(EveryOp, OneDnnKernelMatchesReference) {
  const OpDef& def = op();
  if (!def.samples) GTEST_SKIP();
  std::size_t onednn_runs = 0;
  for (const Sample& sample : def.samples()) {
    SCOPED_TRACE(sample.label);
    Graph g;
    auto built = build_sample(g, def, sample.inputs, sample.attrs, DType::f32, 13);
    CompileOptions reference_options;
    reference_options.backend = Backend::reference;
    Plan reference = compile(g, built.outputs, reference_options);
    Plan onednn = compile(g, built.outputs);
    RunOptions run;
    run.training = true;
    auto expected = reference.run(built.feeds, run);
    auto actual = onednn.run(built.feeds, run);
    onednn_runs += onednn.num_onednn_steps();
    ASSERT_EQ(expected.size(), actual.size());
    for (std::size_t k = 0; k < expected.size(); ++k) {
      ASSERT_EQ(expected[k].desc(), actual[k].desc());
      for (std::int64_t i = 0; i < expected[k].numel(); ++i) {
        const double e = expected[k].at(i);
        const double a = actual[k].at(i);
        ASSERT_NEAR(a, e, 1e-5 * (1.0 + std::abs(e)))
            << def.name << " [" << sample.label << "] output " << k << " element " << i;
      }
    }
  }
  if (def.onednn) {
    EXPECT_GT(onednn_runs, 0u) << def.name << " has a oneDNN kernel but no sample exercises it";
  }
}

TEST_P(EveryOp, ErrorSamplesRaise) {
  const OpDef& def = op();
  if (!def.error_samples) GTEST_SKIP();
  for (const ErrorSample& sample : def.error_samples()) {
    SCOPED_TRACE(sample.label);
    try {
      Graph g;
      auto built = build_sample(g, def, sample.inputs, sample.attrs, DType::f32, 17);
      if (sample.at_run) {
        Plan plan = compile(g, built.outputs);
        plan.run(built.feeds);
        Plan reference = compile(g, built.outputs, {.backend = Backend::reference});
        reference.run(built.feeds);
      }
      ADD_FAILURE() << def.name << " [" << sample.label << "] raised no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(sample.message_contains), std::string::npos)
          << def.name << " [" << sample.label << "] message: " << e.what();
      EXPECT_NE(std::string(e.what()).find(def.name), std::string::npos)
          << "the message does not name the op: " << e.what();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Registry, EveryOp, ::testing::ValuesIn(op_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace dagrad
