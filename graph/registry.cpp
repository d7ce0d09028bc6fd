#include <fmt/format.h>

#include "graph/op_def.hpp"

namespace dagrad {

// Defined in ops/all_ops.cpp: registers every op family.
void register_all_ops(OpRegistry& registry);

void OpRegistry::add(OpDef def) {
  if (def.name.empty()) throw GraphError("op registry: an op has no name");
  if (!def.shape) throw GraphError(fmt::format("op registry: op '{}' has no shape rule", def.name));
  if (ops_.count(def.name) != 0) {
    throw GraphError(fmt::format("op registry: op '{}' is registered twice", def.name));
  }
  std::string name = def.name;
  ops_.emplace(std::move(name), std::move(def));
}

const OpDef* OpRegistry::find(std::string_view name) const {
  auto it = ops_.find(name);
  return it == ops_.end() ? nullptr : &it->second;
}

const OpDef& OpRegistry::get(std::string_view name) const {
  if (const OpDef* def = find(name)) return *def;
  throw GraphError(fmt::format("unknown op '{}': it is not registered", name));
}

std::vector<const OpDef*> OpRegistry::all() const {
  std::vector<const OpDef*> out;
  for (const auto& [name, def] : ops_) out.push_back(&def);
  return out;
}

const OpRegistry& op_registry() {
  static const OpRegistry registry = [] {
    OpRegistry r;
    register_all_ops(r);
    return r;
  }();
  return registry;
}

}  // namespace dagrad
