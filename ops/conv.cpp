// conv2d (+ its data and weights gradients), max_pool2d, avg_pool2d (+ their gradients).
// Layouts: NCHW images, OIHW weights, grouped weights [O, I/G, KH, KW], which is the same
// memory as oneDNN's goihw [G, O/G, I/G, KH, KW]. Tensors stay plain row-major between nodes;
// oneDNN kernels reorder to the blocked layouts their primitives prefer and back (see
// ReorderingKernel, pool_md). Reference kernels accumulate in double.
#include "ops/conv.hpp"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <random>
#include <tuple>
#include <unordered_map>

#include "ops/conv_kernels.hpp"
#include "ops/cpu.hpp"
#ifdef DAGRAD_X86
#include <immintrin.h>
#endif

#include "ops/common.hpp"
#include "ops/reduction.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

using Ints = std::vector<std::int64_t>;

Ints ints(Size2 pair) {
  return {pair[0], pair[1]};
}

// A two-element integer attribute, validated by shape rules.
Size2 pair_attr(const Attrs& attrs, const std::string& key) {
  const Ints& v = attrs.integers(key);
  return {v.at(0), v.at(1)};
}

// Attribute readers for shape rules: a missing or mistyped attribute fails naming the op.
const Ints& ints_attr(const ShapeCall& call, const std::string& key) {
  if (!call.attrs.has(key)) call.fail("attribute '{}' is missing", key);
  try {
    return call.attrs.integers(key);
  } catch (const GraphError& e) {
    call.fail("{}", e.what());
  }
}

std::int64_t int_attr(const ShapeCall& call, const std::string& key) {
  if (!call.attrs.has(key)) call.fail("attribute '{}' is missing", key);
  try {
    return call.attrs.integer(key);
  } catch (const GraphError& e) {
    call.fail("{}", e.what());
  }
}

// Sizes, strides, paddings and dilations above this are refused so that the shape arithmetic
// cannot overflow.
constexpr std::int64_t max_window_attr = std::int64_t{1} << 20;

Size2 checked_pair(const ShapeCall& call, const std::string& key, std::int64_t minimum,
                   std::string_view meaning) {
  const Ints& v = ints_attr(call, key);
  if (v.size() != 2) call.fail("{} must have two values {{height, width}}, got {}", key, Shape(v));
  if (v[0] < minimum || v[1] < minimum) {
    call.fail("{} must be at least {} ({}), got {}", key, minimum, meaning, Shape(v));
  }
  if (v[0] > max_window_attr || v[1] > max_window_attr) {
    call.fail("{} {} is too large (at most {})", key, Shape(v), max_window_attr);
  }
  return {v[0], v[1]};
}

Shape shape_attr(const ShapeCall& call, const std::string& key) {
  const Ints& v = ints_attr(call, key);
  if (v.size() != 4) call.fail("{} must have four values [N, C, H, W], got {}", key, Shape(v));
  for (auto d : v) {
    if (d < 0) call.fail("{} {} has a negative size", key, Shape(v));
  }
  return Shape(v);
}

// Output size of one spatial axis: floor((in + 2 pad − span) / stride) + 1, span = the
// kernel's extent with dilation.
std::int64_t output_size(std::int64_t in, std::int64_t pad, std::int64_t span,
                         std::int64_t stride) {
  return (in + 2 * pad - span) / stride + 1;
}

// ---- convolution geometry -----------------------------------------------------------------

struct ConvGeometry {
  std::int64_t N, C, H, W;  // input
  std::int64_t O, KH, KW;   // weights [O, C/G, KH, KW]
  std::int64_t OH, OW;      // output
  std::int64_t G;
  Size2 stride, padding, dilation;
  std::int64_t in_per_group() const { return C / G; }
  std::int64_t out_per_group() const { return O / G; }
};

Conv2dOptions conv_options(const Attrs& attrs) {
  return {pair_attr(attrs, "stride"), pair_attr(attrs, "padding"), pair_attr(attrs, "dilation"),
          attrs.integer("groups")};
}

Attrs conv_attrs(const Conv2dOptions& options) {
  return {{"stride", ints(options.stride)},
          {"padding", ints(options.padding)},
          {"dilation", ints(options.dilation)},
          {"groups", options.groups}};
}

// Geometry of shapes a shape rule already accepted.
ConvGeometry conv_geometry(const Attrs& attrs, const Shape& x, const Shape& w) {
  ConvGeometry g{};
  g.N = x[0], g.C = x[1], g.H = x[2], g.W = x[3];
  g.O = w[0], g.KH = w[2], g.KW = w[3];
  const Conv2dOptions options = conv_options(attrs);
  g.G = options.groups;
  g.stride = options.stride, g.padding = options.padding, g.dilation = options.dilation;
  g.OH = output_size(g.H, g.padding[0], g.dilation[0] * (g.KH - 1) + 1, g.stride[0]);
  g.OW = output_size(g.W, g.padding[1], g.dilation[1] * (g.KW - 1) + 1, g.stride[1]);
  return g;
}

// Checks a convolution of input shape x by weights shape w; returns the output shape.
Shape check_conv(const ShapeCall& call, const Shape& x, const Shape& w) {
  if (x.rank() != 4) call.fail("input must be [N, C, H, W], got {}", x);
  if (w.rank() != 4) call.fail("weights must be [O, C / groups, KH, KW], got {}", w);
  const Size2 stride = checked_pair(call, "stride", 1, "1 moves the kernel one pixel");
  const Size2 padding = checked_pair(call, "padding", 0, "zeros added on each side");
  const Size2 dilation = checked_pair(call, "dilation", 1, "1 means no dilation");
  const std::int64_t groups = int_attr(call, "groups");
  if (groups < 1) call.fail("groups must be at least 1, got {}", groups);
  if (groups > x[1]) call.fail("{} groups but the input {} has only {} channels", groups, x, x[1]);
  if (x[1] != w[1] * groups) {
    call.fail(
        "input has {} channels but the weights expect {} ({} per group x {} groups; x {}, w {})",
        x[1], w[1] * groups, w[1], groups, x, w);
  }
  if (w[0] % groups != 0) {
    call.fail("{} output channels are not divisible by {} groups (w {})", w[0], groups, w);
  }
  if (x.numel() == 0 || w.numel() == 0) {
    call.fail("zero-size input {} or weights {}: the convolution would have no output", x, w);
  }
  const std::int64_t span_h = dilation[0] * (w[2] - 1) + 1;
  const std::int64_t span_w = dilation[1] * (w[3] - 1) + 1;
  const std::int64_t padded_h = x[2] + 2 * padding[0];
  const std::int64_t padded_w = x[3] + 2 * padding[1];
  if (span_h > padded_h || span_w > padded_w) {
    call.fail(
        "the kernel spans {}x{} (dilation {}x{}) but the padded input is only {}x{} (x {}, "
        "padding {}x{}): the kernel is larger than the padded input",
        span_h, span_w, dilation[0], dilation[1], padded_h, padded_w, x, padding[0], padding[1]);
  }
  return Shape{x[0], w[0], output_size(x[2], padding[0], span_h, stride[0]),
               output_size(x[3], padding[1], span_w, stride[1])};
}

// Calls f(x_index, w_index, y_index) for every multiply of the convolution whose input tap
// lies inside the image (taps in the zero padding contribute nothing).
template <class F>
void for_each_tap(const ConvGeometry& g, F f) {
  const std::int64_t ipg = g.in_per_group(), opg = g.out_per_group();
  for (std::int64_t n = 0; n < g.N; ++n) {
    for (std::int64_t o = 0; o < g.O; ++o) {
      const std::int64_t group = o / opg;
      for (std::int64_t i = 0; i < g.OH; ++i) {
        for (std::int64_t j = 0; j < g.OW; ++j) {
          const std::int64_t y_index = ((n * g.O + o) * g.OH + i) * g.OW + j;
          for (std::int64_t c = 0; c < ipg; ++c) {
            const std::int64_t channel = group * ipg + c;
            for (std::int64_t p = 0; p < g.KH; ++p) {
              const std::int64_t h = i * g.stride[0] - g.padding[0] + p * g.dilation[0];
              if (h < 0 || h >= g.H) continue;
              for (std::int64_t q = 0; q < g.KW; ++q) {
                const std::int64_t w = j * g.stride[1] - g.padding[1] + q * g.dilation[1];
                if (w < 0 || w >= g.W) continue;
                const std::int64_t x_index = ((n * g.C + channel) * g.H + h) * g.W + w;
                const std::int64_t w_index = ((o * ipg + c) * g.KH + p) * g.KW + q;
                f(x_index, w_index, y_index);
              }
            }
          }
        }
      }
    }
  }
}

template <class T>
void store(Tensor& out, const std::vector<double>& acc) {
  T* dst = out.data<T>();
  for (std::size_t i = 0; i < acc.size(); ++i) dst[i] = static_cast<T>(acc[i]);
}

// ---- oneDNN convolution -------------------------------------------------------------------

// Plain (row-major) descriptors of the node's tensors, and `any` descriptors of the same
// dims with which oneDNN picks its preferred (blocked) layouts.
struct ConvDescs {
  dnnl::memory::desc src, weights, dst;
  dnnl::memory::desc src_any, weights_any, dst_any;
  dnnl::memory::dims strides, dilates, padding;
};

ConvDescs conv_descs(const ConvGeometry& g) {
  using dims = dnnl::memory::dims;
  using tag = dnnl::memory::format_tag;
  ConvDescs d;
  d.src = plain_md(Shape{g.N, g.C, g.H, g.W}, DType::f32);
  d.dst = plain_md(Shape{g.N, g.O, g.OH, g.OW}, DType::f32);
  // [O, I/G, KH, KW] row-major is goihw [G, O/G, I/G, KH, KW] row-major.
  d.weights =
      g.G == 1 ? plain_md(Shape{g.O, g.C, g.KH, g.KW}, DType::f32)
               : plain_md(Shape{g.G, g.out_per_group(), g.in_per_group(), g.KH, g.KW}, DType::f32);
  const auto f32 = dnnl::memory::data_type::f32;
  d.src_any = dnnl::memory::desc(d.src.dims(), f32, tag::any);
  d.weights_any = dnnl::memory::desc(d.weights.dims(), f32, tag::any);
  d.dst_any = dnnl::memory::desc(d.dst.dims(), f32, tag::any);
  d.strides = dims{g.stride[0], g.stride[1]};
  d.dilates = dims{g.dilation[0] - 1, g.dilation[1] - 1};  // oneDNN counts dilation from 0
  d.padding = dims{g.padding[0], g.padding[1]};
  return d;
}

// A primitive created with `any` layouts, run on the node's plain tensors: each argument whose
// chosen layout differs from plain gets an internal buffer in the kernel's scratch and a reorder
// (before the primitive for inputs, after it for outputs). Primitives and reorders are created
// once.
class ReorderingKernel final : public Kernel {
 public:
  ReorderingKernel(dnnl::primitive primitive, const dnnl::primitive_desc& pd,
                   const std::vector<PrimitiveArg>& args, dnnl::engine& engine) {
    std::vector<std::pair<int, dnnl::memory>> used;
    for (const PrimitiveArg& a : args) {
      Slot slot{a.output, a.index, dnnl::memory(a.md, engine, nullptr), {}, {}, 0};
      const dnnl::memory::desc chosen = pd.query_md(dnnl::query::exec_arg_md, a.arg);
      if (chosen != a.md) {
        slot.internal = dnnl::memory(chosen, engine, nullptr);
        slot.offset = scratch_.reserve(chosen.get_size());
        const dnnl::memory& from = a.output ? slot.internal : slot.user;
        const dnnl::memory& to = a.output ? slot.user : slot.internal;
        slot.reorder =
            PreparedPrimitive(dnnl::reorder(from, to), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
      }
      used.emplace_back(a.arg, slot.internal ? slot.internal : slot.user);
      slots_.push_back(std::move(slot));
    }
    primitive_ = PreparedPrimitive(std::move(primitive), used);
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  const char* library() const override { return "oneDNN"; }
  void run(const KernelCall& call) override {
    dnnl::stream& stream = *call.context.stream;
    const char* what = call.node.op.c_str();
    std::byte* scratch = scratch_.base(call.context, what);
    for (Slot& slot : slots_) {
      const Tensor& t = slot.output ? call.outputs[static_cast<std::size_t>(slot.index)]
                                    : call.inputs[static_cast<std::size_t>(slot.index)];
      slot.user.set_data_handle(const_cast<void*>(t.raw()));
      if (slot.internal) slot.internal.set_data_handle(scratch + slot.offset);
      if (!slot.output && slot.internal) slot.reorder.execute(stream, what);
    }
    primitive_.execute(stream, what);
    for (Slot& slot : slots_) {
      if (slot.output && slot.internal) slot.reorder.execute(stream, what);
    }
  }

 private:
  struct Slot {
    bool output;
    int index;
    dnnl::memory user;      // the node's plain tensor (handle set each run)
    dnnl::memory internal;  // empty when the primitive uses the plain layout
    PreparedPrimitive reorder;
    std::size_t offset;  // of `internal` in the scratch
  };
  PreparedPrimitive primitive_;
  std::vector<Slot> slots_;
  ScratchLayout scratch_;
};

bool all_f32(const KernelBuild& build) {
  for (const auto& d : build.inputs) {
    if (d.dtype != DType::f32) return false;
  }
  for (const auto& d : build.outputs) {
    if (d.dtype != DType::f32) return false;
  }
  return true;
}

// oneDNN refuses some configurations (dnnl::error when creating the primitive descriptor);
// the runtime then runs the reference kernel for that node instead.
KernelFactory or_reference(KernelFactory make) {
  return [make = std::move(make)](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    try {
      return make(build);
    } catch (const dnnl::error&) {
      return nullptr;
    }
  };
}

// The forward primitive descriptor backward primitives take as a hint.
dnnl::convolution_forward::primitive_desc conv_forward_hint(const ConvDescs& d,
                                                            dnnl::engine& engine) {
  return dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                      dnnl::algorithm::convolution_direct, d.src_any, d.weights_any,
                                      dnnl::memory::desc(), d.dst_any, d.strides, d.dilates,
                                      d.padding, d.padding),
      engine);
}

// Layouts: `any` for every convolution primitive, with reorders from and to the plain tensors
// inside the kernel. Measured (CPU time per run, batch 64, [64,32,28,28] * [64,32,3,3], pad 1,
// 1 thread): forward 36 -> 25 ms, data gradient 46 -> 22 ms, weights gradient 57 -> 34 ms; with
// 2 threads on a loaded machine the plain weights gradient (gemm) took 250 ms against 70 ms.
// With `activation`, the primitive applies it to its output as an eltwise post-op (the fused
// conv2d + relu/tanh/sigmoid of the plan's fusion pass).
std::unique_ptr<Kernel> conv_forward_kernel(const KernelBuild& build,
                                            std::optional<dnnl::algorithm> activation) {
  if (!all_f32(build)) return nullptr;
  const ConvGeometry g =
      conv_geometry(build.node.attrs, build.inputs[0].shape, build.inputs[1].shape);
  const ConvDescs d = conv_descs(g);
  const bool has_bias = build.inputs.size() == 3;
  const dnnl::memory::desc bias = has_bias ? plain_md(build.inputs[2]) : dnnl::memory::desc();
  dnnl::primitive_attr attr;
  if (activation) {
    dnnl::post_ops post_ops;
    post_ops.append_eltwise(1.f, *activation, 0.f, 0.f);
    attr.set_post_ops(post_ops);
  }
  dnnl::convolution_forward::primitive_desc pd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                      dnnl::algorithm::convolution_direct, d.src_any, d.weights_any,
                                      bias, d.dst_any, d.strides, d.dilates, d.padding, d.padding),
      attr, build.engine);
  std::vector<PrimitiveArg> args{input_arg(DNNL_ARG_SRC, 0, d.src),
                                 input_arg(DNNL_ARG_WEIGHTS, 1, d.weights),
                                 output_arg(DNNL_ARG_DST, 0, d.dst)};
  if (has_bias) args.push_back(input_arg(DNNL_ARG_BIAS, 2, bias));
  return std::make_unique<ReorderingKernel>(dnnl::convolution_forward(pd), pd, args, build.engine);
}

std::unique_ptr<Kernel> conv_forward_onednn(const KernelBuild& build) {
  return conv_forward_kernel(build, std::nullopt);
}

// conv2d followed by relu, tanh or sigmoid: one primitive with an eltwise post-op. Measured in
// the CNN training step (batch 64, 2 threads, DAGRAD_PROFILE=1 bench_train): the separate relu
// passes over [64,32,28,28] and [64,64,14,14] took 0.29 and 0.16 ms.
std::unique_ptr<Kernel> conv_fuse_activation(const KernelBuild& build, const Node& consumer) {
  std::optional<dnnl::algorithm> activation;
  if (consumer.op == "relu") activation = dnnl::algorithm::eltwise_relu;
  if (consumer.op == "tanh") activation = dnnl::algorithm::eltwise_tanh;
  if (consumer.op == "sigmoid") activation = dnnl::algorithm::eltwise_logistic;
  if (!activation || consumer.inputs.size() != 1) return nullptr;
  try {
    return conv_forward_kernel(build, activation);
  } catch (const dnnl::error&) {
    return nullptr;
  }
}

std::unique_ptr<Kernel> conv_backward_data_onednn(const KernelBuild& build) {
  if (!all_f32(build)) return nullptr;
  const ConvGeometry g =
      conv_geometry(build.node.attrs, build.outputs[0].shape, build.inputs[1].shape);
  const ConvDescs d = conv_descs(g);
  dnnl::convolution_backward_data::primitive_desc pd(
      dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, d.src_any,
                                            d.weights_any, d.dst_any, d.strides, d.dilates,
                                            d.padding, d.padding),
      build.engine, conv_forward_hint(d, build.engine));
  return std::make_unique<ReorderingKernel>(
      dnnl::convolution_backward_data(pd), pd,
      std::vector<PrimitiveArg>{input_arg(DNNL_ARG_DIFF_DST, 0, d.dst),
                                input_arg(DNNL_ARG_WEIGHTS, 1, d.weights),
                                output_arg(DNNL_ARG_DIFF_SRC, 0, d.src)},
      build.engine);
}

// Layouts for a weights gradient. One input channel (a first layer): `any` picks nChw8c, which
// pads the single channel to 8 and runs 8x the work. With NHWC src and dy oneDNN runs a JIT
// kernel for this case, and an NCHW tensor with C = 1 already is NHWC memory, so only dy is
// reordered. Measured (batch 128, [128,1,28,28] -> 32 channels, 5x5 pad 2, primitive only):
// nChw8c 14-26 ms, NHWC 1.7-2.0 ms; plain NCHW (gemm) 75+ ms. With more channels the blocked
// layouts win (C 32: nChw8c 32 ms, NHWC 37 ms), so only C = 1 takes this path: it sets `d`'s
// src and dst `any` descs to NHWC. Only for stride 1: with NHWC, a 1x1 kernel and a stride of 2
// or 3, oneDNN 2.6's jit_1x1:avx2 weights gradient is wrong for many sizes (e.g. [2,1,8,8] by
// one 1x1 filter, stride 2: errors of the order of the gradient; 48 of 7,208 shapes with one
// input channel, every failure NHWC and 1x1, none with the blocked layouts; found by
// tests/test_random_models.cpp; tools/onednn_1x1_repro.cpp reproduces it with oneDNN alone).
// Returns the md through which the node's x is read.
dnnl::memory::desc weights_gradient_layouts(const ConvGeometry& g, ConvDescs& d) {
  if (g.C != 1 || g.G != 1 || g.stride[0] != 1 || g.stride[1] != 1) return d.src;
  const auto nhwc = dnnl::memory::format_tag::nhwc;
  const auto f32 = dnnl::memory::data_type::f32;
  d.src_any = dnnl::memory::desc(d.src.dims(), f32, nhwc);
  d.dst_any = dnnl::memory::desc(d.dst.dims(), f32, nhwc);
  return d.src_any;
}

std::unique_ptr<Kernel> conv_backward_weights_onednn(const KernelBuild& build) {
  if (!all_f32(build)) return nullptr;
  const ConvGeometry g =
      conv_geometry(build.node.attrs, build.inputs[0].shape, build.outputs[0].shape);
  ConvDescs d = conv_descs(g);
  const dnnl::memory::desc src_user = weights_gradient_layouts(g, d);
  dnnl::convolution_backward_weights::primitive_desc pd(
      dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, d.src_any,
                                               d.weights_any, d.dst_any, d.strides, d.dilates,
                                               d.padding, d.padding),
      build.engine, conv_forward_hint(d, build.engine));
  return std::make_unique<ReorderingKernel>(
      dnnl::convolution_backward_weights(pd), pd,
      std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, src_user),
                                input_arg(DNNL_ARG_DIFF_DST, 1, d.dst),
                                output_arg(DNNL_ARG_DIFF_WEIGHTS, 0, d.weights)},
      build.engine);
}

// ---- convolution samples ------------------------------------------------------------------

Attrs conv_sample_attrs(Size2 stride, Size2 padding, Size2 dilation, std::int64_t groups) {
  return conv_attrs({stride, padding, dilation, groups});
}

struct ConvCase {
  std::string label;
  Shape x, w;
  Attrs attrs;
  bool bias;
};

std::vector<ConvCase> conv_cases() {
  return {
      {"3x3 valid",
       {2, 3, 5, 5},
       {4, 3, 3, 3},
       conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 1),
       false},
      {"stride 2 padding 1 with bias",
       {2, 3, 5, 5},
       {4, 3, 3, 3},
       conv_sample_attrs({2, 2}, {1, 1}, {1, 1}, 1),
       true},
      {"dilation 2 padding 1",
       {2, 3, 5, 5},
       {4, 3, 3, 3},
       conv_sample_attrs({1, 1}, {1, 1}, {2, 2}, 1),
       false},
      {"groups 2 with bias",
       {2, 4, 5, 5},
       {4, 2, 3, 3},
       conv_sample_attrs({1, 1}, {1, 1}, {1, 1}, 2),
       true},
      {"rectangular kernel, mixed strides",
       {1, 2, 6, 5},
       {3, 2, 2, 3},
       conv_sample_attrs({2, 1}, {1, 0}, {1, 1}, 1),
       true},
      // Rows and columns 2, 5 and 6 are read by no window: their data gradient must be zero.
      {"stride 3 skips pixels",
       {1, 2, 7, 7},
       {2, 2, 2, 2},
       conv_sample_attrs({3, 3}, {0, 0}, {1, 1}, 1),
       true},
      // One input channel: the weights gradient runs oneDNN on NHWC layouts.
      {"one input channel, padding 2",
       {2, 1, 6, 6},
       {3, 1, 3, 3},
       conv_sample_attrs({1, 1}, {2, 2}, {1, 1}, 1),
       true},
      {"depthwise stride 2 dilation 2",
       {1, 3, 7, 7},
       {3, 1, 3, 3},
       conv_sample_attrs({2, 2}, {2, 2}, {2, 2}, 3),
       false},
  };
}

Shape conv_output_shape(const ConvCase& c) {
  const ConvGeometry g = conv_geometry(c.attrs, c.x, c.w);
  return Shape{g.N, g.O, g.OH, g.OW};
}

Attrs with(Attrs attrs, const std::string& key, AttrValue value) {
  attrs.set(key, std::move(value));
  return attrs;
}

// ---- convolution ops ----------------------------------------------------------------------

void register_conv2d(OpRegistry& registry) {
  OpDef def;
  def.name = "conv2d";
  def.formula =
      "y[n,o,i,j] = b[o] + Σ_{c,p,q} x[n, g·C/G + c, i·sh − ph + p·dh, j·sw − pw + q·dw] · "
      "w[o,c,p,q], g = o / (O/G); x is zero outside the image";
  def.min_inputs = 2;
  def.max_inputs = 3;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    Shape y = check_conv(call, call.inputs[0].shape, call.inputs[1].shape);
    if (call.inputs.size() == 3 && call.inputs[2].shape != Shape{y[1]}) {
      call.fail("bias must be [{}] (one value per output channel), got {}", y[1], call.inputs[2]);
    }
    return {TensorDesc{call.inputs[0].dtype, y}};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Value g = c.grad();
    const Conv2dOptions options = conv_options(c.attrs());
    const Value& x = c.inputs[0];
    const Value& w = c.inputs[1];
    std::vector<std::optional<Value>> grads(c.inputs.size());
    if (c.needs[0]) grads[0] = conv2d_backward_data(g, w, x.shape(), options);
    if (c.needs[1]) grads[1] = conv2d_backward_weights(x, g, {w.shape()[2], w.shape()[3]}, options);
    if (c.inputs.size() == 3 && c.needs[2]) grads[2] = sum(g, {0, 2, 3});
    return grads;
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const ConvGeometry g =
        conv_geometry(call.attrs(), call.inputs[0].shape(), call.inputs[1].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* x = call.inputs[0].data<T>();
      const T* w = call.inputs[1].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      if (call.inputs.size() == 3) {
        const T* bias = call.inputs[2].data<T>();
        const std::int64_t plane = g.OH * g.OW;
        for (std::size_t i = 0; i < acc.size(); ++i) {
          acc[i] = static_cast<double>(bias[(static_cast<std::int64_t>(i) / plane) % g.O]);
        }
      }
      for_each_tap(g, [&](std::int64_t xi, std::int64_t wi, std::int64_t yi) {
        acc[static_cast<std::size_t>(yi)] +=
            static_cast<double>(x[xi]) * static_cast<double>(w[wi]);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference(conv_forward_onednn);
  def.fuse_consumer = conv_fuse_activation;
  def.samples = [] {
    std::vector<Sample> samples;
    for (const ConvCase& c : conv_cases()) {
      std::vector<InputSpec> inputs{spec(c.x), spec(c.w)};
      if (c.bias) inputs.push_back(spec(Shape{c.w[0]}));
      samples.push_back(Sample{c.label, inputs, c.attrs});
    }
    return samples;
  };
  def.error_samples = [] {
    const Attrs plain = conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 1);
    return std::vector<ErrorSample>{
        {"channels differ",
         {spec({1, 3, 5, 5}), spec({4, 4, 3, 3})},
         plain,
         "input has 3 channels but the weights expect 4"},
        {"out-channels not divisible by groups",
         {spec({1, 4, 5, 5}), spec({3, 2, 3, 3})},
         conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 2),
         "not divisible by 2 groups"},
        {"kernel larger than padded input",
         {spec({1, 3, 2, 2}), spec({4, 3, 3, 3})},
         plain,
         "larger than the padded input"},
        {"dilated kernel larger than padded input",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3})},
         conv_sample_attrs({1, 1}, {0, 0}, {3, 3}, 1),
         "larger than the padded input"},
        {"zero-size batch", {spec({0, 3, 5, 5}), spec({4, 3, 3, 3})}, plain, "zero-size"},
        {"stride 0",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3})},
         conv_sample_attrs({0, 1}, {0, 0}, {1, 1}, 1),
         "stride must be at least 1"},
        {"dilation 0",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3})},
         conv_sample_attrs({1, 1}, {0, 0}, {0, 1}, 1),
         "dilation must be at least 1"},
        {"rank 3 input", {spec({3, 5, 5}), spec({4, 3, 3, 3})}, plain, "must be [N, C, H, W]"},
        {"missing attributes",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3})},
         {},
         "attribute 'stride' is missing"},
        {"huge padding",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3})},
         conv_sample_attrs({1, 1}, {std::int64_t{1} << 40, 0}, {1, 1}, 1),
         "too large"},
        {"more groups than channels",
         {spec({1, 3, 5, 5}), spec({4, 1, 3, 3})},
         conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 4),
         "4 groups but the input"},
        {"bias of the wrong size",
         {spec({1, 3, 5, 5}), spec({4, 3, 3, 3}), spec({3})},
         plain,
         "bias must be [4]"},
    };
  };
  registry.add(std::move(def));
}

void register_conv2d_backward_data(OpRegistry& registry) {
  OpDef def;
  def.name = "conv2d_backward_data";
  def.formula =
      "dx = conv2d's adjoint in x: dx[n, g·C/G + c, i·sh − ph + p·dh, j·sw − pw + q·dw] += "
      "dy[n,o,i,j] · w[o,c,p,q] (taps inside the image)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    Shape x = shape_attr(call, "input_shape");
    // The batch follows dy, so a plan can re-specialise this node for another batch size.
    if (x.rank() == 4 && call.inputs[0].shape.rank() == 4) x[0] = call.inputs[0].shape[0];
    const Shape y = check_conv(call, x, call.inputs[1].shape);
    if (call.inputs[0].shape != y) {
      call.fail("dy {} does not match the output {} of a convolution of {} by {}", call.inputs[0],
                y, x, call.inputs[1]);
    }
    return {TensorDesc{call.inputs[0].dtype, x}};
  };
  // dx is bilinear in (dy, w): ⟨G, dx⟩ = ⟨conv2d(G, w), dy⟩, so d/d dy = conv2d(G, w) and
  // d/dw = conv2d_backward_weights(G, dy).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Value g = c.grad();
    const Conv2dOptions options = conv_options(c.attrs());
    const Value& dy = c.inputs[0];
    const Value& w = c.inputs[1];
    std::optional<Value> d_dy, d_w;
    if (c.needs[0]) d_dy = conv2d(g, w, std::nullopt, options);
    if (c.needs[1]) d_w = conv2d_backward_weights(g, dy, {w.shape()[2], w.shape()[3]}, options);
    return {d_dy, d_w};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const ConvGeometry g =
        conv_geometry(call.attrs(), call.outputs[0].shape(), call.inputs[1].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* dy = call.inputs[0].data<T>();
      const T* w = call.inputs[1].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      for_each_tap(g, [&](std::int64_t xi, std::int64_t wi, std::int64_t yi) {
        acc[static_cast<std::size_t>(xi)] +=
            static_cast<double>(dy[yi]) * static_cast<double>(w[wi]);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference(conv_backward_data_onednn);
  def.samples = [] {
    std::vector<Sample> samples;
    for (const ConvCase& c : conv_cases()) {
      samples.push_back(Sample{c.label,
                               {spec(conv_output_shape(c)), spec(c.w)},
                               with(c.attrs, "input_shape", c.x.dims())});
    }
    return samples;
  };
  def.error_samples = [] {
    const Attrs plain = conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 1);
    return std::vector<ErrorSample>{
        {"dy of the wrong shape",
         {spec({1, 4, 4, 4}), spec({4, 3, 3, 3})},
         with(plain, "input_shape", Ints{1, 3, 5, 5}),
         "does not match the output [1,4,3,3]"},
        {"input shape of rank 3",
         {spec({1, 4, 3, 3}), spec({4, 3, 3, 3})},
         with(plain, "input_shape", Ints{3, 5, 5}),
         "input_shape must have four values"},
    };
  };
  registry.add(std::move(def));
}

void register_conv2d_backward_weights(OpRegistry& registry) {
  OpDef def;
  def.name = "conv2d_backward_weights";
  def.formula =
      "dw[o,c,p,q] = Σ_{n,i,j} dy[n,o,i,j] · x[n, g·C/G + c, i·sh − ph + p·dh, j·sw − pw + q·dw] "
      "(taps inside the image)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    const Shape& x = call.inputs[0].shape;
    const Shape& dy = call.inputs[1].shape;
    if (x.rank() != 4) call.fail("input must be [N, C, H, W], got {}", x);
    if (dy.rank() != 4) call.fail("dy must be [N, O, OH, OW], got {}", dy);
    const Size2 kernel = checked_pair(call, "kernel", 1, "the kernel's height and width");
    const std::int64_t groups = int_attr(call, "groups");
    if (groups < 1) call.fail("groups must be at least 1, got {}", groups);
    if (x[1] % groups != 0)
      call.fail("{} input channels are not divisible by {} groups", x[1], groups);
    const Shape w{dy[1], x[1] / groups, kernel[0], kernel[1]};
    const Shape y = check_conv(call, x, w);
    if (dy != y) {
      call.fail("dy {} does not match the output {} of a convolution of {} by {}", dy, y, x, w);
    }
    return {TensorDesc{call.inputs[0].dtype, w}};
  };
  // dw is bilinear in (x, dy): ⟨H, dw⟩ = ⟨conv2d(x, H), dy⟩, so d/dx = conv2d_backward_data(dy, H)
  // and d/d dy = conv2d(x, H).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Value h = c.grad();
    const Conv2dOptions options = conv_options(c.attrs());
    const Value& x = c.inputs[0];
    const Value& dy = c.inputs[1];
    std::optional<Value> d_x, d_dy;
    if (c.needs[0]) d_x = conv2d_backward_data(dy, h, x.shape(), options);
    if (c.needs[1]) d_dy = conv2d(x, h, std::nullopt, options);
    return {d_x, d_dy};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const ConvGeometry g =
        conv_geometry(call.attrs(), call.inputs[0].shape(), call.outputs[0].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* x = call.inputs[0].data<T>();
      const T* dy = call.inputs[1].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      for_each_tap(g, [&](std::int64_t xi, std::int64_t wi, std::int64_t yi) {
        acc[static_cast<std::size_t>(wi)] +=
            static_cast<double>(dy[yi]) * static_cast<double>(x[xi]);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference(conv_backward_weights_onednn);
  def.samples = [] {
    std::vector<Sample> samples;
    for (const ConvCase& c : conv_cases()) {
      samples.push_back(Sample{c.label,
                               {spec(c.x), spec(conv_output_shape(c))},
                               with(c.attrs, "kernel", Ints{c.w[2], c.w[3]})});
    }
    return samples;
  };
  def.error_samples = [] {
    const Attrs plain = conv_sample_attrs({1, 1}, {0, 0}, {1, 1}, 1);
    return std::vector<ErrorSample>{
        {"dy of the wrong shape",
         {spec({1, 3, 5, 5}), spec({1, 4, 4, 4})},
         with(plain, "kernel", Ints{3, 3}),
         "does not match the output [1,4,3,3]"},
        {"kernel 0",
         {spec({1, 3, 5, 5}), spec({1, 4, 3, 3})},
         with(plain, "kernel", Ints{0, 3}),
         "kernel must be at least 1"},
    };
  };
  registry.add(std::move(def));
}

// ---- pooling geometry ---------------------------------------------------------------------

struct PoolGeometry {
  std::int64_t planes, H, W;  // planes = N · C
  std::int64_t OH, OW;
  Size2 kernel, stride, padding;
};

PoolGeometry pool_geometry(const Attrs& attrs, const Shape& x) {
  PoolGeometry g{};
  g.planes = x[0] * x[1], g.H = x[2], g.W = x[3];
  g.kernel = pair_attr(attrs, "kernel");
  g.stride = pair_attr(attrs, "stride");
  g.padding = pair_attr(attrs, "padding");
  g.OH = output_size(g.H, g.padding[0], g.kernel[0], g.stride[0]);
  g.OW = output_size(g.W, g.padding[1], g.kernel[1], g.stride[1]);
  return g;
}

Attrs pool_attrs(Size2 kernel, Size2 stride, Size2 padding) {
  return {{"kernel", ints(kernel)}, {"stride", ints(stride)}, {"padding", ints(padding)}};
}

// Checks pooling of an input of shape x; returns the output shape.
Shape check_pool(const ShapeCall& call, const Shape& x) {
  if (x.rank() != 4) call.fail("input must be [N, C, H, W], got {}", x);
  const Size2 kernel = checked_pair(call, "kernel", 1, "the window's height and width");
  const Size2 stride = checked_pair(call, "stride", 1, "1 moves the window one pixel");
  const Size2 padding = checked_pair(call, "padding", 0, "pixels added on each side");
  if (padding[0] >= kernel[0] || padding[1] >= kernel[1]) {
    call.fail(
        "padding {}x{} must be smaller than the kernel {}x{} (a window would hold only padding)",
        padding[0], padding[1], kernel[0], kernel[1]);
  }
  if (x.numel() == 0) call.fail("pooling a zero-size input {} leaves no output", x);
  const std::int64_t padded_h = x[2] + 2 * padding[0];
  const std::int64_t padded_w = x[3] + 2 * padding[1];
  if (kernel[0] > padded_h || kernel[1] > padded_w) {
    call.fail(
        "the kernel {}x{} is larger than the padded input {}x{} (x {}, padding {}x{}): "
        "pooling leaves no output",
        kernel[0], kernel[1], padded_h, padded_w, x, padding[0], padding[1]);
  }
  return Shape{x[0], x[1], output_size(x[2], padding[0], kernel[0], stride[0]),
               output_size(x[3], padding[1], kernel[1], stride[1])};
}

// Calls f(x_index) for each element of window (plane, i, j) inside the image, row-major.
template <class F>
void for_each_in_window(const PoolGeometry& g, std::int64_t plane, std::int64_t i, std::int64_t j,
                        F f) {
  for (std::int64_t p = 0; p < g.kernel[0]; ++p) {
    const std::int64_t h = i * g.stride[0] - g.padding[0] + p;
    if (h < 0 || h >= g.H) continue;
    for (std::int64_t q = 0; q < g.kernel[1]; ++q) {
      const std::int64_t w = j * g.stride[1] - g.padding[1] + q;
      if (w < 0 || w >= g.W) continue;
      f((plane * g.H + h) * g.W + w);
    }
  }
}

// Calls f(window index in y, x_index of the window's first maximum) for every window.
template <class T, class F>
void for_each_window_max(const PoolGeometry& g, const T* x, F f) {
  for (std::int64_t plane = 0; plane < g.planes; ++plane) {
    for (std::int64_t i = 0; i < g.OH; ++i) {
      for (std::int64_t j = 0; j < g.OW; ++j) {
        std::int64_t best = -1;
        for_each_in_window(g, plane, i, j, [&](std::int64_t xi) {
          if (best < 0 || x[xi] > x[best]) best = xi;  // strict: ties keep the first maximum
        });
        f((plane * g.OH + i) * g.OW + j, best);
      }
    }
  }
}

// Calls f(window index in y, x_index, element count of the window) for every element of
// every window.
template <class F>
void for_each_window_element(const PoolGeometry& g, F f) {
  for (std::int64_t plane = 0; plane < g.planes; ++plane) {
    for (std::int64_t i = 0; i < g.OH; ++i) {
      for (std::int64_t j = 0; j < g.OW; ++j) {
        std::int64_t count = 0;
        for_each_in_window(g, plane, i, j, [&](std::int64_t) { ++count; });
        const std::int64_t yi = (plane * g.OH + i) * g.OW + j;
        for_each_in_window(g, plane, i, j, [&](std::int64_t xi) { f(yi, xi, count); });
      }
    }
  }
}

// ---- oneDNN pooling -----------------------------------------------------------------------

dnnl::pooling_forward::desc pool_forward_desc(dnnl::prop_kind prop, dnnl::algorithm algorithm,
                                              const PoolGeometry& g, const dnnl::memory::desc& src,
                                              const dnnl::memory::desc& dst) {
  using dims = dnnl::memory::dims;
  return dnnl::pooling_forward::desc(
      prop, algorithm, src, dst, dims{g.stride[0], g.stride[1]}, dims{g.kernel[0], g.kernel[1]},
      dims{g.padding[0], g.padding[1]}, dims{g.padding[0], g.padding[1]});
}

dnnl::pooling_backward::desc pool_backward_desc(dnnl::algorithm algorithm, const PoolGeometry& g,
                                                const dnnl::memory::desc& diff_src,
                                                const dnnl::memory::desc& diff_dst) {
  using dims = dnnl::memory::dims;
  return dnnl::pooling_backward::desc(
      algorithm, diff_src, diff_dst, dims{g.stride[0], g.stride[1]}, dims{g.kernel[0], g.kernel[1]},
      dims{g.padding[0], g.padding[1]}, dims{g.padding[0], g.padding[1]});
}

// Layouts: oneDNN's pooling on plain NCHW runs a slow generic kernel; on channel-blocked
// layouts (nChw8c, nChw16c with AVX-512) it runs JIT kernels. Measured: max pooling 2x2 of
// [64,64,28,28], 1 thread: NCHW 35.9 ms, reorder to nChw8c + pool + reorder back 13.6 ms. So
// pooling kernels reorder to a blocked layout when the channels fill whole blocks.
dnnl::memory::desc pool_md(const TensorDesc& desc) {
  return channel_blocked_md(plain_md(desc));
}

KernelFactory pool_forward_onednn(dnnl::algorithm algorithm) {
  return [algorithm](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (!all_f32(build)) return nullptr;
    const PoolGeometry g = pool_geometry(build.node.attrs, build.inputs[0].shape);
    dnnl::pooling_forward::primitive_desc pd(
        pool_forward_desc(dnnl::prop_kind::forward_inference, algorithm, g,
                          pool_md(build.inputs[0]), pool_md(build.outputs[0])),
        build.engine);
    return std::make_unique<ReorderingKernel>(
        dnnl::pooling_forward(pd), pd,
        std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, plain_md(build.inputs[0])),
                                  output_arg(DNNL_ARG_DST, 0, plain_md(build.outputs[0]))},
        build.engine);
  };
}

// ---- fused convolution backward ------------------------------------------------------------

// The weights and data gradients of one convolution, which both read dy: dy is reordered to
// the primitives' blocked layout once instead of once per primitive. Inputs x, dy, w; outputs
// dW, dX. Measured in the CNN training step (batch 64, 2 threads, ONEDNN_VERBOSE): the dy
// reorder of the [64,64,14,14] layer takes 0.52 ms. (Letting the weights primitive also
// compute the bias gradient was measured too and is slower on AVX2: 0.66 -> 1.52 ms for the
// first layer, against 0.33 ms for dagrad's own reduction; so the bias stays a sum node.)
class ConvBackwardKernel final : public Kernel {
 public:
  explicit ConvBackwardKernel(const KernelBuild& build) {
    const ConvGeometry g =
        conv_geometry(build.node.attrs, build.inputs[0].shape, build.outputs[0].shape);
    ConvDescs d = conv_descs(g);
    const dnnl::memory::desc src_user = weights_gradient_layouts(g, d);
    const auto hint = conv_forward_hint(d, build.engine);
    dnnl::convolution_backward_weights::primitive_desc weights_pd(
        dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, d.src_any,
                                                 d.weights_any, d.dst_any, d.strides, d.dilates,
                                                 d.padding, d.padding),
        build.engine, hint);
    dnnl::convolution_backward_data::primitive_desc data_pd(
        dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, d.src_any,
                                              d.weights_any, d.dst_any, d.strides, d.dilates,
                                              d.padding, d.padding),
        build.engine, hint);
    x_ = StagedMemory(src_user, weights_pd.src_desc(), build.engine);
    dy_ = StagedMemory(d.dst, weights_pd.diff_dst_desc(), build.engine);
    dw_ = StagedMemory(d.weights, weights_pd.diff_weights_desc(), build.engine);
    share_dy_ = data_pd.diff_dst_desc() == weights_pd.diff_dst_desc();
    if (!share_dy_) data_dy_ = StagedMemory(d.dst, data_pd.diff_dst_desc(), build.engine);
    w_ = StagedMemory(d.weights, data_pd.weights_desc(), build.engine);
    dx_ = StagedMemory(d.src, data_pd.diff_src_desc(), build.engine);
    for (StagedMemory* m : {&x_, &dy_, &dw_, &data_dy_, &w_, &dx_}) m->reserve(scratch_);
    weights_ = PreparedPrimitive(dnnl::convolution_backward_weights(weights_pd),
                                 {{DNNL_ARG_SRC, x_.used()},
                                  {DNNL_ARG_DIFF_DST, dy_.used()},
                                  {DNNL_ARG_DIFF_WEIGHTS, dw_.used()}});
    data_ = PreparedPrimitive(dnnl::convolution_backward_data(data_pd),
                              {{DNNL_ARG_DIFF_DST, share_dy_ ? dy_.used() : data_dy_.used()},
                               {DNNL_ARG_WEIGHTS, w_.used()},
                               {DNNL_ARG_DIFF_SRC, dx_.used()}});
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  const char* library() const override { return "oneDNN"; }
  void run(const KernelCall& call) override {
    dnnl::stream& stream = *call.context.stream;
    std::byte* scratch = scratch_.base(call.context, "conv2d_backward_weights+data");
    for (StagedMemory* m : {&x_, &dy_, &dw_, &data_dy_, &w_, &dx_}) m->place(scratch);
    x_.load(stream, call.inputs[0].raw());
    dy_.load(stream, call.inputs[1].raw());
    dw_.bind(call.outputs[0].raw());
    weights_.execute(stream, "conv2d_backward_weights");
    dw_.store(stream);
    if (!share_dy_) data_dy_.load(stream, call.inputs[1].raw());
    w_.load(stream, call.inputs[2].raw());
    dx_.bind(call.outputs[1].raw());
    data_.execute(stream, "conv2d_backward_data");
    dx_.store(stream);
  }

 private:
  bool share_dy_ = false;
  StagedMemory x_, dy_, dw_, data_dy_, w_, dx_;
  ScratchLayout scratch_;
  PreparedPrimitive weights_, data_;
};

// max_pool2d_backward: oneDNN's max-pooling backward needs the forward's workspace (where
// each maximum was), so the kernel reruns the forward on x into buffers in its scratch.
class MaxPoolBackwardKernel final : public Kernel {
 public:
  MaxPoolBackwardKernel(const PoolGeometry& g, const TensorDesc& dy, const TensorDesc& x,
                        dnnl::engine& engine) {
    dnnl::pooling_forward::primitive_desc forward_pd(
        pool_forward_desc(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, g,
                          pool_md(x), pool_md(dy)),
        engine);
    dnnl::pooling_backward::primitive_desc backward_pd(
        pool_backward_desc(dnnl::algorithm::pooling_max, g, pool_md(x), pool_md(dy)), engine,
        forward_pd);
    src_ = StagedMemory(plain_md(x), forward_pd.src_desc(), engine);
    diff_dst_ = StagedMemory(plain_md(dy), backward_pd.diff_dst_desc(), engine);
    diff_src_ = StagedMemory(plain_md(x), backward_pd.diff_src_desc(), engine);
    dst_ = dnnl::memory(forward_pd.dst_desc(), engine, nullptr);  // the recomputed maxima
    workspace_ = dnnl::memory(forward_pd.workspace_desc(), engine, nullptr);
    for (StagedMemory* m : {&src_, &diff_dst_, &diff_src_}) m->reserve(scratch_);
    dst_at_ = scratch_.reserve(forward_pd.dst_desc().get_size());
    workspace_at_ = scratch_.reserve(forward_pd.workspace_desc().get_size());
    forward_ = PreparedPrimitive(
        dnnl::pooling_forward(forward_pd),
        {{DNNL_ARG_SRC, src_.used()}, {DNNL_ARG_DST, dst_}, {DNNL_ARG_WORKSPACE, workspace_}});
    backward_ = PreparedPrimitive(dnnl::pooling_backward(backward_pd),
                                  {{DNNL_ARG_DIFF_DST, diff_dst_.used()},
                                   {DNNL_ARG_WORKSPACE, workspace_},
                                   {DNNL_ARG_DIFF_SRC, diff_src_.used()}});
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  const char* library() const override { return "oneDNN"; }
  void run(const KernelCall& call) override {
    dnnl::stream& stream = *call.context.stream;
    std::byte* scratch = scratch_.base(call.context, "max_pool2d_backward");
    for (StagedMemory* m : {&src_, &diff_dst_, &diff_src_}) m->place(scratch);
    dst_.set_data_handle(scratch + dst_at_);
    workspace_.set_data_handle(scratch + workspace_at_);
    src_.load(stream, call.inputs[1].raw());
    diff_dst_.load(stream, call.inputs[0].raw());
    diff_src_.bind(call.outputs[0].raw());
    forward_.execute(stream, "max_pool2d_backward");
    backward_.execute(stream, "max_pool2d_backward");
    diff_src_.store(stream);
  }

 private:
  StagedMemory src_, diff_dst_, diff_src_;
  dnnl::memory dst_, workspace_;
  ScratchLayout scratch_;
  std::size_t dst_at_ = 0, workspace_at_ = 0;
  PreparedPrimitive forward_, backward_;
};

// Direct max pooling on plain NCHW when windows do not overlap (stride ≥ kernel on both axes),
// the case of every "pool 2, stride 2" layer. Each x element then lies in at most one window,
// so one pass per plane finds each window's first maximum (strict >, exactly as the reference)
// and the backward writes dy there and zero elsewhere: no reorders, no workspace, no recomputed
// forward into scratch. Measured in the CNN training step (batch 128, 2 threads, loaded
// machine, --profile): [128,32,28,28] forward 7.6 -> 1.3 ms, backward 24.1 -> 6.1 ms;
// [128,64,14,14] forward 3.2 -> 0.8 ms, backward 13.4 -> 2.2 ms.
bool windows_disjoint(const PoolGeometry& g) {
  return g.stride[0] >= g.kernel[0] && g.stride[1] >= g.kernel[1];
}

// Offset (within the plane) of the first maximum of window (i, j); the window always holds at
// least one element because padding < kernel (checked by the shape rule).
inline std::int64_t window_argmax(const PoolGeometry& g, const float* plane, std::int64_t i,
                                  std::int64_t j) {
  const std::int64_t h0 = i * g.stride[0] - g.padding[0];
  const std::int64_t w0 = j * g.stride[1] - g.padding[1];
  const std::int64_t h_begin = std::max<std::int64_t>(h0, 0);
  const std::int64_t h_end = std::min(h0 + g.kernel[0], g.H);
  const std::int64_t w_begin = std::max<std::int64_t>(w0, 0);
  const std::int64_t w_end = std::min(w0 + g.kernel[1], g.W);
  std::int64_t best = h_begin * g.W + w_begin;
  for (std::int64_t h = h_begin; h < h_end; ++h) {
    for (std::int64_t w = w_begin; w < w_end; ++w) {
      if (plane[h * g.W + w] > plane[best]) best = h * g.W + w;
    }
  }
  return best;
}

// The common 2x2, stride 2, no padding case, branch-free: the index (0..3, row-major) of the
// first maximum of a, b, c, d.
inline int first_max4(float a, float b, float c, float d, float& best) {
  int k = 0;
  best = a;
  k = b > best ? 1 : k, best = b > best ? b : best;
  k = c > best ? 2 : k, best = c > best ? c : best;
  k = d > best ? 3 : k, best = d > best ? d : best;
  return k;
}

// AVX2 versions of the 2x2, stride 2 loops for one output row: 8 windows per iteration (16
// columns of the two input rows), the last block with masked loads and stores. They compare
// exactly as first_max4 does (strict >, in the order a, b, c, d), so results equal the scalar
// loop's bit for bit, NaNs included. (The scalar loop's data-dependent selects cost about 8
// cycles per element.)
// Measured in the CNN training step (batch 64, 2 threads, DAGRAD_PROFILE=1 bench_train):
// max_pool2d_backward+relu_grad on [64,32,28,28] 2.31 -> see bench/README.md.
#ifdef DAGRAD_X86

// Lanes [0, n) of a 256-bit mask (n may be <= 0 or >= 8).
[[gnu::target("avx2")]] inline __m256i first_lanes(std::int64_t n) {
  const int count = static_cast<int>(std::clamp<std::int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Loads 16 floats of a row, or only the first `n` (the rest read as 0) when n < 16.
struct Row16 {
  __m256 lo, hi;
};
[[gnu::target("avx2")]] inline Row16 load_row16(const float* p, std::int64_t n) {
  if (n >= 16) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  return {_mm256_maskload_ps(p, first_lanes(n)), _mm256_maskload_ps(p + 8, first_lanes(n - 8))};
}
[[gnu::target("avx2")]] inline void store_row16(float* p, std::int64_t n, __m256 lo, __m256 hi) {
  if (n >= 16) {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
    return;
  }
  _mm256_maskstore_ps(p, first_lanes(n), lo);
  _mm256_maskstore_ps(p + 8, first_lanes(n - 8), hi);
}

// a, b, c, d of 8 windows (`count` <= 8 of them real): a = row 0 even columns, b = row 0 odd,
// c/d row 1. The lanes come out in window order 0 1 4 5 | 2 3 6 7 (_mm256_shuffle_ps works
// within 128-bit halves).
struct Windows8 {
  __m256 best, win_a, win_b, win_c, win_d;  // the maximum, and which of a..d is the first one
};

[[gnu::target("avx2")]] inline Windows8 windows8(const float* r0, const float* r1,
                                                 std::int64_t count) {
  const Row16 top = load_row16(r0, 2 * count), bottom = load_row16(r1, 2 * count);
  const __m256 a = _mm256_shuffle_ps(top.lo, top.hi, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 b = _mm256_shuffle_ps(top.lo, top.hi, _MM_SHUFFLE(3, 1, 3, 1));
  const __m256 c = _mm256_shuffle_ps(bottom.lo, bottom.hi, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 d = _mm256_shuffle_ps(bottom.lo, bottom.hi, _MM_SHUFFLE(3, 1, 3, 1));
  Windows8 w;
  w.best = a;
  const __m256 b_wins = _mm256_cmp_ps(b, w.best, _CMP_GT_OQ);
  w.best = _mm256_blendv_ps(w.best, b, b_wins);
  const __m256 c_wins = _mm256_cmp_ps(c, w.best, _CMP_GT_OQ);
  w.best = _mm256_blendv_ps(w.best, c, c_wins);
  w.win_d = _mm256_cmp_ps(d, w.best, _CMP_GT_OQ);
  w.best = _mm256_blendv_ps(w.best, d, w.win_d);
  w.win_c = _mm256_andnot_ps(w.win_d, c_wins);
  w.win_b = _mm256_andnot_ps(_mm256_or_ps(w.win_d, c_wins), b_wins);
  w.win_a = _mm256_andnot_ps(_mm256_or_ps(_mm256_or_ps(w.win_d, c_wins), b_wins),
                             _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
  return w;
}

// Swaps the middle two 64-bit quarters: window order 0 1 2 3 4 5 6 7 <-> 0 1 4 5 2 3 6 7.
[[gnu::target("avx2")]] inline __m256 swap_middle_quarters(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
}

[[gnu::target("avx2")]] void pool2x2_forward_row_avx2(const float* r0, const float* r1, float* y,
                                                      std::int64_t ow) {
  for (std::int64_t j = 0; j < ow; j += 8) {
    const std::int64_t count = std::min<std::int64_t>(8, ow - j);
    const __m256 best = swap_middle_quarters(windows8(r0 + 2 * j, r1 + 2 * j, count).best);
    if (count == 8) {
      _mm256_storeu_ps(y + j, best);
    } else {
      _mm256_maskstore_ps(y + j, first_lanes(count), best);
    }
  }
}

[[gnu::target("avx2")]] void pool2x2_backward_row_avx2(const float* r0, const float* r1,
                                                       const float* dy, float* d0, float* d1,
                                                       std::int64_t ow, bool relu_mask) {
  for (std::int64_t j = 0; j < ow; j += 8) {
    const std::int64_t count = std::min<std::int64_t>(8, ow - j);
    const Windows8 w = windows8(r0 + 2 * j, r1 + 2 * j, count);
    __m256 v =
        count == 8 ? _mm256_loadu_ps(dy + j) : _mm256_maskload_ps(dy + j, first_lanes(count));
    v = swap_middle_quarters(v);
    if (relu_mask) v = _mm256_and_ps(v, _mm256_cmp_ps(w.best, _mm256_setzero_ps(), _CMP_GT_OQ));
    const __m256 ga = _mm256_and_ps(v, w.win_a), gb = _mm256_and_ps(v, w.win_b);
    const __m256 gc = _mm256_and_ps(v, w.win_c), gd = _mm256_and_ps(v, w.win_d);
    // unpack interleaves within 128-bit halves, which undoes the shuffle's window order.
    store_row16(d0 + 2 * j, 2 * count, _mm256_unpacklo_ps(ga, gb), _mm256_unpackhi_ps(ga, gb));
    store_row16(d1 + 2 * j, 2 * count, _mm256_unpacklo_ps(gc, gd), _mm256_unpackhi_ps(gc, gd));
  }
}

// Left-packing permutations for _mm256_permutevar8x32: row m lists the set bits of m in order.
struct PackTable {
  std::int32_t lanes[256][8];
};
constexpr PackTable make_pack_table() {
  PackTable t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int bit = 0; bit < 8; ++bit) {
      if ((m >> bit) & 1) t.lanes[m][n++] = bit;
    }
  }
  return t;
}
constexpr PackTable pack_table = make_pack_table();

// The hits of one row of 2x2 windows (input rows r0, r1; gradients dp; `ow` windows): for
// each window whose maximum is positive, in window order, the offset row_offset + (k / 2) · row
// + (2j + k % 2) · col of its first maximum k (0..3 for a, b, c, d) goes to `at` and dp[j] to
// `gs`. Writes up to 7 slots past the hits; returns their number and adds their gradients to
// `sum`.
[[gnu::target("avx2")]] std::int64_t pool2x2_hits_row_avx2(
    const float* r0, const float* r1, const float* dp, std::int64_t ow, std::int32_t row_offset,
    std::int32_t row, std::int32_t col, std::int32_t* at, float* gs, __m256& sum) {
  std::int64_t count = 0;
  const __m256i even =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), _mm256_set1_epi32(col));
  for (std::int64_t j = 0; j < ow; j += 8) {
    const std::int64_t n = std::min<std::int64_t>(8, ow - j);
    const Windows8 w = windows8(r0 + 2 * j, r1 + 2 * j, n);
    const __m256i right = _mm256_castps_si256(_mm256_or_ps(w.win_b, w.win_d));
    const __m256i lower = _mm256_castps_si256(_mm256_or_ps(w.win_c, w.win_d));
    __m256i offset = _mm256_add_epi32(_mm256_and_si256(right, _mm256_set1_epi32(col)),
                                      _mm256_and_si256(lower, _mm256_set1_epi32(row)));
    offset = _mm256_castps_si256(swap_middle_quarters(_mm256_castsi256_ps(offset)));
    offset = _mm256_add_epi32(
        offset,
        _mm256_add_epi32(even, _mm256_set1_epi32(row_offset + 2 * static_cast<int>(j) * col)));
    const __m256 positive =
        swap_middle_quarters(_mm256_cmp_ps(w.best, _mm256_setzero_ps(), _CMP_GT_OQ));
    const __m256 g = n == 8 ? _mm256_loadu_ps(dp + j) : _mm256_maskload_ps(dp + j, first_lanes(n));
    sum = _mm256_add_ps(sum, _mm256_and_ps(g, positive));
    const int mask = _mm256_movemask_ps(positive);
    const __m256i pack =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pack_table.lanes[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + count),
                        _mm256_permutevar8x32_epi32(offset, pack));
    _mm256_storeu_ps(gs + count, _mm256_permutevar8x32_ps(g, pack));
    count += __builtin_popcount(static_cast<unsigned>(mask));
  }
  return count;
}

// pool2x2_hits_row_avx2 over every row of one plane (offsets h · row + w · col); `sum` gets
// the hits' gradient sum.
[[gnu::target("avx2")]] std::int64_t pool2x2_hits_plane_avx2(const float* r, const float* dp,
                                                             const PoolGeometry& p,
                                                             std::int64_t row, std::int64_t col,
                                                             std::int32_t* at, float* gs,
                                                             double& sum) {
  std::int64_t count = 0;
  __m256 sums = _mm256_setzero_ps();
  for (std::int64_t i = 0; i < p.OH; ++i) {
    const float* r0 = r + 2 * i * p.W;
    count += pool2x2_hits_row_avx2(r0, r0 + p.W, dp + i * p.OW, p.OW,
                                   static_cast<std::int32_t>(2 * i * row),
                                   static_cast<std::int32_t>(row), static_cast<std::int32_t>(col),
                                   at + count, gs + count, sums);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  sum = 0.0;
  for (float v : lanes) sum += static_cast<double>(v);
  return count;
}

// Channels innermost: acc[0..V) (V vectors of one output channel's [KH][KW][C] weights
// gradient, contiguous within one kernel row) += g[e] · the same V vectors of x at offset
// start + at[e], for every hit e.
template <int V>
[[gnu::target("avx2,fma")]] void add_hits_run(float* acc, const float* x, std::int64_t start,
                                              const std::int32_t* at, const float* g,
                                              std::int64_t count) {
  __m256 a[V];
#pragma GCC unroll 10
  for (int k = 0; k < V; ++k) a[k] = _mm256_loadu_ps(acc + 8 * k);
  const float* base = x + start;
  for (std::int64_t e = 0; e < count; ++e) {
    const float* p = base + at[e];
    const __m256 gv = _mm256_set1_ps(g[e]);
#pragma GCC unroll 10
    for (int k = 0; k < V; ++k) a[k] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(p + 8 * k), a[k]);
  }
#pragma GCC unroll 10
  for (int k = 0; k < V; ++k) _mm256_storeu_ps(acc + 8 * k, a[k]);
}

using AddRun = void (*)(float*, const float*, std::int64_t, const std::int32_t*, const float*,
                        std::int64_t);
constexpr std::int64_t run_vectors = 10;  // accumulators per run: 10 of the 16 registers
constexpr AddRun add_runs[] = {add_hits_run<1>, add_hits_run<2>, add_hits_run<3>, add_hits_run<4>,
                               add_hits_run<5>, add_hits_run<6>, add_hits_run<7>, add_hits_run<8>,
                               add_hits_run<9>, add_hits_run<10>};

// acc[c][kh][0..8) += g[e] · image[c · plane + at[e] + kh · wp + 0..8) for every hit e and
// the CB input channels c of one block.
template <int KH, int CB>
[[gnu::target("avx2,fma")]] void add_hits_block(float* acc, const float* image, std::int64_t plane,
                                                std::int64_t wp, const std::int32_t* at,
                                                const float* g, std::int64_t count) {
  __m256 a[CB * KH];
#pragma GCC unroll 16
  for (int k = 0; k < CB * KH; ++k) a[k] = _mm256_loadu_ps(acc + 8 * k);
  for (std::int64_t e = 0; e < count; ++e) {
    const float* base = image + at[e];
    const __m256 gv = _mm256_set1_ps(g[e]);
#pragma GCC unroll 2
    for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 8
      for (int k = 0; k < KH; ++k) {
        a[c * KH + k] =
            _mm256_fmadd_ps(gv, _mm256_loadu_ps(base + c * plane + k * wp), a[c * KH + k]);
      }
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < CB * KH; ++k) _mm256_storeu_ps(acc + 8 * k, a[k]);
}

using AddHits = void (*)(float*, const float*, std::int64_t, std::int64_t, const std::int32_t*,
                         const float*, std::int64_t);

// add_hits_block for kh rows and blocks of `block` channels (1, or 2 when kh <= 6 so that
// the accumulators fit in the 16 vector registers).
AddHits add_hits_avx2(std::int64_t kh, int block) {
  static constexpr AddHits one[] = {
      add_hits_block<1, 1>, add_hits_block<2, 1>, add_hits_block<3, 1>, add_hits_block<4, 1>,
      add_hits_block<5, 1>, add_hits_block<6, 1>, add_hits_block<7, 1>, add_hits_block<8, 1>};
  static constexpr AddHits two[] = {add_hits_block<1, 2>, add_hits_block<2, 2>,
                                    add_hits_block<3, 2>, add_hits_block<4, 2>,
                                    add_hits_block<5, 2>, add_hits_block<6, 2>};
  return block == 2 ? two[kh - 1] : one[kh - 1];
}

// The data gradient's share of each hit: pad[at[e] + a · row + b · cp + c] += g · w[a][b][c]
// for a < kh, b < kw, c < cp (pad: one image's padded dx, channels innermost, cp a multiple of
// 8; w: one output channel's weights as [KH][KW][cp]; at[e] = h · row + w · cp).
[[gnu::target("avx2,fma")]] void scatter_hits_avx2(float* pad, std::int64_t row, std::int64_t cp,
                                                   const float* w, std::int64_t kh, std::int64_t kw,
                                                   const std::int32_t* at, const float* g,
                                                   std::int64_t count) {
  for (std::int64_t e = 0; e < count; ++e) {
    float* base = pad + at[e];
    const __m256 gv = _mm256_set1_ps(g[e]);
    const float* tap = w;
    for (std::int64_t a = 0; a < kh; ++a) {
      float* p = base + a * row;
#pragma GCC unroll 4
      for (std::int64_t b = 0; b < kw * cp; b += 8) {
        _mm256_storeu_ps(p + b,
                         _mm256_fmadd_ps(gv, _mm256_loadu_ps(tap + b), _mm256_loadu_ps(p + b)));
      }
      tap += kw * cp;
    }
  }
}

#endif

bool is_pool2x2(const PoolGeometry& g) {
  return g.kernel == Size2{2, 2} && g.stride == Size2{2, 2} && g.padding == Size2{0, 0};
}

std::unique_ptr<Kernel> direct_max_pool_forward(const PoolGeometry& g) {
  return make_kernel([g](const KernelCall& call) {
    const float* x = call.inputs[0].data<float>();
    float* y = call.outputs[0].data<float>();
    const std::int64_t in_plane = g.H * g.W, out_plane = g.OH * g.OW;
#ifdef DAGRAD_X86
    const bool avx2 = cpu_has_avx2();
#endif
#pragma omp parallel for schedule(static)
    for (std::int64_t p = 0; p < g.planes; ++p) {
      const float* xp = x + p * in_plane;
      float* yp = y + p * out_plane;
      if (is_pool2x2(g)) {
        for (std::int64_t i = 0; i < g.OH; ++i) {
          const float* r0 = xp + 2 * i * g.W;
          const float* r1 = r0 + g.W;
#ifdef DAGRAD_X86
          if (avx2) {
            pool2x2_forward_row_avx2(r0, r1, yp + i * g.OW, g.OW);
            continue;
          }
#endif
          for (std::int64_t j = 0; j < g.OW; ++j) {
            float best;
            first_max4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], best);
            yp[i * g.OW + j] = best;
          }
        }
        continue;
      }
      for (std::int64_t i = 0; i < g.OH; ++i) {
        for (std::int64_t j = 0; j < g.OW; ++j) yp[i * g.OW + j] = xp[window_argmax(g, xp, i, j)];
      }
    }
  });
}

// Inputs dy, x; output dx (x's shape). With `relu_mask`, the kernel computes
// relu_grad(max_pool2d_backward(dy, x), x) in the same pass: a window's gradient lands on its
// maximum only when that maximum is positive (the plan's fusion of a relu -> max_pool2d pair's
// backward). Measured in the CNN training step (batch 64, 2 threads): the separate relu_grad
// passes over [64,32,28,28] and [64,64,14,14] took 0.44 and 0.22 ms.
std::unique_ptr<Kernel> direct_max_pool_backward(const PoolGeometry& g, bool relu_mask = false) {
  return make_kernel([g, relu_mask](const KernelCall& call) {
    const float* dy = call.inputs[0].data<float>();
    const float* x = call.inputs[1].data<float>();
    float* dx = call.outputs[0].data<float>();
    const std::int64_t in_plane = g.H * g.W, out_plane = g.OH * g.OW;
#ifdef DAGRAD_X86
    const bool avx2 = cpu_has_avx2();
#endif
#pragma omp parallel for schedule(static)
    for (std::int64_t p = 0; p < g.planes; ++p) {
      const float* xp = x + p * in_plane;
      const float* dyp = dy + p * out_plane;
      float* dxp = dx + p * in_plane;
      if (is_pool2x2(g)) {
        // Every element of the first 2·OH rows and 2·OW columns is written once; an odd last
        // row or column is read by no window and is zeroed.
        for (std::int64_t i = 0; i < g.OH; ++i) {
          const float* r0 = xp + 2 * i * g.W;
          const float* r1 = r0 + g.W;
          float* d0 = dxp + 2 * i * g.W;
          float* d1 = d0 + g.W;
          std::int64_t j = 0;  // windows done
#ifdef DAGRAD_X86
          if (avx2) {
            pool2x2_backward_row_avx2(r0, r1, dyp + i * g.OW, d0, d1, g.OW, relu_mask);
            j = g.OW;
          }
#endif
          for (; j < g.OW; ++j) {
            float best;
            const int k = first_max4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], best);
            const float v = relu_mask && !(best > 0.0f) ? 0.0f : dyp[i * g.OW + j];
            d0[2 * j] = k == 0 ? v : 0.0f;
            d0[2 * j + 1] = k == 1 ? v : 0.0f;
            d1[2 * j] = k == 2 ? v : 0.0f;
            d1[2 * j + 1] = k == 3 ? v : 0.0f;
          }
          if (g.W % 2 != 0) d0[g.W - 1] = d1[g.W - 1] = 0.0f;
        }
        if (g.H % 2 != 0) std::fill(dxp + (g.H - 1) * g.W, dxp + in_plane, 0.0f);
        continue;
      }
      std::fill(dxp, dxp + in_plane, 0.0f);
      for (std::int64_t i = 0; i < g.OH; ++i) {
        for (std::int64_t j = 0; j < g.OW; ++j) {
          const std::int64_t at = window_argmax(g, xp, i, j);
          dxp[at] = relu_mask && !(xp[at] > 0.0f) ? 0.0f : dyp[i * g.OW + j];
        }
      }
    }
  });
}

// ---- gradients through relu -> 2x2 max pooling --------------------------------------------

// The weights, bias and data gradients of a convolution followed by relu and 2x2, stride 2 max
// pooling, reading the pooling's input gradient dp instead of the convolution's dy: dy =
// relu_grad(max_pool2d_backward(dp, r), r) is zero except at the first maximum of each window
// whose maximum is positive, so at least three quarters of dy are zeros the dense primitives
// multiply through. Pass 1 lists those "hits" (position and gradient) per (image, channel)
// plane and copies x into a zero-padded buffer, with the channels innermost ([H][W][C], C
// rounded up to 8) unless x has fewer than 8 channels and no data gradient is wanted (a first
// layer: then NCHW rows). Pass 2: the weights gradient adds g · (the x patch under the hit) to
// dW[o] for every hit, each kernel row's KW · C contiguous floats in runs of up to 10 vectors
// held in registers (NCHW rows: 8 kernel columns per vector, two input channels per block);
// each output channel is summed by one thread in a fixed order (images, then kernel rows or
// input channels, then hits). The bias gradient sums per-plane sums in double. The data
// gradient (optional) adds g · w[o] under every hit's patch of a zero-padded, channels-innermost
// copy of dx (read-modify-write), one thread per image, hits in a fixed order, then crops it
// into NCHW. So results do not depend on the thread count, and dy is never built.
// Positions where dy is structurally zero are skipped, so an infinite x or w there does not
// make a gradient NaN as 0 · ∞ would in the dense computation. Requirements (checked by
// pooled_relu_gradients_kernel): f32, stride 1, dilation 1, one group, KH, KW <= 8.
// Measured in the CNN training step (batch 64, DAGRAD_PROFILE=1 bench_train, 2 threads; 111k
// hits in the second layer's 200k windows): the second layer's weights, bias and data
// gradients took ~21 ms (oneDNN's two primitives with their reorders of dy, w and dx, the bias
// sum and max_pool2d_backward+relu_grad) and take 7.0–8.4 ms here; with the weights gradient
// on NCHW rows (5 of 8 lanes useful with 5x5 kernels, unaligned loads) they took 8.2–11.0 ms,
// and with the data gradient still on oneDNN ~14 ms. The first layer's
// max_pool2d_backward+relu_grad, weights gradient (with its NHWC reorder of dy) and bias sum
// took 3.2 ms and take 0.9–1.0 ms. A first version of the data gradient scattered 8-wide rows
// into an NCHW dx (KW of 8 lanes useful, rows overlapping from hit to hit) and ran at one FMA
// per 3–6 cycles, slower than oneDNN; channels innermost fixed both.
class PooledReluGradients final : public Kernel {
 public:
  PooledReluGradients(const ConvGeometry& g, const PoolGeometry& p, bool bias, bool data)
      : g_(g), p_(p), bias_(bias), data_(data), nhwc_(channels_innermost(g, data)) {
    slots_ = p.OH * p.OW + 8;  // the AVX2 row pass writes up to 7 slots past the hits
    hits_.resize(static_cast<std::size_t>(p.planes));
    plane_sums_.resize(static_cast<std::size_t>(p.planes));
    if (nhwc_) {
      cp_ = (g.C + 7) / 8 * 8;
      row_ = (g.W + 2 * g.padding[1]) * cp_;
      image_ = (g.H + 2 * g.padding[0]) * row_;
      acc_.resize(static_cast<std::size_t>(g.O * g.KH * g.KW * cp_));
    } else {
      row_ = g.W + 2 * g.padding[1] + 8;  // an 8-wide load at the last hit column stays inside
      image_ = g.C * (g.H + 2 * g.padding[0]) * row_;
      acc_.resize(static_cast<std::size_t>(g.O * g.C * g.KH * 8));
    }
    const auto floats = [](std::int64_t count) { return std::size_t(count) * sizeof(float); };
    x_pad_at_ = scratch_.reserve(floats(g.N * image_));
    hit_at_at_ = scratch_.reserve(std::size_t(p.planes * slots_) * sizeof(std::int32_t));
    hit_g_at_ = scratch_.reserve(floats(p.planes * slots_));
    if (data_) {
      w_taps_ = Tensor(Shape{g.O * g.KH * g.KW * cp_}, DType::f32);
      std::fill_n(w_taps_.data<float>(), w_taps_.numel(), 0.0f);  // channels past C stay 0
      dx_pad_at_ = scratch_.reserve(floats(g.N * image_));
    }
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  // The layout the kernel uses: x (and dx) with the channels innermost, unless there are
  // fewer than 8 channels and no data gradient (a first layer), where NCHW rows waste fewer
  // vector lanes.
  static bool channels_innermost(const ConvGeometry& g, bool data) { return data || g.C >= 8; }

  // Inputs dp, r, x [, w]; outputs dW [, db] [, dx].
  void run(const KernelCall& call) override {
    const float* dp = call.inputs[0].data<float>();
    const float* r = call.inputs[1].data<float>();
    const float* x = call.inputs[2].data<float>();
    std::byte* scratch = scratch_.base(call.context, "conv2d_backward_weights (pooled)");
    x_pad_ = reinterpret_cast<float*>(scratch + x_pad_at_);
    hit_at_ = reinterpret_cast<std::int32_t*>(scratch + hit_at_at_);
    hit_g_ = reinterpret_cast<float*>(scratch + hit_g_at_);
    dx_pad_ = data_ ? reinterpret_cast<float*>(scratch + dx_pad_at_) : nullptr;
#ifdef DAGRAD_X86
    const bool avx2 = cpu_has_avx2_fma();
#else
    const bool avx2 = false;
#endif
    if (data_) {  // w [O, C, KH, KW] as [O][KH][KW][cp_]
      const float* w = call.inputs[3].data<float>();
      float* taps = w_taps_.data<float>();
      for (std::int64_t o = 0; o < g_.O; ++o) {
        for (std::int64_t c = 0; c < g_.C; ++c) {
          for (std::int64_t k = 0; k < g_.KH * g_.KW; ++k) {
            taps[(o * g_.KH * g_.KW + k) * cp_ + c] = w[(o * g_.C + c) * g_.KH * g_.KW + k];
          }
        }
      }
    }
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
      for (std::int64_t n = 0; n < g_.N; ++n) copy_image(n, x);
#pragma omp for schedule(static)
      for (std::int64_t q = 0; q < p_.planes; ++q) find_hits(q, dp, r, avx2);
      if (data_) {
        float* dx = call.outputs[bias_ ? 2 : 1].data<float>();
#pragma omp for schedule(static) nowait
        for (std::int64_t n = 0; n < g_.N; ++n) data_gradient(n, dx, avx2);
      }
      // Output channels [first, last) for this thread; images outer so that one image's
      // padded x serves all of them from cache.
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const std::int64_t first = g_.O * t / threads, last = g_.O * (t + 1) / threads;
      const std::int64_t per_output = static_cast<std::int64_t>(acc_.size()) / g_.O;
      std::fill(acc_.data() + first * per_output, acc_.data() + last * per_output, 0.0f);
      for (std::int64_t n = 0; n < g_.N; ++n) {
        if (nhwc_) {
          accumulate_nhwc(n, first, last, avx2);
        } else {
          accumulate(n, first, last, avx2);
        }
      }
    }
    float* dw = call.outputs[0].data<float>();
    if (nhwc_) {
      for (std::int64_t o = 0; o < g_.O; ++o) {
        for (std::int64_t c = 0; c < g_.C; ++c) {
          for (std::int64_t k = 0; k < g_.KH * g_.KW; ++k) {
            dw[(o * g_.C + c) * g_.KH * g_.KW + k] =
                acc_[std::size_t((o * g_.KH * g_.KW + k) * cp_ + c)];
          }
        }
      }
    } else {
      for (std::int64_t row = 0; row < g_.O * g_.C * g_.KH; ++row) {
        std::copy_n(acc_.data() + row * 8, g_.KW, dw + row * g_.KW);
      }
    }
    if (bias_) {
      float* db = call.outputs[1].data<float>();
      for (std::int64_t o = 0; o < g_.O; ++o) {
        double sum = 0.0;
        for (std::int64_t n = 0; n < g_.N; ++n) sum += plane_sums_[std::size_t(n * g_.O + o)];
        db[o] = static_cast<float>(sum);
      }
    }
  }

 private:
  // Image n of x into its zero-padded copy: [C][H + 2ph][row_] planes, or [H + 2ph][W + 2pw][cp_]
  // with the channels innermost. The copy lies in scratch that other steps overwrite, so the
  // padding (and the channels past C) is written with zeros on every run.
  void copy_image(std::int64_t n, const float* x) {
    float* dst = x_pad_ + n * image_;
    const float* src = x + n * g_.C * g_.H * g_.W;
    const std::int64_t ph = g_.padding[0], rows = g_.H + 2 * ph;
    const std::int64_t col = nhwc_ ? cp_ : 1;  // floats per column of a padded row
    const std::int64_t left = g_.padding[1] * col, right = (g_.padding[1] + g_.W) * col;
    for (std::int64_t plane = 0; plane < (nhwc_ ? 1 : g_.C); ++plane) {
      for (std::int64_t h = 0; h < rows; ++h) {
        float* row = dst + (plane * rows + h) * row_;
        if (h < ph || h >= ph + g_.H || (nhwc_ && cp_ != g_.C)) {
          std::fill_n(row, row_, 0.0f);
        } else {
          std::fill_n(row, left, 0.0f);
          std::fill_n(row + right, row_ - right, 0.0f);
        }
      }
    }
    for (std::int64_t c = 0; c < g_.C; ++c) {
      for (std::int64_t h = 0; h < g_.H; ++h) {
        const float* in = src + (c * g_.H + h) * g_.W;
        if (nhwc_) {
          float* out = dst + (h + g_.padding[0]) * row_ + g_.padding[1] * cp_ + c;
          for (std::int64_t w = 0; w < g_.W; ++w) out[w * cp_] = in[w];
        } else {
          const std::int64_t rows = g_.H + 2 * g_.padding[0];
          std::copy_n(in, g_.W, dst + (c * rows + h + g_.padding[0]) * row_ + g_.padding[1]);
        }
      }
    }
  }

  // Hits of plane q = (n, o) of r: their offsets in image n's padded copy (h · row_ + w, or
  // h · row_ + w · cp_ with the channels innermost) and dp there.
  void find_hits(std::int64_t q, const float* dp, const float* r, [[maybe_unused]] bool avx2) {
    const std::int64_t in_plane = p_.H * p_.W, out_plane = p_.OH * p_.OW;
    const std::int64_t col = nhwc_ ? cp_ : 1;
    std::int32_t* at = hit_at_ + q * slots_;
    float* gs = hit_g_ + q * slots_;
    const auto plane = static_cast<std::size_t>(q);
#ifdef DAGRAD_X86
    if (avx2) {
      hits_[plane] = pool2x2_hits_plane_avx2(r + q * in_plane, dp + q * out_plane, p_, row_, col,
                                             at, gs, plane_sums_[plane]);
      return;
    }
#endif
    std::int64_t count = 0;
    double sum = 0.0;
    for (std::int64_t i = 0; i < p_.OH; ++i) {
      const float* r0 = r + q * in_plane + 2 * i * p_.W;
      const float* r1 = r0 + p_.W;
      for (std::int64_t j = 0; j < p_.OW; ++j) {
        float best;
        const int k = first_max4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], best);
        if (!(best > 0.0f)) continue;
        const float g = dp[q * out_plane + i * p_.OW + j];
        at[count] = static_cast<std::int32_t>((2 * i + k / 2) * row_ + (2 * j + k % 2) * col);
        gs[count++] = g;
        sum += static_cast<double>(g);
      }
    }
    hits_[plane] = count;
    plane_sums_[plane] = sum;
  }

  // dx of image n: every hit adds g · w[o] under its patch of a zero-padded, channels-innermost
  // copy of the image (rows of KW · cp_ contiguous floats), which is then cropped into NCHW.
  void data_gradient(std::int64_t n, float* dx, [[maybe_unused]] bool avx2) {
    float* pad = dx_pad_ + n * image_;
    std::fill_n(pad, image_, 0.0f);
    const float* taps = w_taps_.data<float>();
    const std::int64_t taps_per_output = g_.KH * g_.KW * cp_;
    for (std::int64_t o = 0; o < g_.O; ++o) {
      const std::int64_t q = n * g_.O + o;
      const std::int32_t* at = hit_at_ + q * slots_;
      const float* gs = hit_g_ + q * slots_;
      const std::int64_t count = hits_[static_cast<std::size_t>(q)];
      const float* w = taps + o * taps_per_output;
#ifdef DAGRAD_X86
      if (avx2) {
        scatter_hits_avx2(pad, row_, cp_, w, g_.KH, g_.KW, at, gs, count);
        continue;
      }
#endif
      for (std::int64_t e = 0; e < count; ++e) {
        for (std::int64_t a = 0; a < g_.KH; ++a) {
          for (std::int64_t b = 0; b < g_.KW * cp_; ++b) {
            pad[at[e] + a * row_ + b] += gs[e] * w[a * g_.KW * cp_ + b];
          }
        }
      }
    }
    for (std::int64_t c = 0; c < g_.C; ++c) {
      float* out = dx + (n * g_.C + c) * g_.H * g_.W;
      for (std::int64_t y = 0; y < g_.H; ++y) {
        const float* in = pad + (y + g_.padding[0]) * row_ + g_.padding[1] * cp_ + c;
        for (std::int64_t x = 0; x < g_.W; ++x) out[y * g_.W + x] = in[x * cp_];
      }
    }
  }

  // Channels innermost: adds image n's hits of output channels [first, last) to their
  // [KH][KW][cp_] accumulators, each kernel row (KW · cp_ contiguous floats) in runs of up to
  // run_vectors vectors held in registers.
  void accumulate_nhwc(std::int64_t n, std::int64_t first, std::int64_t last,
                       [[maybe_unused]] bool avx2) {
    const float* image = x_pad_ + n * image_;
    const std::int64_t row_vectors = g_.KW * cp_ / 8;
    for (std::int64_t o = first; o < last; ++o) {
      const std::int64_t q = n * g_.O + o;
      const std::int32_t* at = hit_at_ + q * slots_;
      const float* gs = hit_g_ + q * slots_;
      const std::int64_t count = hits_[static_cast<std::size_t>(q)];
      float* acc = acc_.data() + o * g_.KH * g_.KW * cp_;
      for (std::int64_t kh = 0; kh < g_.KH; ++kh) {
        float* acc_row = acc + kh * g_.KW * cp_;
#ifdef DAGRAD_X86
        if (avx2) {
          for (std::int64_t v = 0; v < row_vectors; v += run_vectors) {
            const auto size = std::min<std::int64_t>(run_vectors, row_vectors - v);
            add_runs[size - 1](acc_row + 8 * v, image, kh * row_ + 8 * v, at, gs, count);
          }
          continue;
        }
#endif
        for (std::int64_t e = 0; e < count; ++e) {
          const float* patch = image + at[e] + kh * row_;
          for (std::int64_t b = 0; b < g_.KW * cp_; ++b) acc_row[b] += gs[e] * patch[b];
        }
      }
    }
  }

  // NCHW rows: adds image n's hits of output channels [first, last) to their [C][KH][8]
  // accumulators, blocks of input channels outer, so that the block's padded planes stay in L1
  // across the channels.
  void accumulate(std::int64_t n, std::int64_t first, std::int64_t last,
                  [[maybe_unused]] bool avx2) {
    const std::int64_t padded_plane = image_ / g_.C;
    const float* image = x_pad_ + n * image_;
    auto hits = [&](std::int64_t o) {
      const std::int64_t q = n * g_.O + o;
      return std::tuple(hit_at_ + q * slots_, hit_g_ + q * slots_,
                        hits_[static_cast<std::size_t>(q)]);
    };
    auto acc = [&](std::int64_t o, std::int64_t c) {
      return acc_.data() + (o * g_.C + c) * g_.KH * 8;
    };
    std::int64_t c = 0;
#ifdef DAGRAD_X86
    if (avx2) {
      const int block = g_.KH <= 6 ? 2 : 1;
      for (; c < g_.C; c += block) {
        const int size = c + block <= g_.C ? block : 1;
        const AddHits add = add_hits_avx2(g_.KH, size);
        for (std::int64_t o = first; o < last; ++o) {
          const auto [at, gs, count] = hits(o);
          add(acc(o, c), image + c * padded_plane, padded_plane, row_, at, gs, count);
        }
      }
      return;
    }
#endif
    for (; c < g_.C; ++c) {
      for (std::int64_t o = first; o < last; ++o) {
        const auto [at, gs, count] = hits(o);
        float* a = acc(o, c);
        for (std::int64_t e = 0; e < count; ++e) {
          for (std::int64_t kh = 0; kh < g_.KH; ++kh) {
            for (std::int64_t kw = 0; kw < g_.KW; ++kw) {
              a[kh * 8 + kw] += gs[e] * image[c * padded_plane + at[e] + kh * row_ + kw];
            }
          }
        }
      }
    }
  }

  ConvGeometry g_;
  PoolGeometry p_;
  bool bias_, data_, nhwc_;
  std::int64_t cp_ = 0;     // channels innermost: channels rounded up to 8
  std::int64_t row_ = 0;    // floats per row of a padded image (all channels of it with nhwc_)
  std::int64_t image_ = 0;  // floats per padded image
  Tensor w_taps_;           // data gradient: w as [O][KH][KW][cp_]
  // In the scratch (pointers set at the start of each run):
  ScratchLayout scratch_;
  std::size_t x_pad_at_ = 0, hit_at_at_ = 0, hit_g_at_ = 0, dx_pad_at_ = 0;
  float* x_pad_ = nullptr;   // [N][C][H + 2ph][row_] or [N][H + 2ph][W + 2pw][cp_], zero padded
  float* dx_pad_ = nullptr;  // data gradient: dx as x_pad_ with the channels innermost
  std::int64_t slots_ = 0;   // hit slots per plane of r
  std::int32_t* hit_at_ = nullptr;  // per plane of r: slots_ offsets into a padded image
  float* hit_g_ = nullptr;          // and the gradients there
  std::vector<std::int64_t> hits_;  // per plane: slots used
  std::vector<double> plane_sums_;  // per plane: sum of its hits' gradients
  std::vector<float> acc_;  // dW as [O][KH][KW][cp_], or [O][C][KH][8] (KW of 8 columns real)
};

// ---- pooling samples ----------------------------------------------------------------------

// Distinct values (a shuffled ramp in [-1, 1)) so no window has tied maxima and central
// differences never move across a tie. The gap between values is 2 / numel.
InputSpec distinct(const Shape& shape, std::uint64_t seed) {
  std::vector<double> values(static_cast<std::size_t>(shape.numel()));
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] = -1.0 + 2.0 * static_cast<double>(i) / static_cast<double>(values.size());
  }
  std::mt19937_64 rng(seed);
  std::shuffle(values.begin(), values.end(), rng);
  InputSpec s = spec(shape);
  s.values = std::move(values);
  return s;
}

struct PoolCase {
  std::string label;
  Shape x;
  Attrs attrs;
};

std::vector<PoolCase> pool_cases() {
  return {
      {"2x2 stride 2", {2, 3, 4, 4}, pool_attrs({2, 2}, {2, 2}, {0, 0})},
      {"3x3 stride 2 padding 1", {2, 3, 5, 5}, pool_attrs({3, 3}, {2, 2}, {1, 1})},
      {"overlapping 3x2 stride 1 padding 0x1", {1, 2, 5, 6}, pool_attrs({3, 2}, {1, 1}, {0, 1})},
      {"floor drops the last row and column", {1, 2, 5, 5}, pool_attrs({2, 2}, {2, 2}, {0, 0})},
      {"disjoint windows, stride 3 padding 1", {1, 2, 7, 8}, pool_attrs({2, 3}, {3, 3}, {1, 1})},
      {"16 channels (blocked layout in oneDNN)", {1, 16, 5, 5}, pool_attrs({3, 3}, {2, 2}, {1, 1})},
  };
}

Shape pool_output_shape(const PoolCase& c) {
  const PoolGeometry g = pool_geometry(c.attrs, c.x);
  return Shape{c.x[0], c.x[1], g.OH, g.OW};
}

std::vector<ErrorSample> pool_errors() {
  return {
      {"kernel larger than padded input",
       {spec({1, 1, 3, 3})},
       pool_attrs({5, 5}, {1, 1}, {0, 0}),
       "larger than the padded input"},
      {"stride 0",
       {spec({1, 1, 4, 4})},
       pool_attrs({2, 2}, {0, 2}, {0, 0}),
       "stride must be at least 1"},
      {"zero-size input",
       {spec({0, 1, 4, 4})},
       pool_attrs({2, 2}, {2, 2}, {0, 0}),
       "leaves no output"},
      {"padding as large as the kernel",
       {spec({1, 1, 4, 4})},
       pool_attrs({2, 2}, {1, 1}, {2, 0}),
       "must be smaller than the kernel"},
      {"rank 2 input", {spec({4, 4})}, pool_attrs({2, 2}, {1, 1}, {0, 0}), "must be [N, C, H, W]"},
  };
}

// ---- pooling ops --------------------------------------------------------------------------

void register_max_pool2d(OpRegistry& registry) {
  OpDef def;
  def.name = "max_pool2d";
  def.formula =
      "y[n,c,i,j] = max_{p<KH,q<KW} x[n,c, i·sh − ph + p, j·sw − pw + q] (padding never wins); "
      "the gradient goes to the first maximum of each window";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    return {TensorDesc{call.inputs[0].dtype, check_pool(call, call.inputs[0].shape)}};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    return {max_pool2d_backward(c.grad(), c.inputs[0], pair_attr(a, "kernel"),
                                pair_attr(a, "stride"), pair_attr(a, "padding"))};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const PoolGeometry g = pool_geometry(call.attrs(), call.inputs[0].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* x = call.inputs[0].data<T>();
      T* y = call.outputs[0].data<T>();
      for_each_window_max(g, x, [&](std::int64_t yi, std::int64_t xi) { y[yi] = x[xi]; });
    });
  };
  def.onednn = or_reference([](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (!all_f32(build)) return nullptr;
    const PoolGeometry g = pool_geometry(build.node.attrs, build.inputs[0].shape);
    if (windows_disjoint(g)) return direct_max_pool_forward(g);
    return pool_forward_onednn(dnnl::algorithm::pooling_max)(build);
  });
  def.samples = [] {
    std::vector<Sample> samples;
    std::uint64_t seed = 1;
    for (const PoolCase& c : pool_cases())
      samples.push_back(Sample{c.label, {distinct(c.x, seed++)}, c.attrs});
    return samples;
  };
  def.error_samples = pool_errors;
  registry.add(std::move(def));
}

void register_max_pool2d_backward(OpRegistry& registry) {
  OpDef def;
  def.name = "max_pool2d_backward";
  def.formula = "dx[first maximum of window (n,c,i,j)] += dy[n,c,i,j]; 0 elsewhere";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    const Shape y = check_pool(call, call.inputs[1].shape);
    if (call.inputs[0].shape != y) {
      call.fail("dy {} does not match the output {} of pooling x {}", call.inputs[0], y,
                call.inputs[1]);
    }
    return {call.inputs[1]};
  };
  // Linear in dy; its adjoint is max_pool2d_gather. With respect to x the output is piecewise
  // constant (the maxima only move at ties), so x gets no gradient (zero almost everywhere).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    std::optional<Value> d_dy;
    if (c.needs[0]) {
      d_dy = max_pool2d_gather(c.grad(), c.inputs[1], pair_attr(a, "kernel"),
                               pair_attr(a, "stride"), pair_attr(a, "padding"));
    }
    return {d_dy, std::nullopt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const PoolGeometry g = pool_geometry(call.attrs(), call.inputs[1].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* dy = call.inputs[0].data<T>();
      const T* x = call.inputs[1].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      for_each_window_max(g, x, [&](std::int64_t yi, std::int64_t xi) {
        acc[static_cast<std::size_t>(xi)] += static_cast<double>(dy[yi]);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference([](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (!all_f32(build)) return nullptr;
    const PoolGeometry g = pool_geometry(build.node.attrs, build.inputs[1].shape);
    if (windows_disjoint(g)) return direct_max_pool_backward(g);
    return std::make_unique<MaxPoolBackwardKernel>(g, build.inputs[0], build.inputs[1],
                                                   build.engine);
  });
  // relu_grad(max_pool2d_backward(dy, x), x): the backward of relu -> max_pool2d.
  def.fuse_consumer = [](const KernelBuild& build,
                         const Node& consumer) -> std::unique_ptr<Kernel> {
    const Value& x = build.node.inputs[1];
    if (consumer.op != "relu_grad" || consumer.inputs.size() != 2 ||
        consumer.inputs[1].node_id() != x.node_id() || consumer.inputs[1].index() != x.index() ||
        !all_f32(build)) {
      return nullptr;
    }
    const PoolGeometry g = pool_geometry(build.node.attrs, build.inputs[1].shape);
    if (!windows_disjoint(g)) return nullptr;
    return direct_max_pool_backward(g, /*relu_mask=*/true);
  };
  def.samples = [] {
    std::vector<Sample> samples;
    std::uint64_t seed = 1;
    for (const PoolCase& c : pool_cases()) {
      samples.push_back(
          Sample{c.label, {spec(pool_output_shape(c)), distinct(c.x, seed++)}, c.attrs});
    }
    return samples;
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"dy of the wrong shape",
                                     {spec({1, 1, 3, 3}), spec({1, 1, 4, 4})},
                                     pool_attrs({2, 2}, {2, 2}, {0, 0}),
                                     "does not match the output [1,1,2,2]"}};
  };
  registry.add(std::move(def));
}

void register_max_pool2d_gather(OpRegistry& registry) {
  OpDef def;
  def.name = "max_pool2d_gather";
  def.formula =
      "y[n,c,i,j] = g[n,c at the first maximum of x's window (i,j)] (the adjoint of "
      "max_pool2d_backward)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    if (call.inputs[0].shape != call.inputs[1].shape) {
      call.fail("g {} and x {} must have the same shape", call.inputs[0], call.inputs[1]);
    }
    return {TensorDesc{call.inputs[0].dtype, check_pool(call, call.inputs[1].shape)}};
  };
  // Linear in g with adjoint max_pool2d_backward; piecewise constant in x (no gradient).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    std::optional<Value> d_g;
    if (c.needs[0]) {
      d_g = max_pool2d_backward(c.grad(), c.inputs[1], pair_attr(a, "kernel"),
                                pair_attr(a, "stride"), pair_attr(a, "padding"));
    }
    return {d_g, std::nullopt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const PoolGeometry g = pool_geometry(call.attrs(), call.inputs[1].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* source = call.inputs[0].data<T>();
      const T* x = call.inputs[1].data<T>();
      T* y = call.outputs[0].data<T>();
      for_each_window_max(g, x, [&](std::int64_t yi, std::int64_t xi) { y[yi] = source[xi]; });
    });
  };
  def.samples = [] {
    std::vector<Sample> samples;
    std::uint64_t seed = 1;
    for (const PoolCase& c : pool_cases()) {
      samples.push_back(Sample{c.label, {spec(c.x), distinct(c.x, seed++)}, c.attrs});
    }
    return samples;
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"g and x of different shapes",
                                     {spec({1, 1, 4, 4}), spec({1, 1, 4, 5})},
                                     pool_attrs({2, 2}, {2, 2}, {0, 0}),
                                     "must have the same shape"}};
  };
  registry.add(std::move(def));
}

void register_avg_pool2d(OpRegistry& registry) {
  OpDef def;
  def.name = "avg_pool2d";
  def.formula =
      "y[n,c,i,j] = mean of x[n,c, i·sh − ph + p, j·sw − pw + q] over the window's elements "
      "inside the image (padding excluded from sum and count)";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    return {TensorDesc{call.inputs[0].dtype, check_pool(call, call.inputs[0].shape)}};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    return {avg_pool2d_backward(c.grad(), c.inputs[0].shape(), pair_attr(a, "kernel"),
                                pair_attr(a, "stride"), pair_attr(a, "padding"))};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const PoolGeometry g = pool_geometry(call.attrs(), call.inputs[0].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* x = call.inputs[0].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      for_each_window_element(g, [&](std::int64_t yi, std::int64_t xi, std::int64_t count) {
        acc[static_cast<std::size_t>(yi)] +=
            static_cast<double>(x[xi]) / static_cast<double>(count);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference(pool_forward_onednn(dnnl::algorithm::pooling_avg_exclude_padding));
  def.samples = [] {
    std::vector<Sample> samples;
    for (const PoolCase& c : pool_cases()) samples.push_back(Sample{c.label, {spec(c.x)}, c.attrs});
    return samples;
  };
  def.error_samples = pool_errors;
  registry.add(std::move(def));
}

void register_avg_pool2d_backward(OpRegistry& registry) {
  OpDef def;
  def.name = "avg_pool2d_backward";
  def.formula =
      "dx[element of window (n,c,i,j)] += dy[n,c,i,j] / (elements of that window inside the image)";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    Shape x = shape_attr(call, "input_shape");
    // The batch follows dy, so a plan can re-specialise this node for another batch size.
    if (x.rank() == 4 && call.inputs[0].shape.rank() == 4) x[0] = call.inputs[0].shape[0];
    const Shape y = check_pool(call, x);
    if (call.inputs[0].shape != y) {
      call.fail("dy {} does not match the output {} of pooling an input {}", call.inputs[0], y, x);
    }
    return {TensorDesc{call.inputs[0].dtype, x}};
  };
  // Linear in dy, and its adjoint is avg_pool2d itself.
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    return {avg_pool2d(c.grad(), pair_attr(a, "kernel"), pair_attr(a, "stride"),
                       pair_attr(a, "padding"))};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const PoolGeometry g = pool_geometry(call.attrs(), call.outputs[0].shape());
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* dy = call.inputs[0].data<T>();
      std::vector<double> acc(static_cast<std::size_t>(call.outputs[0].numel()), 0.0);
      for_each_window_element(g, [&](std::int64_t yi, std::int64_t xi, std::int64_t count) {
        acc[static_cast<std::size_t>(xi)] +=
            static_cast<double>(dy[yi]) / static_cast<double>(count);
      });
      store<T>(call.outputs[0], acc);
    });
  };
  def.onednn = or_reference([](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (!all_f32(build)) return nullptr;
    const PoolGeometry g = pool_geometry(build.node.attrs, build.outputs[0].shape);
    const auto algorithm = dnnl::algorithm::pooling_avg_exclude_padding;
    const auto diff_src_md = pool_md(build.outputs[0]);
    const auto diff_dst_md = pool_md(build.inputs[0]);
    dnnl::pooling_forward::primitive_desc hint(
        pool_forward_desc(dnnl::prop_kind::forward_training, algorithm, g, diff_src_md,
                          diff_dst_md),
        build.engine);
    dnnl::pooling_backward::primitive_desc pd(
        pool_backward_desc(algorithm, g, diff_src_md, diff_dst_md), build.engine, hint);
    return std::make_unique<ReorderingKernel>(
        dnnl::pooling_backward(pd), pd,
        std::vector<PrimitiveArg>{input_arg(DNNL_ARG_DIFF_DST, 0, plain_md(build.inputs[0])),
                                  output_arg(DNNL_ARG_DIFF_SRC, 0, plain_md(build.outputs[0]))},
        build.engine);
  });
  def.samples = [] {
    std::vector<Sample> samples;
    for (const PoolCase& c : pool_cases()) {
      samples.push_back(
          Sample{c.label, {spec(pool_output_shape(c))}, with(c.attrs, "input_shape", c.x.dims())});
    }
    return samples;
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"dy of the wrong shape",
         {spec({1, 1, 3, 3})},
         with(pool_attrs({2, 2}, {2, 2}, {0, 0}), "input_shape", Ints{1, 1, 4, 4}),
         "does not match the output [1,1,2,2]"},
        {"input shape of rank 2",
         {spec({1, 1, 2, 2})},
         with(pool_attrs({2, 2}, {2, 2}, {0, 0}), "input_shape", Ints{4, 4}),
         "input_shape must have four values"},
    };
  };
  registry.add(std::move(def));
}

void require_valid(const Value& v, std::string_view op, std::string_view what) {
  if (!v.valid()) throw GraphError(fmt::format("{}: {} is an empty Value", op, what));
}

}  // namespace

std::unique_ptr<Kernel> pooled_relu_gradients_kernel(const KernelBuild& build, const Node& pool,
                                                     bool bias, bool data) {
  const std::size_t inputs = data ? 4 : 3, outputs = 1 + (bias ? 1 : 0) + (data ? 1 : 0);
  if (!all_f32(build) || build.inputs.size() != inputs || build.outputs.size() != outputs) {
    return nullptr;
  }
  const ConvGeometry g =
      conv_geometry(build.node.attrs, build.inputs[2].shape, build.outputs[0].shape);
  const PoolGeometry p = pool_geometry(pool.attrs, build.inputs[1].shape);
  const bool fits = g.G == 1 && g.stride == Size2{1, 1} && g.dilation == Size2{1, 1} && g.KH <= 8 &&
                    g.KW <= 8 && is_pool2x2(p) && p.planes == g.N * g.O && p.H == g.OH &&
                    p.W == g.OW &&
                    (g.C + 8) * (g.H + 2 * g.padding[0]) * (g.W + 2 * g.padding[1] + 8) <
                        std::numeric_limits<std::int32_t>::max() &&
                    (!data || (build.inputs[3].shape == build.outputs[0].shape &&
                               build.outputs.back().shape == build.inputs[2].shape));
  if (!fits) return nullptr;
  return std::make_unique<PooledReluGradients>(g, p, bias, data);
}

std::unique_ptr<Kernel> conv_backward_fused_kernel(const KernelBuild& build) {
  if (!all_f32(build)) return nullptr;
  try {
    return std::make_unique<ConvBackwardKernel>(build);
  } catch (const dnnl::error&) {
    return nullptr;
  }
}

Value conv2d(const Value& x, const Value& w, std::optional<Value> bias, Conv2dOptions options,
             std::source_location where) {
  require_valid(x, "conv2d", "the input");
  require_valid(w, "conv2d", "the weights");
  std::vector<Value> inputs{x, w};
  if (bias) {
    require_valid(*bias, "conv2d", "the bias");
    inputs.push_back(*bias);
  }
  return x.graph().apply("conv2d", std::move(inputs), conv_attrs(options), where);
}

Value conv2d_backward_data(const Value& dy, const Value& w, const Shape& input_shape,
                           Conv2dOptions options, std::source_location where) {
  require_valid(dy, "conv2d_backward_data", "dy");
  require_valid(w, "conv2d_backward_data", "the weights");
  return dy.graph().apply("conv2d_backward_data", {dy, w},
                          with(conv_attrs(options), "input_shape", input_shape.dims()), where);
}

Value conv2d_backward_weights(const Value& x, const Value& dy, Size2 kernel, Conv2dOptions options,
                              std::source_location where) {
  require_valid(x, "conv2d_backward_weights", "the input");
  require_valid(dy, "conv2d_backward_weights", "dy");
  return x.graph().apply("conv2d_backward_weights", {x, dy},
                         with(conv_attrs(options), "kernel", ints(kernel)), where);
}

Value max_pool2d(const Value& x, Size2 kernel, Size2 stride, Size2 padding,
                 std::source_location where) {
  require_valid(x, "max_pool2d", "the input");
  return x.graph().apply("max_pool2d", {x}, pool_attrs(kernel, stride, padding), where);
}

Value max_pool2d_backward(const Value& dy, const Value& x, Size2 kernel, Size2 stride,
                          Size2 padding, std::source_location where) {
  require_valid(dy, "max_pool2d_backward", "dy");
  require_valid(x, "max_pool2d_backward", "the input");
  return dy.graph().apply("max_pool2d_backward", {dy, x}, pool_attrs(kernel, stride, padding),
                          where);
}

Value max_pool2d_gather(const Value& g, const Value& x, Size2 kernel, Size2 stride, Size2 padding,
                        std::source_location where) {
  require_valid(g, "max_pool2d_gather", "g");
  require_valid(x, "max_pool2d_gather", "the input");
  return g.graph().apply("max_pool2d_gather", {g, x}, pool_attrs(kernel, stride, padding), where);
}

Value avg_pool2d(const Value& x, Size2 kernel, Size2 stride, Size2 padding,
                 std::source_location where) {
  require_valid(x, "avg_pool2d", "the input");
  return x.graph().apply("avg_pool2d", {x}, pool_attrs(kernel, stride, padding), where);
}

Value avg_pool2d_backward(const Value& dy, const Shape& input_shape, Size2 kernel, Size2 stride,
                          Size2 padding, std::source_location where) {
  require_valid(dy, "avg_pool2d_backward", "dy");
  return dy.graph().apply(
      "avg_pool2d_backward", {dy},
      with(pool_attrs(kernel, stride, padding), "input_shape", input_shape.dims()), where);
}

Value global_avg_pool(const Value& x, bool keepdims, std::source_location where) {
  require_valid(x, "global_avg_pool", "the input");
  if (x.rank() != 4) {
    throw ShapeError(fmt::format("global_avg_pool of \"{}\": input must be [N, C, H, W], got {}",
                                 x.str(), x.shape()));
  }
  return mean(x, {2, 3}, keepdims, where);
}

void register_conv_ops(OpRegistry& registry) {
  register_conv2d(registry);
  register_conv2d_backward_data(registry);
  register_conv2d_backward_weights(registry);
  register_max_pool2d(registry);
  register_max_pool2d_backward(registry);
  register_max_pool2d_gather(registry);
  register_avg_pool2d(registry);
  register_avg_pool2d_backward(registry);
}

}  // namespace dagrad
