#include "runtime/plan.hpp"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <list>
#include <optional>
#include <set>

#include "ops/sgd_update.hpp"
#include "runtime/fusion.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

namespace {

constexpr std::size_t align_up(std::size_t bytes) {
  return (bytes + Tensor::alignment - 1) / Tensor::alignment * Tensor::alignment;
}

// First-fit allocator over one arena, with coalescing of freed neighbours.
class ArenaPlanner {
 public:
  std::size_t allocate(std::size_t bytes) {
    bytes = std::max<std::size_t>(align_up(bytes), Tensor::alignment);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second >= bytes) {
        std::size_t offset = it->first;
        it->first += bytes;
        it->second -= bytes;
        if (it->second == 0) free_.erase(it);
        return offset;
      }
    }
    // Grow the arena; a free block at the end is extended instead of left behind.
    if (!free_.empty() && free_.back().first + free_.back().second == size_) {
      std::size_t offset = free_.back().first;
      size_ = offset + bytes;
      free_.pop_back();
      return offset;
    }
    std::size_t offset = size_;
    size_ += bytes;
    return offset;
  }
  void release(std::size_t offset, std::size_t bytes) {
    bytes = std::max<std::size_t>(align_up(bytes), Tensor::alignment);
    auto it = free_.begin();
    while (it != free_.end() && it->first < offset) ++it;
    it = free_.insert(it, {offset, bytes});
    if (it != free_.begin()) {
      auto prev = std::prev(it);
      if (prev->first + prev->second == it->first) {
        prev->second += it->second;
        free_.erase(it);
        it = prev;
      }
    }
    auto next = std::next(it);
    if (next != free_.end() && it->first + it->second == next->first) {
      it->second += next->second;
      free_.erase(next);
    }
  }
  std::size_t size() const { return size_; }

 private:
  std::list<std::pair<std::size_t, std::size_t>> free_;  // offset, bytes; sorted by offset
  std::size_t size_ = 0;
};

bool all_finite(const Tensor& t) {
  if (t.dtype() == DType::f32) {
    for (float v : t.span<float>()) {
      if (!std::isfinite(v)) return false;
    }
  } else if (t.dtype() == DType::f64) {
    for (double v : t.span<double>()) {
      if (!std::isfinite(v)) return false;
    }
  }
  return true;
}

}  // namespace

struct Plan::Specialization {
  struct Step {
    const Node* node = nullptr;
    std::unique_ptr<Kernel> kernel;
    bool onednn = false;          // the oneDNN backend's kernel (see num_onednn_steps)
    std::vector<NodeId> updated;  // parameters this step updates in place (SGDUpdate)
    int threads = 0;              // 1: runs on one thread (small step); 0: all threads
    std::string fused;            // the fused pattern this step runs, if any
    double seconds = 0;           // with CompileOptions::profile
    std::uint64_t runs = 0;
    std::vector<Tensor> inputs;
    std::vector<Tensor> outputs;
  };
  struct LeafUse {  // input `position` of step `step` reads leaf node `node`
    std::size_t step;
    std::size_t position;
    NodeId node;
    int feed;  // index in feed_nodes_, or -1 for a parameter or constant
  };
  std::vector<Step> steps;
  std::vector<LeafUse> leaf_uses;
  std::vector<std::pair<NodeId, int>> outputs;      // node, output index
  std::map<std::pair<NodeId, int>, Tensor> values;  // op outputs, as views
  std::vector<Shape> feed_shapes;                   // in feed_nodes_ order
  std::vector<Tensor> output_values;                // views of op outputs (undefined for leaves)
  std::shared_ptr<void> arena;
  std::size_t arena_bytes = 0;    // intermediate values
  std::size_t scratch_bytes = 0;  // the steps' shared scratch, after the values
  std::size_t unplanned_bytes = 0;
  std::size_t in_place_steps = 0;  // steps writing over their input 0
  std::size_t views = 0;           // reshapes run as views, without a step
  std::size_t fused_updates = 0;   // parameters updated inside a fused step
  dnnl::stream stream{cpu_engine()};
};

Plan::Plan(Graph& graph, std::vector<Value> outputs, CompileOptions options, SGDUpdate update)
    : graph_(&graph), outputs_(std::move(outputs)), options_(options), update_(std::move(update)) {
  if (outputs_.empty()) throw GraphError("compile: no outputs requested");
  for (const auto& v : outputs_) {
    if (!v.valid() || &v.graph() != graph_) {
      throw GraphError(fmt::format("compile: output \"{}\" does not belong to this graph",
                                   v.valid() ? v.str() : "<empty>"));
    }
  }
  check_update();
  if (update_.momentum > 0) {
    for (const Value& p : update_.params) velocities_.emplace_back(p.desc());
  }
  std::vector<Value> needed = outputs_;
  needed.insert(needed.end(), update_.grads.begin(), update_.grads.end());
  order_ = graph_->prune(needed);
  for (NodeId id : order_) {
    if (graph_->node(id).kind == NodeKind::input) feed_nodes_.push_back(id);
  }
  fed_.assign(feed_nodes_.size(), nullptr);
}

Plan::~Plan() = default;
Plan::Plan(Plan&&) noexcept = default;
Plan& Plan::operator=(Plan&&) noexcept = default;

Plan compile(Graph& graph, std::vector<Value> outputs, CompileOptions options) {
  return Plan(graph, std::move(outputs), options);
}

Plan compile(Graph& graph, std::vector<Value> outputs, SGDUpdate update, CompileOptions options) {
  return Plan(graph, std::move(outputs), options, std::move(update));
}

void Plan::check_update() const {
  const auto& u = update_;
  if (u.params.size() != u.grads.size()) {
    throw GraphError(fmt::format("compile: SGDUpdate has {} parameters but {} gradients",
                                 u.params.size(), u.grads.size()));
  }
  if (!(u.momentum >= 0 && u.momentum < 1)) {
    throw GraphError(fmt::format("compile: SGDUpdate momentum {} is outside [0, 1)", u.momentum));
  }
  if (!std::isfinite(u.weight_decay) || u.weight_decay < 0) {
    throw GraphError(
        fmt::format("compile: SGDUpdate weight decay {} must be finite and >= 0", u.weight_decay));
  }
  for (std::size_t i = 0; i < u.params.size(); ++i) {
    const Value& p = u.params[i];
    const Value& g = u.grads[i];
    for (const auto& [v, what] : {std::pair{&p, "parameter"}, std::pair{&g, "gradient"}}) {
      if (!v->valid() || &v->graph() != graph_) {
        throw GraphError(
            fmt::format("compile: SGDUpdate {} {} (\"{}\") does not belong to this graph", what, i,
                        v->valid() ? v->str() : "<empty>"));
      }
    }
    const Node& n = p.node();
    if (n.kind != NodeKind::parameter || !n.trainable) {
      const std::string kind = n.kind == NodeKind::parameter ? "a non-trainable parameter"
                               : n.kind == NodeKind::input   ? "an input"
                               : n.kind == NodeKind::constant
                                   ? "a constant"
                                   : fmt::format("a value computed by {}", n.op);
      throw GraphError(fmt::format(
          "compile: SGDUpdate parameter {} is \"{}\", {}; only trainable parameters are updated", i,
          n.name, kind));
    }
    if (!is_floating(p.dtype())) {
      throw GraphError(fmt::format("compile: SGDUpdate parameter \"{}\" is {}, not f32 or f64",
                                   n.name, p.desc()));
    }
    if (g.desc() != p.desc()) {
      throw GraphError(
          fmt::format("compile: SGDUpdate gradient {} (\"{}\") is {} but parameter \"{}\" is {}", i,
                      g.str(), g.desc(), n.name, p.desc()));
    }
    for (std::size_t j = 0; j < u.params.size(); ++j) {
      if (j < i && u.params[j].node_id() == p.node_id()) {
        throw GraphError(
            fmt::format("compile: SGDUpdate parameter \"{}\" appears twice (positions {} and {})",
                        n.name, j, i));
      }
      if (u.params[j].node_id() == g.node_id()) {
        throw GraphError(fmt::format(
            "compile: SGDUpdate gradient {} is parameter \"{}\", which the update changes", i,
            u.params[j].node().name));
      }
    }
  }
}

Plan::Specialization& Plan::specialize(const std::vector<Shape>& input_shapes) {
  auto found = specializations_.find(input_shapes);
  if (found != specializations_.end()) return *found->second;

  auto spec = std::make_unique<Specialization>();
  // Descs of every value under these input shapes: shape rules run again when a feed's
  // shape differs from the declared one.
  std::map<ValueKey, TensorDesc> descs;
  for (std::size_t i = 0; i < feed_nodes_.size(); ++i) {
    const Node& n = graph_->node(feed_nodes_[i]);
    descs[{n.id, 0}] = TensorDesc{n.outputs[0].dtype, input_shapes[i]};
    spec->feed_shapes.push_back(input_shapes[i]);
  }
  std::map<ValueKey, int> consumers;
  for (NodeId id : order_) {
    const Node& n = graph_->node(id);
    if (n.kind == NodeKind::parameter || n.kind == NodeKind::constant) {
      descs[{id, 0}] = n.outputs[0];
      continue;
    }
    if (n.kind == NodeKind::input) continue;
    std::vector<TensorDesc> in;
    bool same = true;
    for (const auto& v : n.inputs) {
      in.push_back(descs.at({v.node_id(), v.index()}));
      same = same && in.back() == v.desc();
      ++consumers[{v.node_id(), v.index()}];
    }
    std::vector<TensorDesc> out;
    if (same) {
      out = n.outputs;
    } else {
      try {
        out = n.def->shape(ShapeCall{n.attrs, in, n.site()});
      } catch (const ShapeError& e) {
        // Say which feeds made the shapes differ from the graph's: usually a batch size the
        // node's attributes (or a gradient rule's) do not follow.
        std::string fed;
        for (std::size_t i = 0; i < feed_nodes_.size(); ++i) {
          const Node& f = graph_->node(feed_nodes_[i]);
          if (f.outputs[0].shape == input_shapes[i]) continue;
          fed += fmt::format("{}\"{}\" {} (declared {})", fed.empty() ? "" : ", ", f.name,
                             input_shapes[i], f.outputs[0].shape);
        }
        throw ShapeError(
            fmt::format("{}; while specialising the plan for the feeds {}", e.what(), fed));
      }
    }
    for (std::size_t k = 0; k < out.size(); ++k) descs[{id, static_cast<int>(k)}] = out[k];
  }
  // Parameters of the update that nothing else reads are not in the order.
  for (const Value& p : update_.params) descs[{p.node_id(), 0}] = p.desc();
  std::set<ValueKey> requested;
  for (const auto& v : outputs_) requested.insert({v.node_id(), v.index()});

  // Fusion: some nodes run inside another node's kernel, some are not needed at all.
  std::vector<FusedStep> fusions;
  std::set<NodeId> skipped;
  const SGDRule rule{update_.weight_decay, update_.momentum, update_.nesterov};
  // The parameter each gradient of the update belongs to (gradients given twice: none).
  std::map<ValueKey, std::optional<NodeId>> update_of;
  std::set<NodeId> updated_params;
  for (std::size_t i = 0; i < update_.params.size(); ++i) {
    const ValueKey key{update_.grads[i].node_id(), update_.grads[i].index()};
    const NodeId param = update_.params[i].node_id();
    auto [it, added] = update_of.emplace(key, param);
    if (!added) it->second.reset();
    updated_params.insert(param);
  }
  if (options_.fuse && options_.backend == Backend::onednn) {
    std::vector<NodeId> dropped;
    FusionContext context{*graph_,
                          order_,
                          descs,
                          consumers,
                          [&](const ValueKey& key) { return requested.count(key) != 0; },
                          options_.single_thread_below_bytes};
    context.sole_update = [&](const ValueKey& key) -> std::optional<NodeId> {
      const auto it = update_of.find(key);
      if (it == update_of.end() || consumers.count(key) != 0 || requested.count(key) != 0) {
        return std::nullopt;
      }
      return it->second;
    };
    context.is_updated = [&](NodeId param) { return updated_params.count(param) != 0; };
    context.rule = rule;
    context.velocity_of = [&](NodeId param) -> float* {
      if (velocities_.empty()) return nullptr;
      for (std::size_t i = 0; i < update_.params.size(); ++i) {
        if (update_.params[i].node_id() == param) return velocities_[i].data<float>();
      }
      return nullptr;
    };
    fusions = plan_fusions(context, dropped);
    skipped.insert(dropped.begin(), dropped.end());
    for (const auto& f : fusions) skipped.insert(f.absorbed.begin(), f.absorbed.end());
  }
  std::map<NodeId, FusedStep*> fused_at;
  for (auto& f : fusions) fused_at[f.anchor] = &f;

  // A reshape of an op's output is a view of that output's buffer: no step, no copy (with
  // reuse_memory). alias_of maps such a value to the value it views.
  std::map<ValueKey, ValueKey> alias_of;
  auto root = [&](ValueKey key) {
    for (auto it = alias_of.find(key); it != alias_of.end(); it = alias_of.find(key)) {
      key = it->second;
    }
    return key;
  };

  std::vector<std::vector<ValueKey>> step_inputs;
  std::vector<std::vector<ValueKey>> step_outputs;  // what each step writes
  std::vector<bool> step_in_place;                  // the op may write its output over input 0
  for (NodeId id : order_) {
    const Node& n = graph_->node(id);
    if (n.kind != NodeKind::op || skipped.count(id)) continue;
    if (options_.reuse_memory && n.op == "reshape" && !fused_at.count(id) &&
        graph_->node(n.inputs[0].node_id()).kind == NodeKind::op) {
      alias_of[{id, 0}] = {n.inputs[0].node_id(), n.inputs[0].index()};
      continue;
    }
    Specialization::Step step;
    step.node = &n;
    std::vector<TensorDesc> out;
    for (std::size_t k = 0; k < n.outputs.size(); ++k)
      out.push_back(descs.at({id, static_cast<int>(k)}));
    if (auto it = fused_at.find(id); it != fused_at.end()) {
      step.kernel = std::move(it->second->kernel);
      step.onednn = true;
      step.threads = it->second->threads;
      step.fused = it->second->pattern;
      step.updated = it->second->updated;
      step_inputs.push_back(it->second->inputs);
      std::vector<ValueKey> written = it->second->outputs;
      if (written.empty() && step.updated.empty()) {
        for (std::size_t k = 0; k < n.outputs.size(); ++k)
          written.emplace_back(id, static_cast<int>(k));
      }
      step_outputs.push_back(std::move(written));
      step_in_place.push_back(false);
      spec->steps.push_back(std::move(step));
      continue;
    }
    std::vector<TensorDesc> in;
    std::vector<ValueKey> keys;
    for (const auto& v : n.inputs) {
      keys.emplace_back(v.node_id(), v.index());
      in.push_back(descs.at(keys.back()));
    }
    const bool any_f64 =
        std::any_of(in.begin(), in.end(), [](auto& d) { return d.dtype == DType::f64; }) ||
        std::any_of(out.begin(), out.end(), [](auto& d) { return d.dtype == DType::f64; });
    std::size_t bytes = 0;
    for (const auto& d : in) bytes += d.bytes();
    for (const auto& d : out) bytes += d.bytes();
    step.threads = step_threads(bytes, options_.single_thread_below_bytes);
    if (options_.backend == Backend::onednn && n.def->onednn && !any_f64) {
      // Created under the step's thread count: some primitives fix theirs at creation.
      const ThreadScope threads(step.threads);
      step.kernel = n.def->onednn(KernelBuild{n, in, out, cpu_engine()});
      step.onednn = step.kernel != nullptr;
    }
    if (!step.kernel) {
      if (!n.def->reference) {
        throw GraphError(fmt::format("{}: the op has no kernel for {}", n.site(),
                                     in.empty() ? out[0].str() : in[0].str()));
      }
      step.kernel = make_kernel([ref = n.def->reference](const KernelCall& call) { ref(call); });
    }
    step_inputs.push_back(std::move(keys));
    step_outputs.emplace_back();
    for (std::size_t k = 0; k < n.outputs.size(); ++k)
      step_outputs.back().emplace_back(id, static_cast<int>(k));
    step_in_place.push_back(n.def->in_place && options_.reuse_memory);
    spec->steps.push_back(std::move(step));
  }

  // The SGDUpdate: parameters no fused step updates get a step of their own.
  std::set<NodeId> fused_updates;
  for (const auto& step : spec->steps)
    fused_updates.insert(step.updated.begin(), step.updated.end());
  spec->fused_updates = fused_updates.size();
  const std::size_t first_update_step = spec->steps.size();
  for (std::size_t i = 0; i < update_.params.size(); ++i) {
    const Node& param = update_.params[i].node();
    if (fused_updates.count(param.id)) continue;
    const ValueKey grad{update_.grads[i].node_id(), update_.grads[i].index()};
    Specialization::Step step;
    step.node = &param;
    step.kernel = sgd_update_kernel(rule, velocities_.empty() ? Tensor() : velocities_[i]);
    step.onednn = options_.backend == Backend::onednn;
    step.threads = step_threads(2 * param.outputs[0].bytes(), options_.single_thread_below_bytes);
    step.fused = "sgd update";
    step.updated = {param.id};
    step_inputs.push_back({{param.id, 0}, grad});
    step_outputs.emplace_back();
    step_in_place.push_back(false);
    spec->steps.push_back(std::move(step));
  }
  // A step updating parameters writes no value, so nothing depends on it: it moves after the
  // last other step reading one of its parameters (the forward and the data gradients read the
  // weights before they change). Update steps read no parameter another update changes. An
  // update step of its own runs as early as that allows, right after its gradient is computed:
  // the gradient is still in cache, and its buffer is free for the rest of the backward.
  if (!update_.params.empty()) {
    std::vector<double> key(spec->steps.size());
    for (std::size_t s = 0; s < spec->steps.size(); ++s) {
      key[s] = static_cast<double>(s);
      if (s >= first_update_step) {
        key[s] = -1;
        const ValueKey grad = root(step_inputs[s][1]);
        for (std::size_t t = 0; t < first_update_step; ++t) {
          if (std::find(step_outputs[t].begin(), step_outputs[t].end(), grad) !=
              step_outputs[t].end()) {
            key[s] = std::max(key[s], static_cast<double>(t) + 0.5);
          }
        }
      }
      for (NodeId param : spec->steps[s].updated) {
        for (std::size_t t = 0; t < spec->steps.size(); ++t) {
          if (!spec->steps[t].updated.empty()) continue;
          for (const auto& input : step_inputs[t]) {
            if (input.first == param) key[s] = std::max(key[s], static_cast<double>(t) + 0.5);
          }
        }
      }
    }
    std::vector<std::size_t> by_key(spec->steps.size());
    for (std::size_t s = 0; s < by_key.size(); ++s) by_key[s] = s;
    std::stable_sort(by_key.begin(), by_key.end(),
                     [&](std::size_t a, std::size_t b) { return key[a] < key[b]; });
    const auto permute = [&](auto& items) {
      std::remove_reference_t<decltype(items)> sorted;
      for (std::size_t s : by_key) sorted.push_back(std::move(items[s]));
      items = std::move(sorted);
    };
    permute(spec->steps);
    permute(step_inputs);
    permute(step_outputs);
    permute(step_in_place);
  }

  // Lifetimes of buffers: the last step reading a value or any view of it; requested outputs
  // (and what they view) live forever.
  const std::size_t forever = spec->steps.size();
  std::map<ValueKey, std::size_t> last_use;
  for (std::size_t s = 0; s < spec->steps.size(); ++s) {
    for (const auto& key : step_outputs[s]) last_use[key] = s;
    for (const auto& key : step_inputs[s]) {
      auto it = last_use.find(root(key));
      if (it != last_use.end()) it->second = std::max(it->second, s);
    }
  }
  for (const auto& v : outputs_) {
    auto it = last_use.find(root({v.node_id(), v.index()}));
    if (it != last_use.end()) it->second = forever;
    spec->outputs.emplace_back(v.node_id(), v.index());
  }
  std::vector<std::vector<ValueKey>> dies_after(spec->steps.size());
  for (const auto& [key, s] : last_use) {
    if (s != forever) dies_after[s].push_back(key);
  }

  ArenaPlanner planner;
  std::map<ValueKey, std::size_t> offsets;
  for (std::size_t s = 0; s < spec->steps.size(); ++s) {
    // In place: an element-wise op writes its output over input 0 when that buffer dies here,
    // has the output's desc and is read through no other input slot of this step.
    std::optional<ValueKey> reused;
    if (step_in_place[s] && step_outputs[s].size() == 1 && !step_inputs[s].empty()) {
      const ValueKey input = step_inputs[s][0];
      const ValueKey buffer = root(input);
      const auto life = last_use.find(buffer);
      const bool sole_reader =
          std::count_if(step_inputs[s].begin(), step_inputs[s].end(),
                        [&](const ValueKey& key) { return root(key) == buffer; }) == 1;
      if (life != last_use.end() && life->second == s && sole_reader &&
          descs.at(input) == descs.at(step_outputs[s][0])) {
        reused = buffer;
      }
    }
    for (const auto& key : step_outputs[s]) {
      const std::size_t bytes = descs.at(key).bytes();
      spec->unplanned_bytes += align_up(std::max<std::size_t>(bytes, 1));
      offsets[key] = reused ? offsets.at(*reused) : planner.allocate(bytes);
    }
    if (reused) ++spec->in_place_steps;
    if (options_.reuse_memory) {
      for (const auto& key : dies_after[s]) {
        if (key != reused) planner.release(offsets.at(key), descs.at(key).bytes());
      }
    }
  }
  spec->arena_bytes = align_up(planner.size());
  // Kernels' temporary memory: one block after the values, as large as the largest need (steps
  // run one after another), or one per step without reuse.
  for (const auto& step : spec->steps) {
    const std::size_t bytes = align_up(step.kernel->scratch_bytes());
    spec->scratch_bytes = std::max(spec->scratch_bytes, bytes);
    spec->unplanned_bytes += bytes;
  }
  {
    // One 64-byte aligned block; Tensor owns it and the shared_ptr keeps it alive.
    const std::size_t total = spec->arena_bytes + spec->scratch_bytes;
    Tensor storage(Shape{static_cast<std::int64_t>(total / 4 + Tensor::alignment)}, DType::i32);
    spec->arena = std::shared_ptr<void>(storage.raw(), [storage](void*) {});
  }
  auto* base = static_cast<std::byte*>(spec->arena.get());
  for (const auto& [key, offset] : offsets) {
    spec->values[key] = Tensor::view(descs.at(key), base + offset, spec->arena);
  }
  for (const auto& [view, unused] : alias_of) {
    spec->values[view] = Tensor::view(descs.at(view), base + offsets.at(root(view)), spec->arena);
    spec->unplanned_bytes += align_up(std::max<std::size_t>(descs.at(view).bytes(), 1));
  }
  spec->views = alias_of.size();
  for (std::size_t s = 0; s < spec->steps.size(); ++s) {
    auto& step = spec->steps[s];
    for (const auto& key : step_outputs[s]) step.outputs.push_back(spec->values.at(key));
    for (std::size_t p = 0; p < step_inputs[s].size(); ++p) {
      const ValueKey& key = step_inputs[s][p];
      auto it = spec->values.find(key);
      if (it != spec->values.end()) {
        step.inputs.push_back(it->second);
      } else {
        step.inputs.emplace_back();  // a leaf: bound at each run
        const auto feed = std::find(feed_nodes_.begin(), feed_nodes_.end(), key.first);
        spec->leaf_uses.push_back(
            {s, p, key.first,
             feed == feed_nodes_.end() ? -1 : static_cast<int>(feed - feed_nodes_.begin())});
      }
    }
  }
  for (const auto& key : spec->outputs) {
    auto it = spec->values.find(key);
    spec->output_values.push_back(it != spec->values.end() ? it->second : Tensor());
  }
  Specialization& result = *spec;
  specializations_.emplace(input_shapes, std::move(spec));
  return result;
}

const std::vector<Tensor>& Plan::run(const Feeds& feeds, const RunOptions& options) {
  if (!update_.params.empty() &&
      !(std::isfinite(options.learning_rate) && options.learning_rate > 0)) {
    throw Error(fmt::format(
        "run: this plan updates {} parameters (SGDUpdate); RunOptions::learning_rate must be "
        "finite and > 0, got {}",
        update_.params.size(), options.learning_rate));
  }
  // Validate every feed before touching memory. No allocation on the steady path: the
  // scratch vectors are members sized at construction.
  std::fill(fed_.begin(), fed_.end(), nullptr);
  for (const auto& [value, tensor] : feeds) {
    if (!value.valid() || &value.graph() != graph_) {
      throw FeedError(fmt::format("run: feed \"{}\" is not a value of this plan's graph",
                                  value.valid() ? value.str() : "<empty>"));
    }
    const Node& n = value.node();
    if (n.kind != NodeKind::input) {
      throw FeedError(
          fmt::format("run: \"{}\" is a {} node, not an input; only inputs are fed", n.name, n.op));
    }
    const TensorDesc& declared = n.outputs[0];
    if (tensor.dtype() != declared.dtype) {
      throw FeedError(fmt::format("run: input \"{}\" is declared {} but was fed {}", n.name,
                                  declared, tensor.desc()));
    }
    bool shape_ok = tensor.shape() == declared.shape;
    if (!shape_ok && n.batch_dynamic && tensor.shape().rank() == declared.shape.rank() &&
        tensor.shape()[0] > 0) {
      shape_ok = std::equal(tensor.shape().dims().begin() + 1, tensor.shape().dims().end(),
                            declared.shape.dims().begin() + 1);
    }
    if (!shape_ok) {
      throw FeedError(fmt::format("run: input \"{}\" is declared {}{} but was fed {}", n.name,
                                  declared, n.batch_dynamic ? " (dimension 0 may vary)" : "",
                                  tensor.desc()));
    }
    if (!tensor.defined()) {
      throw FeedError(fmt::format("run: input \"{}\" was fed an empty tensor", n.name));
    }
    for (const auto& [other, unused] : feeds) {
      if (&other != &value && other.node_id() == value.node_id() && &other < &value) {
        throw FeedError(fmt::format("run: input \"{}\" is fed twice", n.name));
      }
    }
    const auto it = std::find(feed_nodes_.begin(), feed_nodes_.end(), n.id);
    if (it != feed_nodes_.end()) fed_[static_cast<std::size_t>(it - feed_nodes_.begin())] = &tensor;
  }
  for (std::size_t i = 0; i < feed_nodes_.size(); ++i) {
    if (fed_[i] == nullptr) {
      const Node& n = graph_->node(feed_nodes_[i]);
      throw FeedError(fmt::format("run: input \"{}\" ({}) is needed by the outputs but was not fed",
                                  n.name, n.outputs[0]));
    }
  }
  bool same_shapes = last_ != nullptr;
  for (std::size_t i = 0; same_shapes && i < feed_nodes_.size(); ++i) {
    same_shapes = fed_[i]->shape() == last_->feed_shapes[i];
  }
  if (!same_shapes) {
    std::vector<Shape> shapes;
    for (std::size_t i = 0; i < feed_nodes_.size(); ++i) shapes.push_back(fed_[i]->shape());
    last_ = &specialize(shapes);
  }
  Specialization& spec = *last_;

  for (const auto& use : spec.leaf_uses) {
    Tensor& slot = spec.steps[use.step].inputs[use.position];
    if (use.feed >= 0) {
      slot = *fed_[static_cast<std::size_t>(use.feed)];
      continue;
    }
    const Node& n = graph_->node(use.node);
    if (n.data.desc() != n.outputs[0]) {
      throw GraphError(fmt::format("run: {} \"{}\" holds {} but the graph declares {}", n.op,
                                   n.name, n.data.desc(), n.outputs[0]));
    }
    slot = n.data;
  }

  // Small steps run on one thread (CompileOptions::single_thread_below_bytes); the caller's
  // setting is restored however the run ends.
  struct ThreadSetting {
    int all = omp_get_max_threads();
    int current = all;
    void use(int threads) {
      const int wanted = threads > 0 ? threads : all;
      if (wanted != current) omp_set_num_threads(current = wanted);
    }
    ~ThreadSetting() { use(0); }
  } thread_setting;

  RunContext context;
  context.learning_rate = options.learning_rate;
  context.training = options.training;
  context.seed = options.seed;
  context.step = runs_;
  context.stream = &spec.stream;
  context.scratch = static_cast<std::byte*>(spec.arena.get()) + spec.arena_bytes;
  context.scratch_bytes = spec.scratch_bytes;
  for (auto& step : spec.steps) {
    KernelCall call{*step.node, step.inputs, step.outputs, context};
    thread_setting.use(step.threads);
    if (options_.profile) {
      const auto start = std::chrono::steady_clock::now();
      step.kernel->run(call);
      spec.stream.wait();
      step.seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      ++step.runs;
    } else {
      step.kernel->run(call);
    }
    if (options_.check_finite) {
      for (std::size_t k = 0; k < step.outputs.size(); ++k) {
        if (is_floating(step.outputs[k].dtype()) && !all_finite(step.outputs[k])) {
          throw Error(fmt::format("check_finite: output {} of {} holds a NaN or infinity", k,
                                  step.node->site()));
        }
      }
      for (NodeId id : step.updated) {
        if (!all_finite(graph_->node(id).data)) {
          throw Error(fmt::format(
              "check_finite: parameter \"{}\" holds a NaN or infinity after its SGD update ({})",
              graph_->node(id).name, step.fused));
        }
      }
    }
  }
  if (!spec.steps.empty()) spec.stream.wait();
  ++runs_;

  results_.resize(spec.outputs.size());
  for (std::size_t k = 0; k < spec.outputs.size(); ++k) {
    const auto& [node, index] = spec.outputs[k];
    if (spec.output_values[k].defined() && spec.output_values[k].raw() != nullptr) {
      results_[k] = spec.output_values[k];
      continue;
    }
    const Node& n = graph_->node(node);
    if (n.kind == NodeKind::input) {
      const auto it = std::find(feed_nodes_.begin(), feed_nodes_.end(), node);
      results_[k] = *fed_[static_cast<std::size_t>(it - feed_nodes_.begin())];
    } else {
      results_[k] = n.data;
    }
  }
  return results_;
}

std::size_t Plan::planned_peak_bytes() {
  if (last_ == nullptr) {
    std::vector<Shape> shapes;
    for (NodeId id : feed_nodes_) shapes.push_back(graph_->node(id).outputs[0].shape);
    last_ = &specialize(shapes);
  }
  return last_->arena_bytes + last_->scratch_bytes;
}

std::size_t Plan::scratch_bytes() {
  planned_peak_bytes();
  return last_->scratch_bytes;
}

std::size_t Plan::unplanned_bytes() {
  planned_peak_bytes();
  return last_->unplanned_bytes;
}

std::size_t Plan::num_in_place_steps() {
  planned_peak_bytes();
  return last_->in_place_steps;
}

void Plan::load_velocities(std::span<const Tensor> values) {
  if (values.size() != velocities_.size()) {
    throw Error(fmt::format(
        "Plan::load_velocities: the plan has {} velocities{}, got {}", velocities_.size(),
        velocities_.empty() ? " (its SGDUpdate has no momentum)" : "", values.size()));
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (values[i].desc() != velocities_[i].desc()) {
      throw Error(fmt::format("Plan::load_velocities: velocity {} (parameter \"{}\") is {}, got {}",
                              i, update_.params[i].node().name, velocities_[i].desc(),
                              values[i].desc()));
    }
  }
  for (std::size_t i = 0; i < values.size(); ++i) velocities_[i].copy_from(values[i]);
}

std::size_t Plan::num_fused_updates() {
  planned_peak_bytes();
  return last_->fused_updates;
}

std::size_t Plan::num_views() {
  planned_peak_bytes();
  return last_->views;
}

std::size_t Plan::num_steps() {
  planned_peak_bytes();
  return last_->steps.size();
}

std::vector<StepProfile> Plan::profile() {
  planned_peak_bytes();
  // The specialisation that ran most: a trainer's last batch is often a smaller one.
  const Specialization* shown = last_;
  for (const auto& [shapes, spec] : specializations_) {
    const auto runs = [](const Specialization& s) { return s.steps.empty() ? 0 : s.steps[0].runs; };
    if (runs(*spec) > runs(*shown)) shown = spec.get();
  }
  std::vector<StepProfile> out;
  for (const auto& s : shown->steps) {
    out.push_back({s.node->name, s.fused.empty() ? s.node->op : s.fused,
                   s.onednn ? s.kernel->library() : "reference", s.threads,
                   !s.outputs.empty()   ? s.outputs[0].desc().str()
                   : !s.updated.empty() ? graph_->node(s.updated[0]).outputs[0].str() + " (updated)"
                                        : "",
                   s.seconds, s.runs, s.kernel->scratch_bytes()});
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
  return out;
}

std::string Plan::profile_report(std::size_t top) {
  auto steps = profile();
  double total = 0;
  for (const auto& s : steps) total += s.seconds;
  std::string out =
      fmt::format("{:>9} {:>6}  {:<30} {:<10} {:>7} {:>11} {:<22} {}\n", "ms/run", "share", "op",
                  "kernel", "threads", "scratch KiB", "output", "node");
  for (std::size_t i = 0; i < steps.size() && i < top; ++i) {
    const auto& s = steps[i];
    const double per_run = s.runs ? s.seconds / static_cast<double>(s.runs) * 1e3 : 0;
    out += fmt::format(
        "{:>9.3f} {:>5.1f}%  {:<30} {:<10} {:>7} {:>11} {:<22} {}\n", per_run,
        total > 0 ? 100 * s.seconds / total : 0, s.op, s.kernel, s.threads == 1 ? "1" : "all",
        s.scratch_bytes ? fmt::format("{:.0f}", s.scratch_bytes / 1024.0) : "-", s.output, s.node);
  }
  const std::uint64_t runs = steps.empty() ? 0 : steps.front().runs;
  std::size_t scratch = 0;  // the block the steps share
  for (const auto& s : steps) scratch = std::max(scratch, s.scratch_bytes);
  out += fmt::format("{} steps, {:.3f} ms per run in total, {:.0f} KiB of scratch shared\n",
                     steps.size(), runs ? total / static_cast<double>(runs) * 1e3 : 0,
                     static_cast<double>(scratch) / 1024.0);
  return out;
}

std::vector<std::string> Plan::fused_patterns() {
  planned_peak_bytes();
  std::vector<std::string> out;
  for (const auto& s : last_->steps) {
    if (!s.fused.empty()) out.push_back(s.fused);
  }
  return out;
}

std::size_t Plan::num_onednn_steps() {
  planned_peak_bytes();
  return static_cast<std::size_t>(std::count_if(last_->steps.begin(), last_->steps.end(),
                                                [](const auto& s) { return s.onednn; }));
}

}  // namespace dagrad
