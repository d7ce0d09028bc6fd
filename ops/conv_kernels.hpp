// Convolution kernels the plan's fusion pass builds (runtime/fusion.cpp); not a user API.
#pragma once

#include <memory>

#include "runtime/kernel.hpp"

namespace dagrad {

// One kernel for a convolution's backward: conv2d_backward_weights (KernelBuild::node, its
// attributes) and conv2d_backward_data of the same convolution, reading the same dy. Inputs
// x, dy, w; outputs dW, dX, as descs in `build`. nullptr when the descs are not all f32 or
// oneDNN refuses the configuration.
std::unique_ptr<Kernel> conv_backward_fused_kernel(const KernelBuild& build);

}  // namespace dagrad
