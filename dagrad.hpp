// dagrad: a dataflow computation-graph engine with reverse-mode autodiff on oneDNN.
// Include this one header for the whole public API.
#pragma once

#include "autodiff/grad.hpp"
#include "autodiff/gradcheck.hpp"
#include "data/data.hpp"
#include "graph/graph.hpp"
#include "graph/tensor.hpp"
#include "nn/nn.hpp"
#include "ops/ops.hpp"
#include "runtime/kernel.hpp"
#include "runtime/plan.hpp"
#include "version.hpp"
