#include "graph/graph.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <boost/graph/adjacency_list.hpp>
#include <boost/graph/breadth_first_search.hpp>
#include <boost/graph/topological_sort.hpp>
#include <filesystem>
#include <map>
#include <set>

namespace dagrad {

// Edges run from the producer of a value to each node that reads it (one edge per input
// slot, so x*x has two parallel edges).
struct Graph::Impl {
  using Adjacency = boost::adjacency_list<boost::vecS, boost::vecS, boost::bidirectionalS,
                                          boost::no_property, int /* input slot */>;
  Adjacency adjacency;
};

Graph& Value::graph() const {
  if (graph_ == nullptr) throw GraphError("use of an empty Value (default-constructed)");
  return *graph_;
}
const Node& Value::node() const {
  return graph().node(node_);
}
const TensorDesc& Value::desc() const {
  const Node& n = node();
  return n.outputs[static_cast<std::size_t>(index_)];
}
std::string Value::str() const {
  if (!valid()) return "<empty>";
  const Node& n = node();
  return index_ == 0 ? n.name : fmt::format("{}:{}", n.name, index_);
}

std::string Node::site() const {
  std::string s = fmt::format("{} \"{}\"", op, name);
  if (!where.empty()) s += fmt::format(" (built at {})", where);
  return s;
}

const Attrs& KernelCall::attrs() const {
  return node.attrs;
}
const Attrs& BackwardCall::attrs() const {
  return node.attrs;
}

Graph::Graph() : impl_(std::make_unique<Impl>()) {}
Graph::~Graph() = default;

Graph::NameScope::NameScope(Graph& graph, std::string prefix) : graph_(graph) {
  graph_.scopes_.push_back(std::move(prefix));
}
Graph::NameScope::~NameScope() {
  graph_.scopes_.pop_back();
}

std::string Graph::unique_name(std::string_view base) {
  std::string prefix;
  for (const auto& s : scopes_) prefix += s + "/";
  std::string candidate = prefix + std::string(base);
  auto taken = [&](const std::string& name) {
    return std::any_of(nodes_.begin(), nodes_.end(),
                       [&](const auto& n) { return n->name == name; });
  };
  if (!taken(candidate)) return candidate;
  for (std::size_t i = nodes_.size();; ++i) {
    std::string numbered = fmt::format("{}_{}", candidate, i);
    if (!taken(numbered)) return numbered;
  }
}

NodeId Graph::add_leaf(NodeKind kind, std::string op, std::string name, TensorDesc desc) {
  for (auto d : desc.shape.dims()) {
    if (d < 0) {
      throw ShapeError(
          fmt::format("{} \"{}\": negative dimension in shape {}", op, name, desc.shape));
    }
  }
  auto node = std::make_unique<Node>();
  node->id = nodes_.size();
  node->kind = kind;
  node->op = std::move(op);
  node->name = std::move(name);
  node->outputs.push_back(std::move(desc));
  node->from_grad = building_gradient_;
  boost::add_vertex(impl_->adjacency);
  nodes_.push_back(std::move(node));
  return nodes_.back()->id;
}

Value Graph::input(std::string name, Shape shape, DType dtype, bool batch_dynamic) {
  for (const auto& n : nodes_) {
    if (n->name == name) {
      throw GraphError(fmt::format("input \"{}\": a node of that name already exists", name));
    }
  }
  if (batch_dynamic && shape.rank() == 0) {
    throw GraphError(
        fmt::format("input \"{}\": a scalar cannot have a dynamic batch dimension", name));
  }
  if (batch_dynamic && shape[0] == 1) {
    throw GraphError(fmt::format(
        "input \"{}\": declared {} with a dynamic batch of 1; declare a batch of 2 or more (the "
        "plan still runs batches of 1): with 1, the graph cannot tell the batch axis from a "
        "broadcast one, and gradients built for it would not follow other batch sizes",
        name, shape));
  }
  NodeId id = add_leaf(NodeKind::input, "input", std::move(name), {dtype, std::move(shape)});
  nodes_[id]->batch_dynamic = batch_dynamic;
  return Value(this, id, 0);
}

Value Graph::parameter(std::string name, const Tensor& initial, bool trainable) {
  for (const auto& n : nodes_) {
    if (n->name == name) {
      throw GraphError(fmt::format("parameter \"{}\": a node of that name already exists", name));
    }
  }
  if (!is_floating(initial.dtype())) {
    throw GraphError(
        fmt::format("parameter \"{}\": dtype must be f32 or f64, got {}", name, initial.dtype()));
  }
  std::string full = unique_name(name);
  NodeId id = add_leaf(NodeKind::parameter, "parameter", full, initial.desc());
  nodes_[id]->data = initial.clone();
  nodes_[id]->trainable = trainable;
  return Value(this, id, 0);
}

Value Graph::constant(const Tensor& value, std::string name) {
  NodeId id = add_leaf(NodeKind::constant, "constant",
                       unique_name(name.empty() ? "constant" : name), value.desc());
  nodes_[id]->data = value.clone();
  return Value(this, id, 0);
}

Value Graph::scalar(double value, DType dtype) {
  return constant(Tensor::scalar(value, dtype), "scalar");
}

void Graph::check_owned(const Value& value, std::string_view what) const {
  if (!value.valid()) throw GraphError(fmt::format("{}: an input is an empty Value", what));
  if (&value.graph() != this) {
    throw GraphError(fmt::format("{}: input \"{}\" belongs to another graph", what, value.str()));
  }
}

std::vector<Value> Graph::add_node(std::string_view op, std::vector<Value> inputs, Attrs attrs,
                                   std::source_location where) {
  const OpDef& def = op_registry().get(op);
  auto node = std::make_unique<Node>();
  node->id = nodes_.size();
  node->op = def.name;
  node->def = &def;
  node->name = unique_name(def.name);
  node->attrs = std::move(attrs);
  node->from_grad = building_gradient_;
  if (where.line() != 0) {
    node->where = fmt::format("{}:{}", std::filesystem::path(where.file_name()).filename().string(),
                              where.line());
  }
  const std::string site = node->site();
  const int count = static_cast<int>(inputs.size());
  if (count < def.min_inputs || (def.max_inputs >= 0 && count > def.max_inputs)) {
    throw GraphError(
        fmt::format("{}: takes {} inputs, {} given", site,
                    def.max_inputs == def.min_inputs
                        ? fmt::format("{}", def.min_inputs)
                        : fmt::format("{} to {}", def.min_inputs,
                                      def.max_inputs < 0 ? std::string("any")
                                                         : fmt::format("{}", def.max_inputs)),
                    count));
  }
  std::vector<TensorDesc> descs;
  for (const auto& v : inputs) {
    check_owned(v, site);
    descs.push_back(v.desc());
  }
  node->outputs = def.shape(ShapeCall{node->attrs, descs, site});
  node->inputs = std::move(inputs);
  const NodeId id = node->id;
  boost::add_vertex(impl_->adjacency);
  for (std::size_t slot = 0; slot < node->inputs.size(); ++slot) {
    boost::add_edge(node->inputs[slot].node_id(), id, static_cast<int>(slot), impl_->adjacency);
  }
  nodes_.push_back(std::move(node));
  std::vector<Value> outs;
  for (std::size_t i = 0; i < nodes_.back()->outputs.size(); ++i) {
    outs.emplace_back(this, id, static_cast<int>(i));
  }
  return outs;
}

Value Graph::apply(std::string_view op, std::vector<Value> inputs, Attrs attrs,
                   std::source_location where) {
  auto outs = add_node(op, std::move(inputs), std::move(attrs), where);
  if (outs.size() != 1) {
    throw GraphError(
        fmt::format("{}: has {} outputs; use add_node to get them all", op, outs.size()));
  }
  return outs[0];
}

const Node& Graph::node(NodeId id) const {
  if (id >= nodes_.size()) throw GraphError(fmt::format("node id {} is out of range", id));
  return *nodes_[id];
}
Node& Graph::mutable_node(NodeId id) {
  if (id >= nodes_.size()) throw GraphError(fmt::format("node id {} is out of range", id));
  return *nodes_[id];
}

Value Graph::find(std::string_view name) {
  for (const auto& n : nodes_) {
    if (n->name == name) return Value(this, n->id, 0);
  }
  throw GraphError(fmt::format("no node named \"{}\" in the graph", name));
}

std::vector<Value> Graph::inputs() {
  std::vector<Value> out;
  for (const auto& n : nodes_) {
    if (n->kind == NodeKind::input) out.emplace_back(this, n->id, 0);
  }
  return out;
}

std::vector<Value> Graph::parameters(bool trainable_only) {
  std::vector<Value> out;
  for (const auto& n : nodes_) {
    if (n->kind == NodeKind::parameter && (n->trainable || !trainable_only)) {
      out.emplace_back(this, n->id, 0);
    }
  }
  return out;
}

Tensor& Graph::value_of(const Value& value) {
  check_owned(value, "Graph::value_of");
  Node& n = mutable_node(value.node_id());
  if (n.kind != NodeKind::parameter && n.kind != NodeKind::constant) {
    throw GraphError(fmt::format("\"{}\" is a {}, not a parameter or constant: it holds no value",
                                 n.name, n.op));
  }
  return n.data;
}

std::vector<NodeId> Graph::topological_order() const {
  std::vector<Impl::Adjacency::vertex_descriptor> reversed;
  try {
    boost::topological_sort(impl_->adjacency, std::back_inserter(reversed));
  } catch (const boost::not_a_dag&) {
    throw GraphError(
        "the graph has a cycle: a node depends on its own output; check set_input calls");
  }
  return std::vector<NodeId>(reversed.rbegin(), reversed.rend());
}

std::vector<NodeId> Graph::prune(std::span<const Value> outputs) const {
  std::vector<char> needed(nodes_.size(), 0);
  std::vector<NodeId> stack;
  for (const auto& v : outputs) {
    check_owned(v, "prune");
    stack.push_back(v.node_id());
  }
  while (!stack.empty()) {
    NodeId id = stack.back();
    stack.pop_back();
    if (needed[id]) continue;
    needed[id] = 1;
    for (auto [e, end] = boost::in_edges(id, impl_->adjacency); e != end; ++e) {
      stack.push_back(boost::source(*e, impl_->adjacency));
    }
  }
  std::vector<NodeId> order;
  for (NodeId id : topological_order()) {
    if (needed[id]) order.push_back(id);
  }
  return order;
}

bool Graph::depends_on(NodeId target, NodeId source) const {
  if (target == source) return true;
  std::vector<char> seen(nodes_.size(), 0);
  std::vector<NodeId> stack{source};
  while (!stack.empty()) {
    NodeId id = stack.back();
    stack.pop_back();
    if (id == target) return true;
    if (seen[id]) continue;
    seen[id] = 1;
    for (auto [e, end] = boost::out_edges(id, impl_->adjacency); e != end; ++e) {
      stack.push_back(boost::target(*e, impl_->adjacency));
    }
  }
  return false;
}

void Graph::set_input(NodeId consumer, int slot, Value value) {
  Node& n = mutable_node(consumer);
  check_owned(value, n.site());
  if (slot < 0 || slot >= static_cast<int>(n.inputs.size())) {
    throw GraphError(
        fmt::format("{}: has no input slot {} (it has {})", n.site(), slot, n.inputs.size()));
  }
  if (depends_on(value.node_id(), consumer)) {
    throw GraphError(fmt::format(
        "{}: setting input {} to \"{}\" would create a cycle (\"{}\" depends on this node)",
        n.site(), slot, value.str(), value.str()));
  }
  const TensorDesc& old_desc = n.inputs[static_cast<std::size_t>(slot)].desc();
  if (value.desc() != old_desc) {
    throw GraphError(fmt::format("{}: input {} is {}, the replacement \"{}\" is {}", n.site(), slot,
                                 old_desc, value.str(), value.desc()));
  }
  auto& adjacency = impl_->adjacency;
  const NodeId old_source = n.inputs[static_cast<std::size_t>(slot)].node_id();
  for (auto [e, end] = boost::in_edges(consumer, adjacency); e != end; ++e) {
    if (adjacency[*e] == slot && boost::source(*e, adjacency) == old_source) {
      boost::remove_edge(*e, adjacency);
      break;
    }
  }
  boost::add_edge(value.node_id(), consumer, slot, adjacency);
  n.inputs[static_cast<std::size_t>(slot)] = value;
}

std::string Graph::to_dot(std::span<const Value> outputs) const {
  std::vector<NodeId> ids;
  if (outputs.empty()) {
    for (const auto& n : nodes_) ids.push_back(n->id);
  } else {
    ids = prune(outputs);
  }
  auto escape = [](const std::string& s) {
    std::string out;
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out;
  };
  std::string dot = "digraph dagrad {\n  rankdir=TB;\n  node [fontname=\"Helvetica\"];\n";
  for (NodeId id : ids) {
    const Node& n = *nodes_[id];
    std::string shape = "box";
    std::string style = "filled";
    std::string color = n.from_grad ? "#fde2c8" : "#dbe8f7";
    if (n.kind == NodeKind::input) {
      shape = "ellipse";
      color = "#e2f0d9";
    } else if (n.kind == NodeKind::parameter) {
      shape = "ellipse";
      color = "#fff2cc";
    } else if (n.kind == NodeKind::constant) {
      shape = "ellipse";
      color = "#eeeeee";
    }
    std::string label = n.name;
    if (n.kind == NodeKind::op && n.name.find(n.op) == std::string::npos) label += "\\n" + n.op;
    if (!n.attrs.items().empty()) label += "\\n" + escape(n.attrs.str());
    if (n.kind != NodeKind::op) label += "\\n" + n.outputs[0].str();
    dot += fmt::format("  n{} [label=\"{}\", shape={}, style={}, fillcolor=\"{}\"];\n", id,
                       escape(label), shape, style, color);
  }
  for (NodeId id : ids) {
    const Node& n = *nodes_[id];
    for (std::size_t slot = 0; slot < n.inputs.size(); ++slot) {
      const Value& v = n.inputs[slot];
      dot += fmt::format("  n{} -> n{} [label=\"{}\"];\n", v.node_id(), id, v.desc().str());
    }
  }
  for (const auto& v : outputs) {
    dot += fmt::format("  out_{}_{} [label=\"{}\", shape=plaintext];\n  n{} -> out_{}_{};\n",
                       v.node_id(), v.index(), v.desc().str(), v.node_id(), v.node_id(), v.index());
  }
  dot += "}\n";
  return dot;
}

}  // namespace dagrad
