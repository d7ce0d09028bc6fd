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

// The gradients of a convolution followed by relu and 2x2, stride 2 max pooling (`pool`, a
// max_pool2d_backward node), computed from the pooling's gradient dp without building the
// convolution's dy = relu_grad(max_pool2d_backward(dp, r), r). KernelBuild::node is the
// conv2d_backward_weights node. Inputs dp, r, x and, with `data`, w; outputs dW, then with
// `bias` the bias gradient sum(dy, {0, 2, 3}), then with `data` dx. nullptr unless f32,
// stride 1, dilation 1, one group, KH and KW <= 8.
std::unique_ptr<Kernel> pooled_relu_gradients_kernel(const KernelBuild& build, const Node& pool,
                                                     bool bias, bool data);

}  // namespace dagrad
