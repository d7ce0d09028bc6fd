// Shape ops: reshape, broadcast_to, transpose, and stop_gradient.
#pragma once

#include <source_location>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

// Same data, new shape with the same element count; one dimension may be -1 (inferred).
Value reshape(const Value& x, Shape shape,
              std::source_location where = std::source_location::current());
// Repeats x along axes of size 1 (NumPy rules) to `shape`.
Value broadcast_to(const Value& x, Shape shape,
                   std::source_location where = std::source_location::current());
// reshape and broadcast_to to the shape of `like` (its data is not read). Gradient rules use
// these instead of fixed shapes, so a plan can re-specialise them for another batch size.
Value reshape_like(const Value& x, const Value& like,
                   std::source_location where = std::source_location::current());
Value broadcast_like(const Value& x, const Value& like,
                     std::source_location where = std::source_location::current());
// `value` everywhere, with the shape and dtype of `like`.
Value filled_like(const Value& like, double value);
// Permutes axes: dst[i_perm[0], ..., i_perm[n-1]] = src[i_0, ..., i_n-1]. Empty `perm` swaps the
// last two axes.
Value transpose(const Value& x, std::vector<std::int64_t> perm = {},
                std::source_location where = std::source_location::current());
// Identity forward; no gradient flows back through it (treated as a constant).
Value stop_gradient(const Value& x, std::source_location where = std::source_location::current());
// Zeros (or `value`) of x's dtype and the given shape.
Value filled(Graph& graph, const Shape& shape, double value, DType dtype = DType::f32);

}  // namespace dagrad
