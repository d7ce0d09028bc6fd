// Layers and models: a stack of layers, written as text or built in code, turned into a graph
// with named parameters, a classification loss, a regularisation loss and gradients.
//
// Layer text (comma-separated, case-sensitive), e.g. the `cnn` preset:
//   conv:32:5,relu,maxpool:2,conv:64:5,relu,maxpool:2,flatten,dense:1024,relu,dropout:0.5,dense:10
//
//   dense:N                 matmul(x, W) + b, W [in, N] (x is flattened first when rank > 2)
//   conv:C:K[:S[:P]]        conv2d with C filters of K×K, stride S (1), padding P (K/2: "same"
//                           for odd K and stride 1)
//   maxpool:K[:S]           max pooling, stride S (K); avgpool:K[:S]; globalavgpool
//   batchnorm               batch normalisation over the channel (rank 4) or feature axis
//   layernorm               layer normalisation over the last axis
//   dropout:P               inverted dropout with rate P (identity in inference)
//   flatten                 [N, ...] -> [N, features]
//   relu tanh sigmoid gelu softplus identity elu[:A] leaky_relu[:A]
//
// Weights are initialised He-normal when the next activation is relu-like and Xavier-uniform
// otherwise (override with ModelOptions::init), biases to zero, seeded by ModelOptions::seed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

struct LayerSpec {
  std::string kind;
  std::vector<double> args;
  std::string str() const;  // back to text, e.g. "conv:32:5"
};

// Parses layer text; throws Error naming the layer and its position when it is unknown or its
// arguments are wrong.
std::vector<LayerSpec> parse_layers(std::string_view text);
// Layer text of a named preset: "mlp" (784-256-128-10, ReLU), "cnn" (conv 5×5 32 → max-pool 2 →
// conv 5×5 64 → max-pool 2 → dense 1024 → 10, ReLU, dropout 0.5), "cnn-bn" (the same with batch
// norm after each conv and the dense layer). Error for another name.
std::string preset_layers(std::string_view preset);

struct ModelOptions {
  std::vector<std::int64_t> example_shape{784};  // one example, e.g. {784} or {1, 28, 28}
  std::int64_t classes = 10;
  std::int64_t batch_size = 128;  // declared batch size (1 is declared as 2); any batch size
                                  // runs (batch_dynamic)
  std::uint64_t seed = 0;
  std::string init = "auto";  // "auto", "he", "xavier", "lecun"
  double l1 = 0.0;            // λ of the L1 penalty Σ|w| over weights (not biases, not BN)
  double l2 = 0.0;            // λ of the L2 penalty λ/2 Σ w² over weights
};

struct LayerSummary {
  std::string name;
  std::string kind;
  Shape output_shape;  // with the declared batch size
  std::int64_t parameters = 0;
};

class Model {
 public:
  Model(std::vector<LayerSpec> layers, ModelOptions options);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  Graph& graph() { return graph_; }
  const ModelOptions& options() const { return options_; }
  Value input() const { return input_; }               // f32 [B, example_shape...]
  Value labels() const { return labels_; }             // i32 [B]
  Value targets() const { return targets_; }           // f32 [B, classes] soft targets (mixup)
  Value logits() const { return logits_; }             // [B, classes]
  Value data_loss() const { return data_loss_; }       // mean sparse cross-entropy
  Value soft_data_loss() const { return soft_loss_; }  // mean cross-entropy on soft targets
  Value regularization_loss() const { return regularization_; }  // penalties (0 when none)
  Value error() const { return error_; }  // fraction of wrong predictions in the batch
  const std::vector<Value>& parameters() const { return parameters_; }  // trainable
  const std::vector<Value>& weights() const { return weights_; }        // penalised subset
  std::int64_t parameter_count() const;
  const std::vector<LayerSummary>& layers() const { return summary_; }
  const std::vector<LayerSpec>& specs() const { return specs_; }
  std::string summary() const;  // a table of layers, output shapes and parameter counts

 private:
  Value build_layer(const LayerSpec& spec, std::size_t index, Value x);

  std::vector<LayerSpec> specs_;
  ModelOptions options_;
  Graph graph_;
  Value input_, labels_, targets_, logits_, data_loss_, soft_loss_, regularization_, error_;
  std::vector<Value> parameters_, weights_;
  std::vector<LayerSummary> summary_;
};

}  // namespace dagrad
