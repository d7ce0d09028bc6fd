#include "ops/common.hpp"

namespace dagrad {

void register_conv_ops(OpRegistry&) {}

}  // namespace dagrad
