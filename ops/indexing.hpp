// Indexing ops: concat, split, slice (and its gradient slice_grad), pad, one_hot, argmax, and
// the reshape wrappers squeeze, unsqueeze and flatten.
#pragma once

#include <cstdint>
#include <limits>
#include <source_location>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

// An `ends` entry of slice() meaning "run to the end of the axis in the step's direction"
// (NumPy's omitted end: past the last element for a positive step, past the first for a
// negative one).
inline constexpr std::int64_t slice_to_end = std::numeric_limits<std::int64_t>::max();

// Joins `xs` along `axis` (negative counts from the end): all inputs have one dtype and the
// same shape except on `axis`; y[..., offset_k + i, ...] = xs[k][..., i, ...] where offset_k
// is the sum of the earlier inputs' sizes on `axis`. Gradient: the matching slices of dy.
Value concat(std::vector<Value> xs, std::int64_t axis,
             std::source_location where = std::source_location::current());

// Cuts x along `axis` into pieces of the given sizes (positive, summing to the axis length):
// out_k[..., i, ...] = x[..., offset_k + i, ...]. The inverse of concat; its gradient is the
// concat of the pieces' gradients (zeros for pieces that do not reach the loss).
std::vector<Value> split(const Value& x, std::vector<std::int64_t> sizes, std::int64_t axis,
                         std::source_location where = std::source_location::current());

// NumPy-like basic slicing: on axis k, the elements starts[k], starts[k] + steps[k], ... up to
// (not including) ends[k]. Negative starts/ends count from the end of the axis; `slice_to_end`
// runs to the end in the step's direction; steps default to 1 and may be negative. Lists may
// be shorter than the rank: later axes are taken whole. Unlike NumPy, an index outside the
// axis and a slice selecting no element are refused with a ShapeError, not clamped.
// Gradient: slice_grad (dy scattered into zeros).
Value slice(const Value& x, std::vector<std::int64_t> starts, std::vector<std::int64_t> ends,
            std::vector<std::int64_t> steps = {},
            std::source_location where = std::source_location::current());

// slice's backward: zeros of `shape` with dy written at the positions
// slice(·, starts, ends, steps) reads. Linear; its gradient is slice(g, starts, ends, steps).
// A dimension of −1 in `shape` takes dy's size on that axis; it is allowed only on an axis the
// slice takes whole (not listed, or start 0, slice_to_end, step 1). slice's gradient uses it for
// every such axis, so that it also holds when a plan runs with another batch size.
Value slice_grad(const Value& dy, const Shape& shape, std::vector<std::int64_t> starts,
                 std::vector<std::int64_t> ends, std::vector<std::int64_t> steps = {},
                 std::source_location where = std::source_location::current());

// slice_grad with the output shape taken from `like` (only its shape is read, and it gets no
// gradient): slice's backward when the slice does not take axis 0 whole, so that it follows x's
// batch size at run time.
Value slice_grad(const Value& dy, const Value& like, std::vector<std::int64_t> starts,
                 std::vector<std::int64_t> ends, std::vector<std::int64_t> steps = {},
                 std::source_location where = std::source_location::current());

// split with the pieces' sizes on `axis` taken from `likes`: one piece per like, of x's shape
// but for like_k's size on `axis` (the sizes must sum to x's). Only the likes' shapes are read,
// when the plan runs, and they get no gradient: concat's backward along axis 0, so that it
// follows its inputs' batch sizes.
std::vector<Value> split_as(const Value& x, const std::vector<Value>& likes, std::int64_t axis,
                            std::source_location where = std::source_location::current());

// Constant padding: y has dims before[k] + dim_k + after[k] and holds `value` except for the
// window y[before[0] + i_0, ...] = x[i_0, ...]. One non-negative entry per axis.
// Gradient: the window of dy (a slice).
Value pad(const Value& x, std::vector<std::int64_t> before, std::vector<std::int64_t> after,
          double value = 0.0, std::source_location where = std::source_location::current());

// Removes size-1 axes: the listed ones (each must have size 1), or all of them when `axes` is
// empty. A thin wrapper over reshape (no op of its own); ShapeError naming squeeze otherwise.
Value squeeze(const Value& x, std::vector<std::int64_t> axes = {},
              std::source_location where = std::source_location::current());

// Inserts size-1 axes at the listed positions of the result (negative counts from the end of
// the result's rank). A thin wrapper over reshape.
Value unsqueeze(const Value& x, std::vector<std::int64_t> axes,
                std::source_location where = std::source_location::current());

// Merges axes start_axis..rank-1 into one: [N, C, H, W] -> [N, C*H*W] for start_axis = 1.
// A thin wrapper over reshape.
Value flatten(const Value& x, std::int64_t start_axis = 1,
              std::source_location where = std::source_location::current());

// One-hot encoding of i32 labels: y[..., c] = 1 if labels[...] == c else 0, shape
// labels.shape + [classes], dtype `dtype`. A label outside [0, classes) raises dagrad::Error
// at run time naming the label and its position. No gradient (labels are integers).
Value one_hot(const Value& labels, std::int64_t classes, DType dtype = DType::f32,
              std::source_location where = std::source_location::current());

// Index (i32) of the largest element along `axis`; ties go to the first index, and a NaN
// counts as larger than any number (the first NaN wins, as in NumPy). No gradient.
Value argmax(const Value& x, std::int64_t axis, bool keepdims = false,
             std::source_location where = std::source_location::current());

}  // namespace dagrad
