#include "autodiff/grad.hpp"

#include <fmt/format.h>

#include <map>

#include "ops/elementwise.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"

namespace dagrad {

Value BackwardCall::grad(int i) const {
  const auto& g = output_grads[static_cast<std::size_t>(i)];
  if (g) return *g;
  return filled_like(outputs[static_cast<std::size_t>(i)], 0.0);
}

namespace {

using Key = std::pair<NodeId, int>;

struct GradientScope {
  explicit GradientScope(Graph& g) : graph(g), previous(g.building_gradient()) {
    graph.set_building_gradient(true);
  }
  ~GradientScope() { graph.set_building_gradient(previous); }
  Graph& graph;
  bool previous;
};

}  // namespace

std::vector<Value> grad(const Value& loss, const std::vector<Value>& wrt,
                        std::optional<Value> seed) {
  if (!loss.valid()) throw GraphError("grad: the loss is an empty Value");
  Graph& g = loss.graph();
  for (const auto& w : wrt) {
    if (!w.valid() || &w.graph() != &g) {
      throw GraphError(fmt::format("grad: \"{}\" is not a value of the loss's graph",
                                   w.valid() ? w.str() : "<empty>"));
    }
    if (!is_floating(w.dtype())) {
      throw GraphError(fmt::format("grad: \"{}\" is {}; only f32 and f64 values have gradients",
                                   w.str(), w.desc()));
    }
  }
  if (!is_floating(loss.dtype())) {
    throw GraphError(
        fmt::format("grad: the loss \"{}\" is {}, not floating point", loss.str(), loss.desc()));
  }
  if (seed) {
    if (!seed->valid() || &seed->graph() != &g || seed->desc() != loss.desc()) {
      throw GraphError(
          fmt::format("grad: the seed must be a value of the loss's graph with the "
                      "loss's desc {}, got {}",
                      loss.desc(), seed->valid() ? seed->desc().str() : "<empty>"));
    }
  } else if (loss.desc().numel() != 1) {
    throw GraphError(fmt::format(
        "grad: the loss \"{}\" is {}, not a scalar; reduce it (sum, mean) or pass a seed of "
        "its shape",
        loss.str(), loss.desc()));
  }

  const std::vector<Value> loss_vec{loss};
  const std::vector<NodeId> order = g.prune(loss_vec);  // what the loss depends on
  // Nodes on a path from some wrt to the loss.
  std::vector<char> active(g.size(), 0);
  for (const auto& w : wrt) active[w.node_id()] = 1;
  for (NodeId id : order) {
    const Node& n = g.node(id);
    for (const auto& v : n.inputs) {
      // Integer values computed from a wrt value (argmax) stay on the path, so that an op
      // without a gradient on it is refused below rather than yielding a silent zero.
      if (active[v.node_id()]) active[id] = 1;
    }
  }

  GradientScope scope(g);
  Graph::NameScope names(g, "grad");
  std::map<Key, Value> grads;
  grads[{loss.node_id(), loss.index()}] =
      seed ? *seed : (loss.rank() == 0 ? g.scalar(1.0, loss.dtype()) : filled_like(loss, 1.0));

  auto accumulate = [&](const Key& key, const Value& value) {
    auto it = grads.find(key);
    if (it == grads.end()) {
      grads.emplace(key, value);
    } else {
      it->second = add(it->second, value);  // fan-in: gradients sum
    }
  };

  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const Node& n = g.node(*it);
    if (n.kind != NodeKind::op || !active[n.id]) continue;
    std::vector<std::optional<Value>> output_grads(n.outputs.size());
    bool any = false;
    for (std::size_t k = 0; k < n.outputs.size(); ++k) {
      auto found = grads.find({n.id, static_cast<int>(k)});
      if (found != grads.end()) {
        output_grads[k] = found->second;
        any = true;
      }
    }
    if (!any) continue;
    std::vector<bool> needs(n.inputs.size());
    bool needed = false;
    std::string integer_origin;  // an active integer input made by an op without a gradient
    for (std::size_t i = 0; i < n.inputs.size(); ++i) {
      const Value& in = n.inputs[i];
      needs[i] = active[in.node_id()] && is_floating(in.dtype());
      needed = needed || needs[i];
      const Node& producer = g.node(in.node_id());
      if (active[in.node_id()] && !is_floating(in.dtype()) && integer_origin.empty() &&
          producer.kind == NodeKind::op && !producer.def->backward) {
        integer_origin = fmt::format(
            " (its input {} is {}, computed by {}: {})", i, in.desc(), producer.site(),
            producer.def->no_gradient.empty() ? "it has no gradient" : producer.def->no_gradient);
      }
    }
    // The node is active, so an input is on the path: an op without a gradient is refused
    // even when that input is an integer (its floating inputs, if any, need no gradient).
    if (!n.def->backward) {
      throw GraphError(fmt::format(
          "grad: cannot differentiate through {}: {}{}. Wrap its output in stop_gradient() if no "
          "gradient should flow there",
          n.site(), n.def->no_gradient.empty() ? "the op has no gradient" : n.def->no_gradient,
          integer_origin));
    }
    if (!needed) continue;
    std::vector<Value> outputs;
    for (std::size_t k = 0; k < n.outputs.size(); ++k)
      outputs.emplace_back(&g, n.id, static_cast<int>(k));
    BackwardCall call{n, g, n.inputs, outputs, output_grads, needs};
    std::vector<std::optional<Value>> input_grads;
    {
      Graph::NameScope per_node(g, n.name);
      input_grads = n.def->backward(call);
    }
    if (input_grads.size() != n.inputs.size()) {
      throw GraphError(
          fmt::format("grad: the backward rule of {} returned {} gradients for {} inputs", n.site(),
                      input_grads.size(), n.inputs.size()));
    }
    for (std::size_t i = 0; i < n.inputs.size(); ++i) {
      if (!needs[i] || !input_grads[i]) continue;
      const Value& gi = *input_grads[i];
      if (gi.desc() != n.inputs[i].desc()) {
        throw GraphError(
            fmt::format("grad: the backward rule of {} returned {} for input {}, which is {}",
                        n.site(), gi.desc(), i, n.inputs[i].desc()));
      }
      accumulate({n.inputs[i].node_id(), n.inputs[i].index()}, gi);
    }
  }

  std::vector<Value> result;
  for (const auto& w : wrt) {
    auto found = grads.find({w.node_id(), w.index()});
    // No path from w to the loss: the gradient is zero (documented above).
    result.push_back(found != grads.end() ? found->second : filled_like(w, 0.0));
  }
  return result;
}

std::vector<Value> hvp(const Value& loss, const std::vector<Value>& params,
                       const std::vector<Value>& v) {
  if (params.size() != v.size()) {
    throw GraphError(fmt::format("hvp: {} parameters but {} vectors", params.size(), v.size()));
  }
  std::vector<Value> g = grad(loss, params);
  Value dot;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (v[i].desc() != params[i].desc()) {
      throw GraphError(fmt::format("hvp: vector {} is {}, parameter \"{}\" is {}", i, v[i].desc(),
                                   params[i].str(), params[i].desc()));
    }
    Value term = sum(mul(g[i], v[i]));
    dot = dot.valid() ? add(dot, term) : term;
  }
  return grad(dot, params);
}

}  // namespace dagrad
