// The graph IR: Node, Value and Graph. A Graph owns its nodes; a Value names one output of
// one node. Shape and dtype rules run when a node is added, so a mismatch is reported at
// the line that built it. Edges live in a Boost.Graph adjacency_list, which gives the
// topological order, pruning and cycle detection.
#pragma once

#include <memory>
#include <optional>
#include <source_location>
#include <span>
#include <string>
#include <vector>

#include "graph/attrs.hpp"
#include "graph/error.hpp"
#include "graph/op_def.hpp"
#include "graph/shape.hpp"
#include "graph/tensor.hpp"

namespace dagrad {

using NodeId = std::size_t;
enum class NodeKind { input, parameter, constant, op };

class Graph;

// One output of one node. Cheap to copy; valid while its graph lives.
class Value {
 public:
  Value() = default;
  Value(Graph* graph, NodeId node, int index) : graph_(graph), node_(node), index_(index) {}

  bool valid() const { return graph_ != nullptr; }
  Graph& graph() const;
  NodeId node_id() const { return node_; }
  int index() const { return index_; }
  const Node& node() const;
  const TensorDesc& desc() const;
  const Shape& shape() const { return desc().shape; }
  DType dtype() const { return desc().dtype; }
  int rank() const { return shape().rank(); }
  std::string str() const;  // node name, with ":index" for outputs past the first

  bool operator==(const Value& other) const {
    return graph_ == other.graph_ && node_ == other.node_ && index_ == other.index_;
  }

 private:
  Graph* graph_ = nullptr;
  NodeId node_ = 0;
  int index_ = 0;
};

struct Node {
  NodeId id = 0;
  NodeKind kind = NodeKind::op;
  std::string op;              // "input", "parameter", "constant" or a registered op name
  const OpDef* def = nullptr;  // null for leaves
  std::string name;            // unique in its graph
  Attrs attrs;
  std::vector<Value> inputs;
  std::vector<TensorDesc> outputs;
  Tensor data;                 // a parameter's current value, or a constant's value
  bool trainable = false;      // parameters only
  bool batch_dynamic = false;  // inputs only: dimension 0 may differ at run time
  bool from_grad = false;      // built by grad()
  std::string where;           // "file.cpp:12" of the builder call, when known

  // `matmul "fc2"` (and ` at file:line`), for messages.
  std::string site() const;
};

class Graph {
 public:
  Graph();
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // A value fed at each run. With `batch_dynamic`, dimension 0 may change between runs
  // (the plan re-specialises for each distinct batch size: every shape rule runs again, and
  // gradients are built to follow, including concat along axis 0 and slices of it). Sizes an
  // op's attributes fix stay fixed (a reshape to a literal shape, split sizes on axis 0, a
  // slice's numeric end on axis 0): a batch they do not fit raises ShapeError at run, naming
  // the node and the feeds whose shapes differ from the declared ones. A batch_dynamic input
  // must be declared with a batch of 2 or more (GraphError otherwise): at 1, shape rules and
  // gradients cannot tell the batch axis from a broadcast axis.
  Value input(std::string name, Shape shape, DType dtype = DType::f32, bool batch_dynamic = false);
  // A named, persistent, trainable tensor; its initial value is copied.
  Value parameter(std::string name, const Tensor& initial, bool trainable = true);
  // Data held by the graph.
  Value constant(const Tensor& value, std::string name = "");
  Value scalar(double value, DType dtype = DType::f32);

  // Adds a node running op `op` on `inputs`; runs its shape rule and returns its outputs.
  // Throws ShapeError (shape rule), GraphError (unknown op, value of another graph).
  std::vector<Value> add_node(std::string_view op, std::vector<Value> inputs, Attrs attrs = {},
                              std::source_location where = std::source_location::current());
  // Same for single-output ops.
  Value apply(std::string_view op, std::vector<Value> inputs, Attrs attrs = {},
              std::source_location where = std::source_location::current());

  std::size_t size() const { return nodes_.size(); }
  const Node& node(NodeId id) const;
  Node& mutable_node(NodeId id);
  Value output(NodeId id, int index = 0) { return Value(this, id, index); }
  // The node named `name`, or GraphError.
  Value find(std::string_view name);

  std::vector<Value> inputs();
  std::vector<Value> parameters(bool trainable_only = true);
  Tensor& value_of(const Value& parameter_or_constant);

  // All nodes in a topological order (Boost.Graph); GraphError when there is a cycle.
  std::vector<NodeId> topological_order() const;
  // The nodes `outputs` depend on, in topological order.
  std::vector<NodeId> prune(std::span<const Value> outputs) const;
  // Whether `target` depends on `source` (there is a path source -> target).
  bool depends_on(NodeId target, NodeId source) const;
  // Rewires input `slot` of node `consumer` to `value`. Refuses (GraphError) a change that
  // would create a cycle or a dtype/shape mismatch.
  void set_input(NodeId consumer, int slot, Value value);

  // Graphviz DOT of the whole graph, or of what `outputs` need; shapes on the edges,
  // gradient nodes drawn apart.
  std::string to_dot(std::span<const Value> outputs = {}) const;

  // Names of nodes added while a scope lives are prefixed with "scope/".
  class NameScope {
   public:
    NameScope(Graph& graph, std::string prefix);
    ~NameScope();
    NameScope(const NameScope&) = delete;
    NameScope& operator=(const NameScope&) = delete;

   private:
    Graph& graph_;
  };
  // Gradient nodes are marked while this is set (used by grad()).
  void set_building_gradient(bool on) { building_gradient_ = on; }
  bool building_gradient() const { return building_gradient_; }

 private:
  friend class NameScope;
  std::string unique_name(std::string_view base);
  NodeId add_leaf(NodeKind kind, std::string op, std::string name, TensorDesc desc);
  void check_owned(const Value& value, std::string_view what) const;

  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<std::string> scopes_;
  bool building_gradient_ = false;
};

}  // namespace dagrad
