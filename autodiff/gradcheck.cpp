#include "autodiff/gradcheck.hpp"

#include <fmt/format.h>

#include <cmath>
#include <random>

#include "autodiff/grad.hpp"
#include "ops/elementwise.hpp"
#include "ops/reduction.hpp"

namespace dagrad {

std::string GradcheckResult::report() const {
  if (elements_checked == 0) return "gradcheck: no element was checked";
  return fmt::format(
      "gradcheck {}: {} elements; worst at {}[{}]: analytic {:.10g}, numeric {:.10g}, error "
      "{:.3g}",
      ok ? "passed" : "FAILED", elements_checked, worst_input, worst_index, analytic, numeric,
      worst_error);
}

namespace {

Tensor random_weights(const Shape& shape, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> dist(0.5, 1.5);
  Tensor w(shape, DType::f64);
  for (std::int64_t i = 0; i < w.numel(); ++i) w.set(i, dist(rng) * ((i % 2) ? -1.0 : 1.0));
  return w;
}

// Σ output · w as a scalar (output itself when it is already one element).
Value project(Graph& graph, const Value& output, std::mt19937_64& rng) {
  if (output.desc().numel() == 1 && output.rank() == 0) return output;
  Value w = graph.constant(random_weights(output.shape(), rng), "gradcheck_weights");
  return sum(mul(output, w));
}

struct Checked {
  std::vector<std::size_t> feed_index;  // which feeds are perturbed
  std::vector<Value> values;
};

Checked differentiable_feeds(const Feeds& at) {
  Checked c;
  for (std::size_t i = 0; i < at.size(); ++i) {
    const auto& [value, tensor] = at[i];
    if (tensor.dtype() == DType::f64) {
      c.feed_index.push_back(i);
      c.values.push_back(value);
    } else if (tensor.dtype() == DType::f32) {
      throw Error(
          fmt::format("gradcheck: input \"{}\" is f32; gradcheck runs in f64, so build "
                      "the graph with f64 inputs",
                      value.str()));
    }
  }
  return c;
}

// Core loop: `scalar` is f(x); `analytic` are its gradients with respect to `checked`.
GradcheckResult compare(Graph& graph, const Value& scalar, const std::vector<Value>& analytic,
                        const Feeds& at, const Checked& checked, const GradcheckOptions& options) {
  CompileOptions compile_options;
  compile_options.backend = Backend::reference;
  Feeds feeds;
  for (const auto& [v, t] : at) feeds.emplace_back(v, t.clone());
  Plan gradient_plan(graph, analytic, compile_options);
  std::vector<Tensor> analytic_values;
  for (auto& t : gradient_plan.run(feeds, options.run)) analytic_values.push_back(t.clone());
  Plan value_plan(graph, {scalar}, compile_options);

  GradcheckResult result;
  for (std::size_t k = 0; k < checked.values.size(); ++k) {
    Tensor& x = feeds[checked.feed_index[k]].second;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      const double original = x.at(i);
      x.set(i, original + options.step);
      const double plus = value_plan.run(feeds, options.run)[0].item();
      x.set(i, original - options.step);
      const double minus = value_plan.run(feeds, options.run)[0].item();
      x.set(i, original);
      const double numeric = (plus - minus) / (2.0 * options.step);
      const double a = analytic_values[k].at(i);
      const double error = std::abs(a - numeric) / (1.0 + std::abs(numeric));
      ++result.elements_checked;
      if (!(error <= result.worst_error) || result.worst_index < 0) {
        if (!(error <= result.worst_error))
          result.worst_error = std::isnan(error) ? INFINITY : error;
        result.worst_input = checked.values[k].str();
        result.worst_index = i;
        result.analytic = a;
        result.numeric = numeric;
      }
    }
  }
  result.ok = result.worst_error <= options.tolerance;
  return result;
}

}  // namespace

GradcheckResult gradcheck(Graph& graph, const Value& output, const Feeds& at,
                          const GradcheckOptions& options) {
  Checked checked = differentiable_feeds(at);
  std::mt19937_64 rng(options.seed);
  Value scalar = project(graph, output, rng);
  std::vector<Value> analytic = grad(scalar, checked.values);
  return compare(graph, scalar, analytic, at, checked, options);
}

GradcheckResult gradgradcheck(Graph& graph, const Value& output, const Feeds& at,
                              const GradcheckOptions& options) {
  Checked checked = differentiable_feeds(at);
  std::mt19937_64 rng(options.seed);
  Value scalar = project(graph, output, rng);
  std::vector<Value> first = grad(scalar, checked.values);
  Value inner;
  for (const auto& g : first) {
    Value term = project(graph, g, rng);
    inner = inner.valid() ? add(inner, term) : term;
  }
  std::vector<Value> second = grad(inner, checked.values);
  return compare(graph, inner, second, at, checked, options);
}

}  // namespace dagrad
