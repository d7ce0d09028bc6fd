#include "ops/common.hpp"

namespace dagrad {

void register_all_ops(OpRegistry& registry) {
  register_elementwise_ops(registry);
  register_shape_ops(registry);
  register_reduction_ops(registry);
  register_linalg_ops(registry);
  register_softmax_ops(registry);
  register_loss_ops(registry);
  register_activation_ops(registry);
  register_indexing_ops(registry);
  register_conv_ops(registry);
  register_normalization_ops(registry);
  register_math_ops(registry);
}

}  // namespace dagrad
