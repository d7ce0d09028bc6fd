// 2-D convolution and pooling on NCHW images; convolution weights are OIHW, grouped weights
// [O, I/groups, KH, KW]. The backward passes are ops of their own (conv2d_backward_data,
// conv2d_backward_weights, max_pool2d_backward, avg_pool2d_backward), so gradients are graphs.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

// Two sizes, {height, width}.
using Size2 = std::array<std::int64_t, 2>;

struct Conv2dOptions {
  Size2 stride{1, 1};
  Size2 padding{0, 0};   // zeros added on each side (top and bottom, left and right)
  Size2 dilation{1, 1};  // distance between kernel taps; 1 means no dilation
  std::int64_t groups = 1;
};

// y[n, o, i, j] = bias[o] + Σ_{c, p, q} x[n, g·I/G + c, i·sh − ph + p·dh, j·sw − pw + q·dw]
//                                     · w[o, c, p, q],   g = o / (O / groups)
// with x read as zero outside the image. x: [N, C, H, W]; w: [O, C / groups, KH, KW];
// bias: [O] (optional). Output [N, O, OH, OW], OH = (H + 2ph − dh(KH − 1) − 1) / sh + 1 (floor).
Value conv2d(const Value& x, const Value& w, std::optional<Value> bias = std::nullopt,
             Conv2dOptions options = {},
             std::source_location where = std::source_location::current());

// The gradient of conv2d with respect to x (the transposed convolution of dy by w):
// dx[n, c, h, w] = Σ over every (o, i, j, p, q) whose tap reads x[n, c, h, w] of dy[n, o, i, j] ·
// w[o, c', p, q]. `input_shape` is x's shape (strides > 1 make it ambiguous from dy alone).
Value conv2d_backward_data(const Value& dy, const Value& w, const Shape& input_shape,
                           Conv2dOptions options = {},
                           std::source_location where = std::source_location::current());

// The gradient of conv2d with respect to w: dw[o, c, p, q] = Σ_{n, i, j} dy[n, o, i, j] · x[n,
// g·I/G + c, i·sh − ph + p·dh, j·sw − pw + q·dw]. `kernel` is {KH, KW}.
Value conv2d_backward_weights(const Value& x, const Value& dy, Size2 kernel,
                              Conv2dOptions options = {},
                              std::source_location where = std::source_location::current());

// y[n, c, i, j] = max of x[n, c, i·sh − ph + p, j·sw − pw + q] over 0 ≤ p < KH, 0 ≤ q < KW,
// padding ignored (never the max). Output size (H + 2ph − KH) / sh + 1 (floor). The gradient
// flows to the first maximum of each window (row-major order) when values tie.
Value max_pool2d(const Value& x, Size2 kernel, Size2 stride, Size2 padding = {0, 0},
                 std::source_location where = std::source_location::current());

// The gradient of max_pool2d: dx[n, c, h, w] = Σ over windows whose first maximum is x[n, c, h, w]
// of dy at that window. Recomputes the maxima from x.
Value max_pool2d_backward(const Value& dy, const Value& x, Size2 kernel, Size2 stride,
                          Size2 padding = {0, 0},
                          std::source_location where = std::source_location::current());

// Reads g at each window's first maximum of x: y[n, c, i, j] = g[n, c, h*, w*] where (h*, w*) is
// the first maximum of x's window (i, j). The adjoint of max_pool2d_backward (used by its
// gradient, so max pooling has second-order gradients). g and x have the same shape.
Value max_pool2d_gather(const Value& g, const Value& x, Size2 kernel, Size2 stride,
                        Size2 padding = {0, 0},
                        std::source_location where = std::source_location::current());

// y[n, c, i, j] = mean of the window's elements that lie inside the image: padding is excluded
// from both the sum and the count (oneDNN's pooling_avg_exclude_padding). Padding must be
// smaller than the kernel so that every window holds at least one element.
Value avg_pool2d(const Value& x, Size2 kernel, Size2 stride, Size2 padding = {0, 0},
                 std::source_location where = std::source_location::current());

// The gradient of avg_pool2d: each window spreads dy / (its element count) over its elements.
Value avg_pool2d_backward(const Value& dy, const Shape& input_shape, Size2 kernel, Size2 stride,
                          Size2 padding = {0, 0},
                          std::source_location where = std::source_location::current());

// Mean over the spatial axes: [N, C, H, W] -> [N, C] (or [N, C, 1, 1] with keepdims).
// A composite of mean().
Value global_avg_pool(const Value& x, bool keepdims = false,
                      std::source_location where = std::source_location::current());

}  // namespace dagrad
