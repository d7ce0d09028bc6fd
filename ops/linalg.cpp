#include "ops/common.hpp"

namespace dagrad {

void register_linalg_ops(OpRegistry&) {}

}  // namespace dagrad
