#include "runtime/fusion.hpp"

#include <algorithm>
#include <optional>
#include <set>
#include <span>

#include "ops/conv_kernels.hpp"
#include "ops/cross_entropy_kernels.hpp"
#include "ops/small_gemm.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

bool is_last_two_swap(const Node& n) {
  if (n.op != "transpose") return false;
  const auto& perm = n.attrs.integers("perm");
  return perm.size() == 2 && perm[0] == 1 && perm[1] == 0;
}

std::optional<dnnl::algorithm> eltwise_algorithm(const std::string& op) {
  if (op == "relu") return dnnl::algorithm::eltwise_relu;
  if (op == "tanh") return dnnl::algorithm::eltwise_tanh;
  if (op == "sigmoid") return dnnl::algorithm::eltwise_logistic;
  return std::nullopt;
}

// The single op node reading `key`, when exactly one input slot in the plan reads it.
const Node* sole_consumer(const FusionContext& c, const ValueKey& key) {
  auto it = c.consumers.find(key);
  if (it == c.consumers.end() || it->second != 1 || c.is_output(key)) return nullptr;
  for (NodeId id : c.order) {
    const Node& n = c.graph.node(id);
    for (const auto& v : n.inputs) {
      if (v.node_id() == key.first && v.index() == key.second) return &n;
    }
  }
  return nullptr;
}

// md for operand `v` of a matmul: its own plain md, or (folded) the transpose's source read
// through swapped strides.
struct Operand {
  ValueKey source;
  dnnl::memory::desc md;
  bool folded = false;
};

Operand matmul_operand(const FusionContext& c, const Value& v) {
  const Node& producer = c.graph.node(v.node_id());
  const TensorDesc& desc = c.descs.at({v.node_id(), v.index()});
  if (is_last_two_swap(producer) && desc.dtype == DType::f32) {
    const Value& source = producer.inputs[0];
    const TensorDesc& src_desc = c.descs.at({source.node_id(), source.index()});
    // source is [k, m] row-major; the operand [m, k] has strides {1, m}.
    dnnl::memory::desc md({desc.shape[0], desc.shape[1]}, dnnl::memory::data_type::f32,
                          dnnl::memory::dims{1, src_desc.shape[1]});
    return {{source.node_id(), source.index()}, md, true};
  }
  return {{v.node_id(), v.index()}, plain_md(desc), false};
}

// Bytes a fused step reads and writes: its inputs and the anchor's outputs.
std::size_t step_bytes(const FusionContext& c, const std::vector<ValueKey>& inputs, NodeId anchor) {
  std::size_t bytes = 0;
  for (const auto& key : inputs) bytes += c.descs.at(key).bytes();
  const Node& n = c.graph.node(anchor);
  for (std::size_t k = 0; k < n.outputs.size(); ++k) {
    bytes += c.descs.at({anchor, static_cast<int>(k)}).bytes();
  }
  return bytes;
}

// Whether n is sum(dy) over axes 0, 2 and 3 of a 4-D dy (a convolution's bias gradient).
bool is_channel_sum(const FusionContext& c, const Node& n, const ValueKey& dy) {
  if (n.op != "sum" || n.inputs.size() != 1 || n.inputs[0].node_id() != dy.first ||
      n.inputs[0].index() != dy.second || c.descs.at(dy).shape.rank() != 4) {
    return false;
  }
  std::vector<std::int64_t> axes;
  for (std::int64_t axis : n.attrs.integers("axes")) axes.push_back(axis < 0 ? axis + 4 : axis);
  std::sort(axes.begin(), axes.end());
  return axes == std::vector<std::int64_t>{0, 2, 3};
}

// The bias value when `add` adds a row (f32 [n_cols] or [1, n_cols]) to the output of
// `product`, which a matmul primitive can take as its bias argument.
std::optional<Value> row_bias(const FusionContext& c, const Node& add, NodeId product,
                              std::int64_t n_cols) {
  if (add.op != "add" || add.inputs.size() != 2 ||
      add.inputs[0].node_id() == add.inputs[1].node_id()) {
    return std::nullopt;
  }
  const Value& bias = add.inputs[add.inputs[0].node_id() == product ? 1 : 0];
  const TensorDesc& desc = c.descs.at({bias.node_id(), bias.index()});
  const bool row = desc.dtype == DType::f32 &&
                   ((desc.shape.rank() == 1 && desc.shape[0] == n_cols) ||
                    (desc.shape.rank() == 2 && desc.shape[0] == 1 && desc.shape[1] == n_cols));
  if (!row) return std::nullopt;
  return bias;
}

}  // namespace

std::vector<FusedStep> plan_fusions(const FusionContext& c, std::vector<NodeId>& dropped) {
  std::vector<FusedStep> fused;
  std::set<NodeId> taken;
  std::map<NodeId, int> folds;  // transpose node -> number of matmuls that fold it

  std::map<NodeId, std::size_t> position;
  for (std::size_t i = 0; i < c.order.size(); ++i) position[c.order[i]] = i;
  auto key_of = [](const Value& v) { return ValueKey{v.node_id(), v.index()}; };
  // Everything a step placed at `first` reads must exist by then.
  auto ready_at = [&](std::size_t first, const std::vector<ValueKey>& inputs) {
    return std::all_of(inputs.begin(), inputs.end(), [&](const ValueKey& key) {
      return c.graph.node(key.first).kind != NodeKind::op || position.at(key.first) < first;
    });
  };

  auto same_convolution = [](const Node& a, const Node& b) {
    for (const char* key : {"stride", "padding", "dilation"}) {
      if (a.attrs.integers(key) != b.attrs.integers(key)) return false;
    }
    return a.attrs.integer("groups") == b.attrs.integer("groups");
  };
  // A step writing several nodes' outputs, run at position `first` of the order: its kernel
  // comes from make(input descs, output descs), created under the step's thread count (sized
  // by `inputs` and `sized_by`'s outputs). nullopt when an input does not exist yet at `first`
  // or make refuses (nullptr).
  auto multi_output_step = [&](std::size_t first, std::vector<ValueKey> inputs,
                               std::vector<ValueKey> outputs, NodeId sized_by,
                               const auto& make) -> std::optional<FusedStep> {
    if (!ready_at(first, inputs)) return std::nullopt;
    std::vector<TensorDesc> in, out;
    for (const auto& key : inputs) in.push_back(c.descs.at(key));
    for (const auto& key : outputs) out.push_back(c.descs.at(key));
    FusedStep step;
    step.threads = step_threads(step_bytes(c, inputs, sized_by), c.single_thread_below_bytes);
    const ThreadScope threads(step.threads);
    step.kernel = make(std::span<const TensorDesc>(in), std::span<const TensorDesc>(out));
    if (!step.kernel) return std::nullopt;
    step.anchor = c.order[first];
    step.inputs = std::move(inputs);
    step.outputs = std::move(outputs);
    return step;
  };

  // The node `v` comes from when its op is `op`, it is not taken, and `reader` is the only
  // step reading v.
  auto absorbable = [&](const Value& v, const char* op, const Node* reader) -> const Node* {
    const Node& n = c.graph.node(v.node_id());
    if (n.kind != NodeKind::op || n.op != op || taken.count(n.id) ||
        sole_consumer(c, key_of(v)) != reader) {
      return nullptr;
    }
    return &n;
  };
  // The first node not yet taken that runs `op` on `key` as its input `slot`.
  auto reader_of = [&](const ValueKey& key, const char* op, std::size_t slot) -> const Node* {
    for (NodeId other : c.order) {
      const Node& n = c.graph.node(other);
      if (n.kind == NodeKind::op && n.op == op && !taken.count(other) && n.inputs.size() > slot &&
          key_of(n.inputs[slot]) == key) {
        return &n;
      }
    }
    return nullptr;
  };
  auto is_f32_one = [&](const ValueKey& key) {
    const TensorDesc& desc = c.descs.at(key);
    return desc.dtype == DType::f32 && desc.shape.numel() == 1;
  };
  auto rows_of_f32_matrix = [&](const Value& v, std::int64_t axis) {
    const TensorDesc& desc = c.descs.at(key_of(v));
    return desc.dtype == DType::f32 && desc.shape.rank() == 2 && (axis == 1 || axis == -1);
  };

  // Sparse cross-entropy's forward, log_softmax along the rows -> pick [-> neg [-> mean]], as
  // one pass of dagrad's kernel (ops/cross_entropy_kernels.hpp). The pass writes every value
  // along the chain (a few floats per row besides y), so whatever else reads them still can.
  for (NodeId id : c.order) {
    const Node& log_softmax = c.graph.node(id);
    if (log_softmax.kind != NodeKind::op || log_softmax.op != "log_softmax" || taken.count(id) ||
        !rows_of_f32_matrix(log_softmax.inputs[0], log_softmax.attrs.integer("axis"))) {
      continue;
    }
    const Node* pick = reader_of({id, 0}, "pick", 0);
    if (pick == nullptr) continue;
    const Node* neg = reader_of({pick->id, 0}, "neg", 0);
    const Node* mean = neg ? reader_of({neg->id, 0}, "mean", 0) : nullptr;
    if (mean && !is_f32_one({mean->id, 0})) mean = nullptr;
    std::vector<ValueKey> outputs{{id, 0}, {pick->id, 0}};
    for (const Node* n : {neg, mean}) {
      if (n) outputs.emplace_back(n->id, 0);
    }
    const PickTail tail = mean ? PickTail::neg_mean : neg ? PickTail::neg : PickTail::none;
    const Shape& z = c.descs.at(key_of(log_softmax.inputs[0])).shape;
    std::optional<FusedStep> made = multi_output_step(
        position.at(id), {key_of(log_softmax.inputs[0]), key_of(pick->inputs[1])},
        std::move(outputs), id,
        [&](auto, auto) { return log_softmax_pick_kernel(z[0], z[1], tail, pick->site()); });
    if (!made) continue;
    FusedStep& step = *made;
    step.pattern = "log_softmax";
    taken.insert(id);
    for (const Node* n : {pick, neg, mean}) {
      if (n == nullptr) continue;
      step.pattern += "+" + n->op;
      step.absorbed.push_back(n->id);
      taken.insert(n->id);
    }
    fused.push_back(std::move(step));
  }
  // Its backward, [div(a, b) [-> reshape] -> broadcast_to |] [neg ->] pick_grad ->
  // log_softmax_grad: dz = ±d_i ([j = label_i] − e^y), one pass of dagrad's kernel.
  for (NodeId id : c.order) {
    const Node& grad = c.graph.node(id);
    if (grad.kind != NodeKind::op || grad.op != "log_softmax_grad" || taken.count(id) ||
        !rows_of_f32_matrix(grad.inputs[1], grad.attrs.integer("axis"))) {
      continue;
    }
    const Node* pick_grad = absorbable(grad.inputs[0], "pick_grad", &grad);
    if (pick_grad == nullptr || c.descs.at(key_of(pick_grad->inputs[0])).dtype != DType::f32)
      continue;
    std::vector<const Node*> chain{pick_grad};
    Value d = pick_grad->inputs[0];
    const Node* neg = absorbable(d, "neg", pick_grad);
    if (neg) {
      chain.push_back(neg);
      d = neg->inputs[0];
    }
    RowFactor factor = RowFactor::vector;
    std::vector<ValueKey> inputs{key_of(grad.inputs[1]), key_of(pick_grad->inputs[1]), key_of(d)};
    if (const Node* spread = absorbable(d, "broadcast_to", chain.back());
        spread && is_f32_one(key_of(spread->inputs[0]))) {
      chain.push_back(spread);
      factor = RowFactor::scalar;
      Value s = spread->inputs[0];
      inputs.back() = key_of(s);
      const Node* reshape = absorbable(s, "reshape", spread);
      if (reshape) s = reshape->inputs[0];
      const Node* div = absorbable(s, "div", reshape ? reshape : spread);
      if (div && is_f32_one(key_of(div->inputs[0])) && is_f32_one(key_of(div->inputs[1]))) {
        if (reshape) chain.push_back(reshape);
        chain.push_back(div);
        factor = RowFactor::quotient;
        inputs.back() = key_of(div->inputs[0]);
        inputs.push_back(key_of(div->inputs[1]));
      }
    }
    const Shape& y = c.descs.at(inputs[0]).shape;
    std::optional<FusedStep> made =
        multi_output_step(position.at(id), std::move(inputs), {{id, 0}}, id, [&](auto, auto) {
          return pick_log_softmax_grad_kernel(y[0], y[1], factor, neg != nullptr,
                                              pick_grad->site());
        });
    if (!made) continue;
    FusedStep& step = *made;
    step.pattern.clear();
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      step.pattern += (*it)->op + "+";
      step.absorbed.push_back((*it)->id);
      taken.insert((*it)->id);
    }
    step.pattern += "log_softmax_grad";
    taken.insert(id);
    fused.push_back(std::move(step));
  }

  // A dense layer's weight gradient dW = xᵀ dy at a small batch (K ≤ small_k_limit), and its
  // bias gradient sum(dy, {0}) when there is one: dagrad's own kernel, which sums in registers
  // without packing the operands first (faster than oneDNN's SGEMM there), in one step.
  for (NodeId id : c.order) {
    const Node& m = c.graph.node(id);
    if (m.kind != NodeKind::op || m.op != "matmul" || taken.count(id)) continue;
    const TensorDesc& a_desc = c.descs.at(key_of(m.inputs[0]));
    const TensorDesc& b_desc = c.descs.at(key_of(m.inputs[1]));
    if (a_desc.dtype != DType::f32 || b_desc.dtype != DType::f32 || a_desc.shape.rank() != 2 ||
        b_desc.shape.rank() != 2) {
      continue;
    }
    const Operand a = matmul_operand(c, m.inputs[0]);
    const Operand b = matmul_operand(c, m.inputs[1]);
    if (!a.folded || b.folded) continue;
    const std::int64_t rows = a_desc.shape[0], depth = a_desc.shape[1], cols = b_desc.shape[1];
    // A bias row added to the product, or an activation: the matmul loop below fuses those.
    const Node* next = sole_consumer(c, {id, 0});
    if (next && (row_bias(c, *next, id, cols) || eltwise_algorithm(next->op))) continue;
    const ValueKey dy = key_of(m.inputs[1]);
    const Node* bias = nullptr;
    for (NodeId other : c.order) {
      const Node& n = c.graph.node(other);
      if (n.kind == NodeKind::op && n.op == "sum" && !taken.count(other) && n.inputs.size() == 1 &&
          key_of(n.inputs[0]) == dy && n.attrs.integers("axes").size() == 1 &&
          (n.attrs.integers("axes")[0] == 0 || n.attrs.integers("axes")[0] == -2) &&
          c.descs.at({other, 0}).dtype == DType::f32 &&
          c.descs.at({other, 0}).shape.numel() == cols) {
        bias = &n;
        break;
      }
    }
    // With the plan's SGDUpdate: when dW (and the bias gradient) are only the update's, the
    // kernel updates the parameters in place and writes neither. Not when an operand is itself
    // a parameter the update changes (update steps read no other update's parameter).
    const auto read_only = [&](const ValueKey& key) {
      return c.graph.node(key.first).kind != NodeKind::parameter || !c.is_updated(key.first);
    };
    const std::optional<NodeId> weights = c.sole_update({id, 0});
    std::optional<NodeId> bias_param;
    const Node* bias_view = nullptr;  // reshape(sum) to the bias's shape, as grad() builds it
    if (bias) {
      bias_param = c.sole_update({bias->id, 0});
      const Node* reader = sole_consumer(c, {bias->id, 0});
      if (!bias_param && reader != nullptr && reader->op == "reshape") {
        bias_param = c.sole_update({reader->id, 0});
        if (bias_param) bias_view = reader;
      }
    }
    const bool update =
        weights && (!bias || bias_param) && read_only(a.source) && read_only(b.source);
    std::vector<ValueKey> inputs{a.source, b.source};
    std::vector<ValueKey> outputs;
    if (update) {
      inputs.emplace_back(*weights, 0);
      if (bias) inputs.emplace_back(*bias_param, 0);
    } else {
      outputs.emplace_back(id, 0);
      if (bias) outputs.emplace_back(bias->id, 0);
    }
    std::size_t first = position.at(id);
    if (bias) first = std::min(first, position.at(bias->id));
    std::optional<FusedStep> made =
        multi_output_step(first, std::move(inputs), std::move(outputs), id, [&](auto, auto) {
          return transposed_a_small_k_kernel(
              rows, depth, cols, bias != nullptr,
              {.weights = update,
               .bias = update && bias,
               .rule = c.rule,
               .weights_velocity = update ? c.velocity_of(*weights) : nullptr,
               .bias_velocity = update && bias ? c.velocity_of(*bias_param) : nullptr});
        });
    if (!made) continue;
    FusedStep& step = *made;
    step.pattern =
        bias ? "transposed-A matmul (small batch)+sum" : "transposed-A matmul (small batch)";
    if (update) {
      step.pattern += "+sgd";
      step.updated.push_back(*weights);
      if (bias) step.updated.push_back(*bias_param);
      if (bias_view) {
        step.absorbed.push_back(bias_view->id);
        taken.insert(bias_view->id);
      }
    }
    for (const Node* n : {&m, bias}) {
      if (n == nullptr) continue;
      if (n->id != step.anchor) step.absorbed.push_back(n->id);
      taken.insert(n->id);
    }
    ++folds[m.inputs[0].node_id()];
    fused.push_back(std::move(step));
  }

  for (NodeId id : c.order) {
    const Node& m = c.graph.node(id);
    if (m.kind != NodeKind::op || m.op != "matmul" || taken.count(id)) continue;
    const TensorDesc& a_desc = c.descs.at({m.inputs[0].node_id(), m.inputs[0].index()});
    const TensorDesc& b_desc = c.descs.at({m.inputs[1].node_id(), m.inputs[1].index()});
    if (a_desc.dtype != DType::f32 || a_desc.shape.rank() != 2 || b_desc.shape.rank() != 2)
      continue;

    Operand a = matmul_operand(c, m.inputs[0]);
    Operand b = matmul_operand(c, m.inputs[1]);
    FusedStep step;
    step.anchor = id;
    step.inputs = {a.source, b.source};
    std::vector<NodeId> chain;
    std::string pattern = "matmul";
    const std::int64_t n_cols = c.descs.at({id, 0}).shape[1];

    // [+ bias row]. Not an add another product already took: at batch 1, the sum of two
    // products [1, N] (a layer input read by two dense layers: dx = dz₁ W₁ᵀ + dz₂ W₂ᵀ) looks like
    // product + bias row from either side, and fusing both would leave the second product
    // absorbed into a step whose input it is (found by tests/test_random_models.cpp).
    std::optional<dnnl::memory::desc> bias_md;
    const Node* next = sole_consumer(c, {id, 0});
    if (next && taken.count(next->id)) next = nullptr;
    if (next && next->op == "add") {
      if (const std::optional<Value> bias = row_bias(c, *next, id, n_cols)) {
        bias_md = dnnl::memory::desc({1, n_cols}, dnnl::memory::data_type::f32,
                                     dnnl::memory::format_tag::ab);
        step.inputs.push_back({bias->node_id(), bias->index()});
        chain.push_back(next->id);
        pattern += "+bias";
        next = sole_consumer(c, {next->id, 0});
      } else {
        next = nullptr;
      }
    }
    // [+ eltwise]
    dnnl::post_ops post_ops;
    if (next && !taken.count(next->id) && eltwise_algorithm(next->op) && next->inputs.size() == 1) {
      post_ops.append_eltwise(1.f, *eltwise_algorithm(next->op), 0.f, 0.f);
      chain.push_back(next->id);
      pattern += "+" + next->op;
    }
    if (chain.empty() && !a.folded && !b.folded) continue;  // nothing gained

    const NodeId anchor = chain.empty() ? id : chain.back();
    step.threads = step_threads(step_bytes(c, step.inputs, anchor), c.single_thread_below_bytes);
    const ThreadScope threads(step.threads);
    auto dst_md = plain_md(c.descs.at({anchor, 0}));
    dnnl::primitive_attr attr;
    attr.set_post_ops(post_ops);
    dnnl::matmul::desc desc = bias_md ? dnnl::matmul::desc(a.md, b.md, *bias_md, dst_md)
                                      : dnnl::matmul::desc(a.md, b.md, dst_md);
    dnnl::matmul::primitive_desc pd(desc, attr, cpu_engine());
    std::vector<PrimitiveArg> args{input_arg(DNNL_ARG_SRC, 0, a.md),
                                   input_arg(DNNL_ARG_WEIGHTS, 1, b.md),
                                   output_arg(DNNL_ARG_DST, 0, dst_md)};
    if (bias_md) args.push_back(input_arg(DNNL_ARG_BIAS, 2, *bias_md));
    step.kernel = std::make_unique<PrimitiveKernel>(dnnl::matmul(pd), std::move(args));
    step.anchor = anchor;
    if (a.folded) {
      ++folds[m.inputs[0].node_id()];
      pattern = "transposed-A " + pattern;
    }
    if (b.folded) {
      ++folds[m.inputs[1].node_id()];
      pattern = "transposed-B " + pattern;
    }
    step.pattern = pattern;
    if (anchor != id) step.absorbed.push_back(id);
    for (NodeId n : chain) {
      if (n != anchor) step.absorbed.push_back(n);
      taken.insert(n);
    }
    taken.insert(id);
    fused.push_back(std::move(step));
  }
  // conv -> relu -> 2x2 max pooling: the convolution's weights gradient, and its bias gradient
  // sum(dy, {0, 2, 3}) and data gradient when there are, read the pooling's gradient dp instead
  // of dy = relu_grad(max_pool2d_backward(dp, r), r), skipping dy's zeros. When nothing else
  // reads dy, dy is not computed at all.
  for (NodeId id : c.order) {
    const Node& weights = c.graph.node(id);
    if (weights.kind != NodeKind::op || weights.op != "conv2d_backward_weights" ||
        taken.count(id)) {
      continue;
    }
    const ValueKey dy = key_of(weights.inputs[1]);
    const Node& mask = c.graph.node(dy.first);
    if (mask.kind != NodeKind::op || mask.op != "relu_grad" || mask.inputs.size() != 2 ||
        taken.count(mask.id) || c.is_output(dy)) {
      continue;
    }
    const Node& pool = c.graph.node(mask.inputs[0].node_id());
    if (pool.kind != NodeKind::op || pool.op != "max_pool2d_backward" || taken.count(pool.id) ||
        key_of(pool.inputs[1]) != key_of(mask.inputs[1])) {
      continue;
    }
    const Node* bias = nullptr;
    for (NodeId other : c.order) {
      const Node& n = c.graph.node(other);
      if (n.kind == NodeKind::op && !taken.count(other) && is_channel_sum(c, n, dy)) {
        bias = &n;
        break;
      }
    }
    // The data gradient of the same convolution: conv2d_backward_data(dy, w).
    const Node* data = nullptr;
    for (NodeId other : c.order) {
      const Node& n = c.graph.node(other);
      if (n.kind == NodeKind::op && n.op == "conv2d_backward_data" && !taken.count(other) &&
          key_of(n.inputs[0]) == dy && same_convolution(n, weights) &&
          c.descs.at({other, 0}) == c.descs.at(key_of(weights.inputs[0])) &&
          c.descs.at(key_of(n.inputs[1])) == c.descs.at({id, 0})) {
        data = &n;
        break;
      }
    }
    std::vector<ValueKey> inputs{key_of(pool.inputs[0]), key_of(pool.inputs[1]),
                                 key_of(weights.inputs[0])};
    std::vector<ValueKey> outputs{{id, 0}};
    std::size_t first = position.at(id);
    for (const Node* n : {bias, data}) {
      if (n == nullptr) continue;
      outputs.emplace_back(n->id, 0);
      first = std::min(first, position.at(n->id));
    }
    if (data) inputs.push_back(key_of(data->inputs[1]));
    std::optional<FusedStep> made =
        multi_output_step(first, std::move(inputs), std::move(outputs), id, [&](auto in, auto out) {
          return pooled_relu_gradients_kernel(KernelBuild{weights, in, out, cpu_engine()}, pool,
                                              bias != nullptr, data != nullptr);
        });
    if (!made) continue;
    FusedStep& step = *made;
    step.pattern = "max_pool2d_backward+relu_grad+conv2d_backward_weights";
    if (data) step.pattern += "+data";
    if (bias) step.pattern += "+sum";
    for (const Node* n : {&weights, bias, data}) {
      if (n == nullptr) continue;
      if (n->id != step.anchor) step.absorbed.push_back(n->id);
      taken.insert(n->id);
    }
    // dy's readers were these nodes only: relu_grad and max_pool2d_backward (when relu_grad is
    // its only reader) are not needed any more.
    const int dy_readers = c.consumers.at(dy);
    if (dy_readers == static_cast<int>(1 + (bias ? 1 : 0) + (data ? 1 : 0))) {
      dropped.push_back(mask.id);
      taken.insert(mask.id);
      const ValueKey pooled{pool.id, 0};
      if (c.consumers.at(pooled) == 1 && !c.is_output(pooled)) {
        dropped.push_back(pool.id);
        taken.insert(pool.id);
      }
    }
    fused.push_back(std::move(step));
  }

  // An op that absorbs its only reader through its OpDef::fuse_consumer hook (conv2d + relu,
  // max_pool2d_backward + relu_grad, ...).
  for (NodeId id : c.order) {
    const Node& n = c.graph.node(id);
    if (n.kind != NodeKind::op || taken.count(id) || !n.def->fuse_consumer ||
        n.outputs.size() != 1) {
      continue;
    }
    const Node* consumer = sole_consumer(c, {id, 0});
    if (consumer == nullptr || taken.count(consumer->id)) continue;
    std::vector<ValueKey> keys;
    std::vector<TensorDesc> in, out;
    for (const auto& v : n.inputs) {
      keys.emplace_back(v.node_id(), v.index());
      in.push_back(c.descs.at(keys.back()));
    }
    for (std::size_t k = 0; k < consumer->outputs.size(); ++k) {
      out.push_back(c.descs.at({consumer->id, static_cast<int>(k)}));
    }
    const int step_threads_count =
        step_threads(step_bytes(c, keys, consumer->id), c.single_thread_below_bytes);
    const ThreadScope threads(step_threads_count);
    std::unique_ptr<Kernel> kernel =
        n.def->fuse_consumer(KernelBuild{n, in, out, cpu_engine()}, *consumer);
    if (!kernel) continue;
    FusedStep step;
    step.threads = step_threads_count;
    step.anchor = consumer->id;
    step.inputs = std::move(keys);
    step.kernel = std::move(kernel);
    step.absorbed = {id};
    step.pattern = n.op + "+" + consumer->op;
    taken.insert(id);
    taken.insert(consumer->id);
    fused.push_back(std::move(step));
  }
  // A convolution's backward: conv2d_backward_weights(x, dy) and conv2d_backward_data(dy, w)
  // of the same convolution as one kernel that reorders dy once.
  for (NodeId id : c.order) {
    const Node& weights = c.graph.node(id);
    if (weights.kind != NodeKind::op || weights.op != "conv2d_backward_weights" ||
        taken.count(id)) {
      continue;
    }
    const ValueKey x = key_of(weights.inputs[0]), dy = key_of(weights.inputs[1]);
    const Node* data = nullptr;
    for (NodeId other : c.order) {
      const Node& n = c.graph.node(other);
      if (n.kind == NodeKind::op && n.op == "conv2d_backward_data" && !taken.count(other) &&
          key_of(n.inputs[0]) == dy && same_convolution(n, weights) &&
          c.descs.at({other, 0}) == c.descs.at(x) &&
          c.descs.at(key_of(n.inputs[1])) == c.descs.at({id, 0})) {
        data = &n;
        break;
      }
    }
    if (data == nullptr) continue;
    // The step runs where the first of the two ran; everything it reads must exist by then.
    const std::size_t first = std::min(position.at(id), position.at(data->id));
    std::optional<FusedStep> made = multi_output_step(
        first, {x, dy, key_of(data->inputs[1])}, {{id, 0}, {data->id, 0}}, id,
        [&](auto in, auto out) {
          return conv_backward_fused_kernel(KernelBuild{weights, in, out, cpu_engine()});
        });
    if (!made) continue;
    FusedStep& step = *made;
    step.pattern = "conv2d_backward_weights+data";
    step.absorbed.push_back(step.anchor == id ? data->id : id);
    taken.insert(id);
    taken.insert(data->id);
    fused.push_back(std::move(step));
  }
  // A transpose whose every reader folded it is no longer executed.
  for (const auto& [transpose, count] : folds) {
    auto it = c.consumers.find({transpose, 0});
    if (it != c.consumers.end() && it->second == count && !c.is_output({transpose, 0})) {
      dropped.push_back(transpose);
    }
  }
  return fused;
}

}  // namespace dagrad
