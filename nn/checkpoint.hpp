// Checkpoints: a graph's parameters, an optimiser's state and the training position, in one
// safetensors file (so other tools can read the weights).
//
// Layout: tensor "param/<parameter name>" for every parameter of the graph (trainable or not),
// "optimizer/<state name>" for each tensor of Optimizer::state(); metadata "dagrad.epoch",
// "dagrad.step", "dagrad.schedule_position", "dagrad.rng_state", "dagrad.optimizer" (its name),
// plus the caller's own keys from CheckpointInfo::extra.
// L-BFGS is not an Optimizer: save its LBFGS::state() next to the weights with save_safetensors.
#pragma once

#include <cstdint>
#include <random>
#include <string>

#include "graph/graph.hpp"
#include "nn/optimizer.hpp"
#include "nn/safetensors.hpp"

namespace dagrad {

struct CheckpointInfo {
  std::int64_t epoch = 0;
  std::int64_t step = 0;
  std::int64_t schedule_position = 0;  // the t given to Schedule::learning_rate
  std::string rng_state;               // e.g. rng_state_string(engine)
  Metadata extra;                      // keys must not start with "dagrad."
};

class Checkpoint {
 public:
  // Saves atomically (see save_safetensors). `optimizer` may be null.
  static void save(const std::string& path, Graph& graph, const Optimizer* optimizer,
                   const CheckpointInfo& info);

  // Loads into `graph`'s parameters (and `optimizer`'s state when not null) and returns the
  // training position (0 for position keys the file lacks, so weights-only files written by other
  // tools load too). Everything is checked before anything is changed: a parameter missing
  // from the file (IOError naming it), a shape or dtype that differs (Error naming the tensor and
  // both descs), an optimiser of another kind, malformed metadata. Tensors in the file that the
  // graph does not have are ignored.
  static CheckpointInfo load(const std::string& path, Graph& graph, Optimizer* optimizer);
};

// The full state of a std::mt19937_64 as text, and back (Error when the text is not one).
std::string rng_state_string(const std::mt19937_64& engine);
void restore_rng_state(std::mt19937_64& engine, const std::string& state);

}  // namespace dagrad
