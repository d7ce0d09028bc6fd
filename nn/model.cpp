#include "nn/model.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>

#include "nn/init.hpp"
#include "ops/ops.hpp"

namespace dagrad {

namespace {

struct KindInfo {
  const char* kind;
  std::size_t min_args;
  std::size_t max_args;
};

constexpr KindInfo kinds[] = {
    {"dense", 1, 1},         {"conv", 2, 4},      {"maxpool", 1, 2},   {"avgpool", 1, 2},
    {"globalavgpool", 0, 0}, {"batchnorm", 0, 0}, {"layernorm", 0, 0}, {"dropout", 1, 1},
    {"flatten", 0, 0},       {"relu", 0, 0},      {"tanh", 0, 0},      {"sigmoid", 0, 0},
    {"gelu", 0, 0},          {"softplus", 0, 0},  {"identity", 0, 0},  {"elu", 0, 1},
    {"leaky_relu", 0, 1},
};

bool relu_like(const std::string& kind) {
  return kind == "relu" || kind == "leaky_relu" || kind == "elu" || kind == "gelu" ||
         kind == "softplus";
}

}  // namespace

std::string LayerSpec::str() const {
  std::string out = kind;
  for (double a : args) out += fmt::format(":{}", a);
  return out;
}

std::vector<LayerSpec> parse_layers(std::string_view text) {
  std::vector<LayerSpec> layers;
  std::size_t position = 0;
  while (position <= text.size()) {
    std::size_t comma = text.find(',', position);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view item = text.substr(position, comma - position);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    const std::size_t number = layers.size() + 1;
    if (item.empty()) throw Error(fmt::format("layers: layer {} of \"{}\" is empty", number, text));
    LayerSpec spec;
    std::size_t colon = item.find(':');
    spec.kind = std::string(item.substr(0, colon));
    while (colon != std::string_view::npos) {
      std::size_t next = item.find(':', colon + 1);
      std::string_view arg = item.substr(
          colon + 1, next == std::string_view::npos ? std::string_view::npos : next - colon - 1);
      double value = 0;
      auto [end, error] = std::from_chars(arg.data(), arg.data() + arg.size(), value);
      if (error != std::errc() || end != arg.data() + arg.size() || !std::isfinite(value)) {
        throw Error(fmt::format("layers: layer {} \"{}\": argument \"{}\" is not a number", number,
                                item, arg));
      }
      spec.args.push_back(value);
      colon = next;
    }
    const KindInfo* info = nullptr;
    for (const auto& k : kinds) {
      if (spec.kind == k.kind) info = &k;
    }
    if (info == nullptr) {
      throw Error(fmt::format(
          "layers: layer {} \"{}\": unknown kind \"{}\" (known: dense, conv, maxpool, avgpool, "
          "globalavgpool, batchnorm, layernorm, dropout, flatten, relu, tanh, sigmoid, gelu, "
          "softplus, identity, elu, leaky_relu)",
          number, item, spec.kind));
    }
    if (spec.args.size() < info->min_args || spec.args.size() > info->max_args) {
      throw Error(fmt::format("layers: layer {} \"{}\": {} takes {} to {} arguments, {} given",
                              number, item, spec.kind, info->min_args, info->max_args,
                              spec.args.size()));
    }
    const bool integral_kind = spec.kind == "dense" || spec.kind == "conv" ||
                               spec.kind == "maxpool" || spec.kind == "avgpool";
    for (std::size_t a = 0; integral_kind && a < spec.args.size(); ++a) {
      const double value = spec.args[a];
      const double smallest = spec.kind == "conv" && a == 3 ? 0 : 1;  // padding may be 0
      if (value != std::floor(value) || value < smallest || value > 1e6) {
        throw Error(
            fmt::format("layers: layer {} \"{}\": argument {} of {} must be an integer >= {}",
                        number, item, a + 1, spec.kind, smallest));
      }
    }
    if (spec.kind == "dropout" && !(spec.args[0] >= 0 && spec.args[0] < 1)) {
      throw Error(fmt::format("layers: layer {} \"{}\": dropout rate {} is outside [0, 1)", number,
                              item, spec.args[0]));
    }
    layers.push_back(std::move(spec));
    position = comma + 1;
  }
  return layers;
}

std::string preset_layers(std::string_view preset) {
  if (preset == "mlp") return "dense:256,relu,dense:128,relu,dense:10";
  if (preset == "cnn") {
    return "conv:32:5,relu,maxpool:2,conv:64:5,relu,maxpool:2,flatten,dense:1024,relu,"
           "dropout:0.5,dense:10";
  }
  if (preset == "cnn-bn") {
    return "conv:32:5,batchnorm,relu,maxpool:2,conv:64:5,batchnorm,relu,maxpool:2,flatten,"
           "dense:1024,batchnorm,relu,dropout:0.5,dense:10";
  }
  throw Error(fmt::format("unknown model preset \"{}\" (known: mlp, cnn, cnn-bn)", preset));
}

Model::Model(std::vector<LayerSpec> layers, ModelOptions options)
    : specs_(std::move(layers)), options_(std::move(options)) {
  if (specs_.empty()) throw Error("Model: no layers given");
  if (options_.classes < 2)
    throw Error(fmt::format("Model: {} classes; at least 2 are needed", options_.classes));
  if (options_.batch_size < 1)
    throw Error(fmt::format("Model: batch size {} must be at least 1", options_.batch_size));
  if (options_.l1 < 0 || options_.l2 < 0 || !std::isfinite(options_.l1) ||
      !std::isfinite(options_.l2)) {
    throw Error(fmt::format("Model: penalties must be finite and >= 0 (l1 {}, l2 {})", options_.l1,
                            options_.l2));
  }
  // Declared with a batch of at least 2 (a batch_dynamic input of 1 cannot be told from a
  // broadcast axis); every batch size runs.
  const std::int64_t declared = std::max<std::int64_t>(options_.batch_size, 2);
  std::vector<std::int64_t> input_dims{declared};
  input_dims.insert(input_dims.end(), options_.example_shape.begin(), options_.example_shape.end());
  input_ = graph_.input("images", Shape(input_dims), DType::f32, /*batch_dynamic=*/true);
  labels_ = graph_.input("labels", {declared}, DType::i32, true);
  targets_ = graph_.input("targets", {declared, options_.classes}, DType::f32, true);
  Value x = input_;
  for (std::size_t i = 0; i < specs_.size(); ++i) x = build_layer(specs_[i], i, x);
  if (x.rank() != 2 || x.shape()[1] != options_.classes) {
    throw Error(
        fmt::format("Model: the last layer gives {} per batch; a classifier needs [batch, {}] "
                    "(end the stack with dense:{})",
                    x.shape(), options_.classes, options_.classes));
  }
  logits_ = x;
  {
    Graph::NameScope scope(graph_, "loss");
    data_loss_ = sparse_cross_entropy(logits_, labels_);
    soft_loss_ = cross_entropy_with_logits(logits_, targets_);
    error_ = classification_error(logits_, labels_);
    Value penalty = graph_.scalar(0.0);
    if (options_.l1 > 0) penalty = penalty + l1_penalty(weights_, options_.l1);
    if (options_.l2 > 0) penalty = penalty + l2_penalty(weights_, options_.l2);
    regularization_ = penalty;
  }
}

Value Model::build_layer(const LayerSpec& spec, std::size_t index, Value x) {
  const std::string name = fmt::format("{}{}", spec.kind, index + 1);
  Graph::NameScope scope(graph_, name);
  const std::uint64_t seed = options_.seed * 1000003ULL + index;
  std::int64_t count = 0;
  auto next_is_relu_like = [&] {
    return (index + 1 < specs_.size() && relu_like(specs_[index + 1].kind)) ||
           (index + 2 < specs_.size() && specs_[index + 1].kind == "batchnorm" &&
            relu_like(specs_[index + 2].kind));
  };
  auto init_weight = [&](Shape shape) {
    std::string init = options_.init;
    if (init == "auto") init = next_is_relu_like() ? "he" : "xavier";
    if (init == "he") return init::he_normal(shape, seed);
    if (init == "xavier") return init::xavier_uniform(shape, seed);
    if (init == "lecun") return init::lecun_normal(shape, seed);
    throw Error(fmt::format("Model: unknown init \"{}\" (auto, he, xavier, lecun)", options_.init));
  };
  auto add_parameter = [&](const std::string& pname, const Tensor& value, bool weight) {
    Value p = graph_.parameter(fmt::format("{}.{}", name, pname), value);
    parameters_.push_back(p);
    if (weight) weights_.push_back(p);
    count += value.numel();
    return p;
  };
  const auto& k = spec.kind;
  Value y;
  if (k == "dense") {
    if (x.rank() > 2) x = flatten(x);
    const auto out = static_cast<std::int64_t>(spec.args[0]);
    Value w = add_parameter("weight", init_weight({x.shape()[1], out}), true);
    Value b = add_parameter("bias", Tensor({out}, DType::f32), false);
    y = matmul(x, w) + b;
  } else if (k == "conv") {
    if (x.rank() != 4) {
      throw Error(
          fmt::format("Model: layer {} ({}) needs [N,C,H,W] input, got {}; give the model "
                      "an example shape such as 1,28,28",
                      index + 1, spec.str(), x.shape()));
    }
    const auto filters = static_cast<std::int64_t>(spec.args[0]);
    const auto kernel = static_cast<std::int64_t>(spec.args[1]);
    const auto stride = spec.args.size() > 2 ? static_cast<std::int64_t>(spec.args[2]) : 1;
    const auto padding =
        spec.args.size() > 3 ? static_cast<std::int64_t>(spec.args[3]) : kernel / 2;
    Value w = add_parameter("weight", init_weight({filters, x.shape()[1], kernel, kernel}), true);
    Value b = add_parameter("bias", Tensor({filters}, DType::f32), false);
    Conv2dOptions conv;
    conv.stride = {stride, stride};
    conv.padding = {padding, padding};
    y = conv2d(x, w, b, conv);
  } else if (k == "maxpool" || k == "avgpool") {
    const auto kernel = static_cast<std::int64_t>(spec.args[0]);
    const auto stride = spec.args.size() > 1 ? static_cast<std::int64_t>(spec.args[1]) : kernel;
    y = k == "maxpool" ? max_pool2d(x, {kernel, kernel}, {stride, stride})
                       : avg_pool2d(x, {kernel, kernel}, {stride, stride});
  } else if (k == "globalavgpool") {
    y = global_avg_pool(x);
  } else if (k == "batchnorm") {
    const std::int64_t channels = x.shape()[1];
    Value gamma = add_parameter("gamma", Tensor::full({channels}, 1.0), false);
    Value beta = add_parameter("beta", Tensor({channels}, DType::f32), false);
    Value mean = graph_.parameter(name + ".running_mean", Tensor({channels}, DType::f32), false);
    Value var = graph_.parameter(name + ".running_var", Tensor::full({channels}, 1.0), false);
    y = batch_norm(x, gamma, beta, mean, var);
  } else if (k == "layernorm") {
    const std::int64_t features = x.shape()[x.rank() - 1];
    Value gamma = add_parameter("gamma", Tensor::full({features}, 1.0), false);
    Value beta = add_parameter("beta", Tensor({features}, DType::f32), false);
    y = layer_norm(x, gamma, beta);
  } else if (k == "dropout") {
    y = dropout(x, spec.args[0], static_cast<std::int64_t>(index + 1));
  } else if (k == "flatten") {
    y = flatten(x);
  } else if (k == "relu") {
    y = relu(x);
  } else if (k == "tanh") {
    y = tanh(x);
  } else if (k == "sigmoid") {
    y = sigmoid(x);
  } else if (k == "gelu") {
    y = gelu(x);
  } else if (k == "softplus") {
    y = softplus(x);
  } else if (k == "identity") {
    y = identity(x);
  } else if (k == "elu") {
    y = elu(x, spec.args.empty() ? 1.0 : spec.args[0]);
  } else if (k == "leaky_relu") {
    y = leaky_relu(x, spec.args.empty() ? 0.01 : spec.args[0]);
  } else {
    throw Error(fmt::format("Model: unknown layer kind \"{}\"", k));
  }
  summary_.push_back({name, spec.str(), y.shape(), count});
  return y;
}

std::int64_t Model::parameter_count() const {
  std::int64_t n = 0;
  for (const auto& s : summary_) n += s.parameters;
  return n;
}

std::string Model::summary() const {
  std::string out =
      fmt::format("{:<16} {:<14} {:<20} {:>12}\n", "layer", "spec", "output", "parameters");
  out += fmt::format("{:<16} {:<14} {:<20} {:>12}\n", "input", "", input_.shape().str(), 0);
  for (const auto& s : summary_) {
    out += fmt::format("{:<16} {:<14} {:<20} {:>12}\n", s.name, s.kind, s.output_shape.str(),
                       s.parameters);
  }
  out += fmt::format("total trainable parameters: {}\n", parameter_count());
  return out;
}

}  // namespace dagrad
