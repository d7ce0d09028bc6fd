#include "ops/common.hpp"

namespace dagrad {

void register_indexing_ops(OpRegistry&) {}

}  // namespace dagrad
