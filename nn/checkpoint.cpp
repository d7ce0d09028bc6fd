#include "nn/checkpoint.hpp"

#include <fmt/format.h>

#include <charconv>
#include <sstream>

namespace dagrad {

namespace {

constexpr std::string_view param_prefix = "param/";
constexpr std::string_view optimizer_prefix = "optimizer/";

std::int64_t parse_integer(const std::string& path, const Metadata& metadata,
                           const std::string& key) {
  const auto found = metadata.find(key);
  if (found == metadata.end()) return 0;  // a weights-only file written by another tool
  std::int64_t value = 0;
  const std::string& text = found->second;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) {
    throw IOError(fmt::format("Checkpoint \"{}\": metadata \"{}\" must be an integer, got \"{}\"",
                              path, key, text));
  }
  return value;
}

}  // namespace

void Checkpoint::save(const std::string& path, Graph& graph, const Optimizer* optimizer,
                      const CheckpointInfo& info) {
  NamedTensors tensors;
  for (const Value& parameter : graph.parameters(false)) {
    tensors.emplace_back(fmt::format("{}{}", param_prefix, parameter.node().name),
                         graph.value_of(parameter));
  }
  Metadata metadata;
  for (const auto& [key, value] : info.extra) {
    if (key.starts_with("dagrad.")) {
      throw Error(
          fmt::format("Checkpoint \"{}\": metadata key \"{}\" is reserved (\"dagrad.\" "
                      "keys are written by Checkpoint)",
                      path, key));
    }
    metadata[key] = value;
  }
  metadata["dagrad.epoch"] = std::to_string(info.epoch);
  metadata["dagrad.step"] = std::to_string(info.step);
  metadata["dagrad.schedule_position"] = std::to_string(info.schedule_position);
  metadata["dagrad.rng_state"] = info.rng_state;
  if (optimizer != nullptr) {
    metadata["dagrad.optimizer"] = optimizer->name();
    for (auto& [name, tensor] : optimizer->state()) {
      tensors.emplace_back(fmt::format("{}{}", optimizer_prefix, name), tensor);
    }
  }
  save_safetensors(path, tensors, metadata);
}

CheckpointInfo Checkpoint::load(const std::string& path, Graph& graph, Optimizer* optimizer) {
  SafetensorsFile file = load_safetensors(path);
  std::map<std::string, const Tensor*> by_name;
  NamedTensors optimizer_state;
  for (const auto& [name, tensor] : file.tensors) {
    by_name[name] = &tensor;
    if (name.starts_with(optimizer_prefix)) {
      optimizer_state.emplace_back(name.substr(optimizer_prefix.size()), tensor);
    }
  }

  // Check everything first, so a failed load leaves the graph and the optimiser untouched.
  std::vector<std::pair<Value, const Tensor*>> assignments;
  for (const Value& parameter : graph.parameters(false)) {
    const std::string name = fmt::format("{}{}", param_prefix, parameter.node().name);
    const auto found = by_name.find(name);
    if (found == by_name.end()) {
      throw IOError(
          fmt::format("Checkpoint \"{}\": parameter \"{}\" is not in the file (looked for "
                      "tensor \"{}\")",
                      path, parameter.node().name, name));
    }
    const TensorDesc& wanted = graph.value_of(parameter).desc();
    if (found->second->desc() != wanted) {
      throw Error(
          fmt::format("Checkpoint \"{}\": tensor \"{}\" is {} in the file but parameter "
                      "\"{}\" is {}",
                      path, name, found->second->desc(), parameter.node().name, wanted));
    }
    assignments.emplace_back(parameter, found->second);
  }
  CheckpointInfo info;
  info.epoch = parse_integer(path, file.metadata, "dagrad.epoch");
  info.step = parse_integer(path, file.metadata, "dagrad.step");
  info.schedule_position = parse_integer(path, file.metadata, "dagrad.schedule_position");
  if (const auto found = file.metadata.find("dagrad.rng_state"); found != file.metadata.end()) {
    info.rng_state = found->second;
  }
  for (const auto& [key, value] : file.metadata) {
    if (!key.starts_with("dagrad.")) info.extra[key] = value;
  }
  if (optimizer != nullptr) {
    const auto found = file.metadata.find("dagrad.optimizer");
    if (found == file.metadata.end()) {
      throw IOError(
          fmt::format("Checkpoint \"{}\": the file holds no optimiser state, but a {} "
                      "optimiser was given",
                      path, optimizer->name()));
    }
    if (found->second != optimizer->name()) {
      throw Error(fmt::format("Checkpoint \"{}\": the file holds {} state, cannot load it into {}",
                              path, found->second, optimizer->name()));
    }
    // load_state validates fully before replacing anything; run it before touching parameters.
    try {
      optimizer->load_state(optimizer_state);
    } catch (const Error& e) {
      throw IOError(fmt::format("Checkpoint \"{}\": {}", path, e.what()));
    }
  }
  for (auto& [parameter, tensor] : assignments) graph.value_of(parameter).copy_from(*tensor);
  return info;
}

std::string rng_state_string(const std::mt19937_64& engine) {
  std::ostringstream out;
  out << engine;
  return out.str();
}

void restore_rng_state(std::mt19937_64& engine, const std::string& state) {
  std::istringstream in(state);
  std::mt19937_64 restored;
  in >> restored;
  if (in.fail()) {
    throw Error(
        fmt::format("restore_rng_state: the text is not a mt19937_64 state (it begins "
                    "with \"{}\")",
                    state.substr(0, 40)));
  }
  engine = restored;
}

}  // namespace dagrad
