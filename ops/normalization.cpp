#include "ops/common.hpp"

namespace dagrad {

void register_normalization_ops(OpRegistry&) {}

}  // namespace dagrad
