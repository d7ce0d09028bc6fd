// Named tensors: what optimiser state, checkpoints and safetensors files exchange.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "graph/tensor.hpp"

namespace dagrad {

// An ordered list of (name, tensor); names are unique within one list.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

}  // namespace dagrad
