// Matrix multiplication.
#pragma once

#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

// a·b. 2-D: [m,k]·[k,n] -> [m,n]. Batched: leading dimensions broadcast (NumPy matmul),
// e.g. [b,m,k]·[k,n] -> [b,m,n] and [b,m,k]·[b,k,n] -> [b,m,n].
// Backward (the switch): dA = dY·Bᵀ, dB = Aᵀ·dY, summed over broadcast batch dimensions.
Value matmul(const Value& a, const Value& b,
             std::source_location where = std::source_location::current());

}  // namespace dagrad
