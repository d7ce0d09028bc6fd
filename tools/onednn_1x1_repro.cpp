// Standalone reproducer of a oneDNN 2.6 bug, for an upstream report (no dagrad code in it):
// convolution_backward_weights with NHWC src and diff_dst, one input channel, a 1x1 kernel and
// a stride of 2 or 3 (implementation jit_1x1:avx2 on an AVX2 machine) returns wrong weight
// gradients, and for some shapes writes outside its buffers. The same problem in blocked or
// NCHW layouts, or at stride 1, is right. dagrad avoids NHWC there (ops/conv.cpp,
// weights_gradient_layouts; test Conv2d.OneChannelStridedWeightsGradientMatchesTheReference).
//
//   onednn-1x1-repro [N H W OC stride]     (default: a sweep of shapes, both layouts)
//
// For each case it prints the implementation oneDNN chose, the largest difference from a plain
// loop (in double) relative to the gradient's largest value, and whether guard bytes around the
// buffers were overwritten. Exit status 1 when any NHWC case is wrong, 0 otherwise (so a fixed
// oneDNN shows as 0).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <vector>

namespace {

using dnnl::memory;
using tag = memory::format_tag;

constexpr std::size_t guard_floats = 4096;
constexpr float guard_value = 12345.0f;

// A float buffer with guard zones on both sides.
struct Guarded {
  explicit Guarded(std::size_t n) : data(n + 2 * guard_floats, guard_value), size(n) {}
  float* get() { return data.data() + guard_floats; }
  bool intact() const {
    for (std::size_t i = 0; i < guard_floats; ++i) {
      if (data[i] != guard_value || data[guard_floats + size + i] != guard_value) return false;
    }
    return true;
  }
  std::vector<float> data;
  std::size_t size;
};

struct Result {
  const char* impl = "";
  double relative_error = 0;
  bool guards_intact = true;
};

// dW[oc] = sum over n, oh, ow of x[n, 0, oh*s, ow*s] * dy[n, oc, oh, ow] (1x1, no padding).
Result run(memory::dim n, memory::dim h, memory::dim w, memory::dim oc, memory::dim stride,
           tag layout) {
  const memory::dim oh = (h - 1) / stride + 1, ow = (w - 1) / stride + 1;
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const auto f32 = memory::data_type::f32;
  memory::desc src({n, 1, h, w}, f32, layout), dst({n, oc, oh, ow}, f32, layout);
  memory::desc weights({oc, 1, 1, 1}, f32, tag::oihw);
  memory::desc weights_any({oc, 1, 1, 1}, f32, tag::any);
  const memory::dims strides{stride, stride}, padding{0, 0};
  dnnl::convolution_forward::primitive_desc hint(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                      dnnl::algorithm::convolution_direct, src, weights_any, dst,
                                      strides, padding, padding),
      engine);
  dnnl::convolution_backward_weights::primitive_desc pd(
      dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, src,
                                               weights_any, dst, strides, padding, padding),
      engine, hint);

  // Values depend on the logical index only, so both layouts get the same tensors.
  Guarded x(static_cast<std::size_t>(n * h * w)), dy(static_cast<std::size_t>(n * oc * oh * ow));
  auto x_at = [&](memory::dim b, memory::dim i, memory::dim j) {
    return static_cast<float>(std::sin(0.37 * static_cast<double>((b * h + i) * w + j) + 0.1));
  };
  auto dy_at = [&](memory::dim b, memory::dim c, memory::dim i, memory::dim j) {
    return static_cast<float>(
        std::cos(0.23 * static_cast<double>(((b * oc + c) * oh + i) * ow + j)));
  };
  for (memory::dim b = 0; b < n; ++b) {
    for (memory::dim i = 0; i < h; ++i) {
      for (memory::dim j = 0; j < w; ++j) x.get()[(b * h + i) * w + j] = x_at(b, i, j);  // C = 1
      for (memory::dim c = 0; c < oc && i < oh; ++c) {
        for (memory::dim j = 0; j < ow; ++j) {
          const memory::dim at = layout == tag::nhwc ? ((b * oh + i) * ow + j) * oc + c
                                                     : ((b * oc + c) * oh + i) * ow + j;
          dy.get()[at] = dy_at(b, c, i, j);
        }
      }
    }
  }
  Guarded grad_any(pd.diff_weights_desc().get_size() / sizeof(float));
  Guarded grad(static_cast<std::size_t>(oc));
  memory src_mem(src, engine, x.get()), dst_mem(dst, engine, dy.get());
  memory any_mem(pd.diff_weights_desc(), engine, grad_any.get()),
      out_mem(weights, engine, grad.get());
  dnnl::convolution_backward_weights(pd).execute(
      stream,
      {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_DIFF_WEIGHTS, any_mem}});
  dnnl::reorder(any_mem, out_mem).execute(stream, any_mem, out_mem);
  stream.wait();

  Result r;
  r.impl = pd.impl_info_str();
  double largest = 0, error = 0;
  for (memory::dim c = 0; c < oc; ++c) {
    double exact = 0;
    for (memory::dim b = 0; b < n; ++b) {
      for (memory::dim i = 0; i < oh; ++i) {
        for (memory::dim j = 0; j < ow; ++j)
          exact += double(x_at(b, i * stride, j * stride)) * dy_at(b, c, i, j);
      }
    }
    largest = std::max(largest, std::abs(exact));
    error = std::max(error, std::abs(exact - grad.get()[c]));
  }
  r.relative_error = error / std::max(largest, 1e-30);
  r.guards_intact = x.intact() && dy.intact() && grad_any.intact() && grad.intact();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  struct Case {
    memory::dim n, h, w, oc, stride;
  };
  std::vector<Case> cases;
  if (argc == 6) {
    cases.push_back({std::atol(argv[1]), std::atol(argv[2]), std::atol(argv[3]), std::atol(argv[4]),
                     std::atol(argv[5])});
  } else if (argc == 1) {
    cases = {{2, 8, 8, 1, 2},    {8, 6, 12, 7, 2}, {2, 12, 12, 8, 3},
             {4, 28, 28, 32, 2}, {2, 8, 8, 16, 1}, {64, 28, 28, 32, 2}};
  } else {
    std::fprintf(stderr, "usage: %s [N H W OC stride]\n", argv[0]);
    return 2;
  }
  std::printf("oneDNN %d.%d.%d\n", dnnl_version()->major, dnnl_version()->minor,
              dnnl_version()->patch);
  bool nhwc_wrong = false;
  for (const Case& c : cases) {
    for (tag layout : {tag::nhwc, tag::nchw}) {
      const Result r = run(c.n, c.h, c.w, c.oc, c.stride, layout);
      const bool wrong = r.relative_error > 1e-4 || !r.guards_intact;
      if (wrong && layout == tag::nhwc) nhwc_wrong = true;
      std::printf("[%ld,1,%ld,%ld] %ld filters 1x1 stride %ld %s: %-14s relative error %.2e%s%s\n",
                  static_cast<long>(c.n), static_cast<long>(c.h), static_cast<long>(c.w),
                  static_cast<long>(c.oc), static_cast<long>(c.stride),
                  layout == tag::nhwc ? "nhwc" : "nchw", r.impl, r.relative_error,
                  r.guards_intact ? "" : ", wrote outside its buffers", wrong ? "  WRONG" : "");
      if (c.oc == 1 && layout == tag::nchw) std::printf("  (one filter: nchw is nhwc's bytes)\n");
    }
  }
  return nhwc_wrong ? 1 : 0;
}
