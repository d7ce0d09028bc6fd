#include "ops/common.hpp"

namespace dagrad {

void register_loss_ops(OpRegistry&) {}

}  // namespace dagrad
