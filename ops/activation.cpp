#include "ops/common.hpp"

namespace dagrad {

void register_activation_ops(OpRegistry&) {}

}  // namespace dagrad
