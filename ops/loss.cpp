// Losses as composites of registered ops, plus the primitives they need:
//   logistic_loss         binary cross-entropy on logits, element-wise (one loop, exact at z = 0)
//   pick / pick_grad      gather x[i, label_i] and its scatter-back (sparse cross-entropy)
//   classification_error  fraction of wrong argmax predictions (no gradient)
#include "ops/loss.hpp"

#include <algorithm>
#include <cmath>

#include "ops/common.hpp"
#include "ops/elementwise.hpp"
#include "ops/math.hpp"
#include "ops/reduction.hpp"
#include "ops/softmax.hpp"

namespace dagrad {

namespace {

std::string location(const std::source_location& where) {
  return fmt::format("{}:{}", where.file_name(), where.line());
}

void require_valid(std::string_view loss, std::initializer_list<const Value*> values,
                   const std::source_location& where) {
  for (const Value* value : values) {
    if (!value->valid()) {
      throw GraphError(
          fmt::format("{} (at {}): an input is an empty Value", loss, location(where)));
    }
  }
}

void require_same_shape(std::string_view loss, const Value& y, const Value& t,
                        const std::source_location& where) {
  require_valid(loss, {&y, &t}, where);
  if (y.shape() != t.shape()) {
    throw ShapeError(fmt::format("{} (at {}): prediction {} and target {} must have the same shape",
                                 loss, location(where), y.desc(), t.desc()));
  }
}

// Axes 1..rank-1: everything but the example axis.
std::vector<std::int64_t> feature_axes(const Value& x) {
  std::vector<std::int64_t> axes;
  for (int axis = 1; axis < x.rank(); ++axis) axes.push_back(axis);
  return axes;
}

Value per_example_mean(const Value& elementwise) {
  return elementwise.rank() <= 1 ? elementwise : mean(elementwise, feature_axes(elementwise));
}

Value per_example_sum(const Value& elementwise) {
  return elementwise.rank() <= 1 ? elementwise : sum(elementwise, feature_axes(elementwise));
}

// Applies the optional per-example weights and the reduction (see loss.hpp).
Value reduce(std::string_view loss, const Value& per_example, Reduction reduction,
             const std::optional<Value>& weights, const std::source_location& where) {
  if (weights) {
    require_valid(loss, {&*weights}, where);
    if (weights->shape() != per_example.shape() || weights->dtype() != per_example.dtype()) {
      throw ShapeError(fmt::format(
          "{} (at {}): weights {} must be {} (one weight per example, of the loss's dtype)", loss,
          location(where), weights->desc(), per_example.desc()));
    }
  }
  const Value weighted = weights ? mul(per_example, *weights, where) : per_example;
  switch (reduction) {
    case Reduction::none:
      return weighted;
    case Reduction::sum:
      return sum(weighted, where);
    case Reduction::mean:
      return weights ? div(sum(weighted, where), sum(*weights, where), where)
                     : mean(weighted, where);
  }
  throw Error(fmt::format("{}: unknown reduction", loss));
}

// ---- logistic_loss -------------------------------------------------------------------------

// One element of binary cross-entropy on a logit: max(z, 0) − z·t + log(1 + e^(−|z|)).
// e^(−|z|) <= 1, so nothing overflows, and log1p keeps the tail accurate for large |z|.
template <class T>
T logistic(T z, T t) {
  return std::max(z, T(0)) - z * t + std::log1p(std::exp(-std::abs(z)));
}

void register_logistic_loss(OpRegistry& registry) {
  OpDef def;
  def.name = "logistic_loss";
  def.formula = "l = max(z, 0) − z·t + log(1 + e^(−|z|)); dl/dz = σ(z) − t, dl/dt = −z";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    if (call.inputs[0].shape != call.inputs[1].shape) {
      call.fail("logits {} and targets {} must have the same shape", call.inputs[0],
                call.inputs[1]);
    }
    return {call.inputs[0]};
  };
  // A primitive rather than relu/abs composites: their subgradients at z = 0 would give −t
  // instead of the true σ(0) − t = ½ − t, and zero logits are common (zero-initialised layers).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    Value g = c.grad();
    const Value& z = c.inputs[0];
    std::optional<Value> dz, dt;
    if (c.needs[0]) dz = mul(g, sub(sigmoid(z), c.inputs[1]));
    if (c.needs[1]) dt = neg(mul(g, z));
    return {dz, dt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* logits = call.inputs[0].data<T>();
      const T* targets = call.inputs[1].data<T>();
      T* dst = call.outputs[0].data<T>();
      for (std::int64_t i = 0; i < call.outputs[0].numel(); ++i)
        dst[i] = logistic(logits[i], targets[i]);
    });
  };
  def.samples = [] {
    return std::vector<Sample>{
        {"matrix", {spec({3, 4}, -4, 4), spec({3, 4}, 0, 1)}},
        {"vector", {spec({5}, -2, 2), spec({5}, 0, 1)}},
        {"large logits",
         {InputSpec{{4}, {}, 0, 0, 0, true, std::vector<double>{-100, -30, 30, 100}},
          spec({4}, 0, 1)}},
        {"zero logits",
         {InputSpec{{3}, {}, 0, 0, 0, true, std::vector<double>{0, 0, 0}}, spec({3}, 0, 1)}},
    };
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"shapes differ", {spec({3, 4}), spec({4, 3})}, {}, "must have the same shape"},
        {"integer logits",
         {InputSpec{{2}, DType::i32}, InputSpec{{2}, DType::i32}},
         {},
         "must be f32 or f64"}};
  };
  registry.add(std::move(def));
}

// ---- pick and pick_grad --------------------------------------------------------------------

void require_labels(const ShapeCall& call, std::size_t input, std::int64_t rows) {
  const TensorDesc& labels = call.inputs[input];
  if (labels.dtype != DType::i32) call.fail("labels must be i32, got {}", labels);
  if (labels.shape.rank() != 1 || labels.shape[0] != rows) {
    call.fail("labels {} must have shape [{}] (one label per row)", labels, rows);
  }
}

// The label of row `row`, checked against [0, classes): never read out of bounds.
std::int64_t checked_label(const KernelCall& call, const std::int32_t* labels, std::int64_t row,
                           std::int64_t classes) {
  const std::int64_t label = labels[row];
  if (label < 0 || label >= classes)
    throw_label_out_of_range(call.node.site(), label, row, classes);
  return label;
}

InputSpec bad_labels() {
  return InputSpec{{3}, DType::i32, 0, 0, 0, false, std::vector<double>{0, 5, 1}};
}

void register_pick(OpRegistry& registry) {
  OpDef def;
  def.name = "pick";
  def.formula = "y_i = x[i, labels_i] for x [N, C] and i32 labels [N]";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    const TensorDesc& x = call.inputs[0];
    if (x.shape.rank() != 2) call.fail("x must be [rows, classes], got {}", x);
    require_labels(call, 1, x.shape[0]);
    return {TensorDesc{x.dtype, Shape{x.shape[0]}}};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {pick_grad(c.grad(), c.inputs[1], c.inputs[0].shape()[1]), std::nullopt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const Tensor& x = call.inputs[0];
    const std::int64_t rows = x.shape()[0];
    const std::int64_t classes = x.shape()[1];
    const std::int32_t* labels = call.inputs[1].data<std::int32_t>();
    dispatch_floating(x.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src = x.data<T>();
      T* dst = call.outputs[0].data<T>();
      for (std::int64_t i = 0; i < rows; ++i)
        dst[i] = src[i * classes + checked_label(call, labels, i, classes)];
    });
  };
  def.samples = [] {
    return std::vector<Sample>{{"rows", {spec({4, 3}), labels({4}, 3)}},
                               {"one class", {spec({2, 1}), labels({2}, 1)}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"float labels", {spec({3, 4}), spec({3})}, {}, "labels must be i32"},
        {"wrong label count", {spec({3, 4}), labels({2}, 4)}, {}, "must have shape [3]"},
        {"x not a matrix", {spec({3, 4, 2}), labels({3}, 4)}, {}, "must be [rows, classes]"},
        {"label out of range", {spec({3, 4}), bad_labels()}, {}, "label 5 at position 1", true},
    };
  };
  registry.add(std::move(def));
}

void register_pick_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "pick_grad";
  def.formula = "dx[i, c] = dy_i if c = labels_i else 0 (pick's backward; dx is [N, classes])";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    const TensorDesc& dy = call.inputs[0];
    if (dy.shape.rank() != 1) call.fail("dy must be a vector [rows], got {}", dy);
    require_labels(call, 1, dy.shape[0]);
    const std::int64_t classes = call.attrs.integer("classes");
    if (classes <= 0) call.fail("classes must be positive, got {}", classes);
    return {TensorDesc{dy.dtype, Shape{dy.shape[0], classes}}};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {pick(c.grad(), c.inputs[1]), std::nullopt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    Tensor& dx = call.outputs[0];
    const std::int64_t rows = dx.shape()[0];
    const std::int64_t classes = dx.shape()[1];
    const std::int32_t* labels = call.inputs[1].data<std::int32_t>();
    dispatch_floating(dx.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* diff_dst = call.inputs[0].data<T>();
      T* diff_src = dx.data<T>();
      std::fill(diff_src, diff_src + dx.numel(), T(0));
      for (std::int64_t i = 0; i < rows; ++i) {
        diff_src[i * classes + checked_label(call, labels, i, classes)] = diff_dst[i];
      }
    });
  };
  def.samples = [] {
    return std::vector<Sample>{
        {"rows", {spec({4}), labels({4}, 3)}, {{"classes", std::int64_t{3}}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"float labels",
         {spec({3}), spec({3})},
         {{"classes", std::int64_t{4}}},
         "labels must be i32"},
        {"no classes",
         {spec({3}), labels({3}, 1)},
         {{"classes", std::int64_t{0}}},
         "classes must be positive"},
        {"label out of range",
         {spec({3}), bad_labels()},
         {{"classes", std::int64_t{4}}},
         "label 5 at position 1",
         true},
    };
  };
  registry.add(std::move(def));
}

// ---- classification_error ------------------------------------------------------------------

// Index of the largest of `count` values at `row` (the first one on ties).
template <class T>
std::int64_t argmax(const T* row, std::int64_t count) {
  std::int64_t best = 0;
  for (std::int64_t c = 1; c < count; ++c) {
    if (row[c] > row[best]) best = c;
  }
  return best;
}

void register_classification_error(OpRegistry& registry) {
  OpDef def;
  def.name = "classification_error";
  def.formula = "e = (1/N) Σ_i [argmax_c scores[i, c] ≠ target class of i] (ties: lowest index)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    const TensorDesc& scores = call.inputs[0];
    const TensorDesc& targets = call.inputs[1];
    if (scores.shape.rank() != 2) call.fail("scores must be [examples, classes], got {}", scores);
    if (targets.dtype == DType::i32) {
      require_labels(call, 1, scores.shape[0]);
    } else if (targets.shape != scores.shape) {
      call.fail("targets {} must be i32 labels [{}] or one-hot of the scores' shape {}", targets,
                scores.shape[0], scores.shape);
    }
    return {TensorDesc{scores.dtype, Shape{}}};
  };
  def.no_gradient =
      "a count of wrong predictions is piecewise constant: its gradient is 0 "
      "wherever it exists; train on a loss instead";
  def.reference = [](const KernelCall& call) {
    const Tensor& scores = call.inputs[0];
    const Tensor& targets = call.inputs[1];
    const std::int64_t rows = scores.shape()[0];
    const std::int64_t classes = scores.shape()[1];
    dispatch_floating(scores.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src = scores.data<T>();
      std::int64_t wrong = 0;
      for (std::int64_t i = 0; i < rows; ++i) {
        std::int64_t target = 0;
        if (targets.dtype() == DType::i32) {
          target = checked_label(call, targets.data<std::int32_t>(), i, classes);
        } else {
          target = dispatch_floating(targets.dtype(), [&](auto target_zero) {
            using U = decltype(target_zero);
            return argmax(targets.data<U>() + i * classes, classes);
          });
        }
        if (argmax(src + i * classes, classes) != target) ++wrong;
      }
      call.outputs[0].data<T>()[0] =
          rows == 0 ? T(0) : static_cast<T>(static_cast<double>(wrong) / static_cast<double>(rows));
    });
  };
  def.samples = [] {
    InputSpec one_hot{{3, 3}, {}, 0, 0, 0, false, std::vector<double>{0, 0, 1, 0, 1, 0, 1, 0, 0}};
    return std::vector<Sample>{{"labels", {spec({5, 4}), labels({5}, 4)}},
                               {"one-hot targets", {spec({3, 3}), one_hot}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"targets of another shape", {spec({3, 4}), spec({3, 3})}, {}, "must be i32 labels"},
        {"wrong label count", {spec({3, 4}), labels({4}, 4)}, {}, "must have shape [3]"},
        {"label out of range", {spec({3, 4}), bad_labels()}, {}, "label 5 at position 1", true},
    };
  };
  registry.add(std::move(def));
}

}  // namespace

// ---- public builders -----------------------------------------------------------------------

Value pick(const Value& x, const Value& labels, std::source_location where) {
  require_valid("pick", {&x, &labels}, where);
  return x.graph().apply("pick", {x, labels}, {}, where);
}

Value pick_grad(const Value& dy, const Value& labels, std::int64_t classes,
                std::source_location where) {
  require_valid("pick_grad", {&dy, &labels}, where);
  return dy.graph().apply("pick_grad", {dy, labels}, {{"classes", classes}}, where);
}

Value logistic_loss(const Value& z, const Value& t, std::source_location where) {
  require_valid("logistic_loss", {&z, &t}, where);
  return z.graph().apply("logistic_loss", {z, t}, {}, where);
}

Value classification_error(const Value& scores, const Value& targets, std::source_location where) {
  require_valid("classification_error", {&scores, &targets}, where);
  return scores.graph().apply("classification_error", {scores, targets}, {}, where);
}

Value mse(const Value& y, const Value& t, Reduction reduction, std::optional<Value> weights,
          std::source_location where) {
  require_same_shape("mse", y, t, where);
  return reduce("mse", per_example_mean(square(sub(y, t, where), where)), reduction, weights,
                where);
}

Value sum_of_squares(const Value& y, const Value& t, Reduction reduction,
                     std::optional<Value> weights, std::source_location where) {
  require_same_shape("sum_of_squares", y, t, where);
  Value half_squares = mul(square(sub(y, t, where), where), scalar_like(y, 0.5), where);
  return reduce("sum_of_squares", per_example_sum(half_squares), reduction, weights, where);
}

Value mae(const Value& y, const Value& t, Reduction reduction, std::optional<Value> weights,
          std::source_location where) {
  require_same_shape("mae", y, t, where);
  return reduce("mae", per_example_mean(abs(sub(y, t, where), where)), reduction, weights, where);
}

Value binary_cross_entropy(const Value& p, const Value& t, Reduction reduction,
                           std::optional<Value> weights, std::source_location where) {
  require_same_shape("binary_cross_entropy", p, t, where);
  Value log_p = log(clip(p, probability_epsilon, 1.0, where), where);
  Value log_not_p = log(clip(1.0 - p, probability_epsilon, 1.0, where), where);
  Value elementwise = neg(add(mul(t, log_p, where), mul(1.0 - t, log_not_p, where), where), where);
  return reduce("binary_cross_entropy", per_example_mean(elementwise), reduction, weights, where);
}

Value binary_cross_entropy_with_logits(const Value& z, const Value& t, Reduction reduction,
                                       std::optional<Value> weights, std::source_location where) {
  require_same_shape("binary_cross_entropy_with_logits", z, t, where);
  return reduce("binary_cross_entropy_with_logits", per_example_mean(logistic_loss(z, t, where)),
                reduction, weights, where);
}

Value cross_entropy(const Value& p, const Value& t, Reduction reduction,
                    std::optional<Value> weights, std::source_location where) {
  require_same_shape("cross_entropy", p, t, where);
  if (p.rank() < 1) {
    throw ShapeError(fmt::format("cross_entropy (at {}): probabilities {} need a class axis",
                                 location(where), p.desc()));
  }
  Value log_p = log(clip(p, probability_epsilon, 1.0, where), where);
  Value per_row = neg(sum(mul(t, log_p, where), {-1}, false, where), where);
  return reduce("cross_entropy", per_example_mean(per_row), reduction, weights, where);
}

Value cross_entropy_with_logits(const Value& z, const Value& t, Reduction reduction,
                                std::optional<Value> weights, std::source_location where) {
  require_same_shape("cross_entropy_with_logits", z, t, where);
  if (z.rank() < 1) {
    throw ShapeError(fmt::format("cross_entropy_with_logits (at {}): logits {} need a class axis",
                                 location(where), z.desc()));
  }
  Value per_row = neg(sum(mul(t, log_softmax(z, -1, where), where), {-1}, false, where), where);
  return reduce("cross_entropy_with_logits", per_example_mean(per_row), reduction, weights, where);
}

Value sparse_cross_entropy(const Value& z, const Value& labels, Reduction reduction,
                           std::optional<Value> weights, std::source_location where) {
  require_valid("sparse_cross_entropy", {&z, &labels}, where);
  if (z.rank() != 2) {
    throw ShapeError(
        fmt::format("sparse_cross_entropy (at {}): logits {} must be [examples, classes]",
                    location(where), z.desc()));
  }
  if (labels.dtype() != DType::i32 || labels.shape() != Shape{z.shape()[0]}) {
    throw ShapeError(fmt::format(
        "sparse_cross_entropy (at {}): labels {} must be i32[{}] (one class index per example)",
        location(where), labels.desc(), z.shape()[0]));
  }
  Value per_example = neg(pick(log_softmax(z, -1, where), labels, where), where);
  return reduce("sparse_cross_entropy", per_example, reduction, weights, where);
}

void register_loss_ops(OpRegistry& registry) {
  register_logistic_loss(registry);
  register_pick(registry);
  register_pick_grad(registry);
  register_classification_error(registry);
}

}  // namespace dagrad
