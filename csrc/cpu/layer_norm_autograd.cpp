// lct::layer_norm_autograd: the layer norm family with its autograd node in C++.
//
// Why: at the short rows of small DiTs (the demo's 2048 x 32 qk-norm, 512 x 128
// block norms) a layer norm's kernels take 20-40 us, and the Python autograd
// Function around lct::layer_norm_fwd (forward plumbing, the Python backward, the
// parameter-gradient sums as separate Python-level torch calls) added about as
// much again, where ATen's F.layer_norm keeps its node in C++.  This op runs the
// same two registered kernels (lct::layer_norm_fwd / lct::layer_norm_bwd, through
// the dispatcher, below autograd) from a torch::autograd::Function, so eager
// training calls pay one dispatcher call forward and no Python at all backward.
//
// Same math as the Python formula (lct_kernels/ops/layer_norm.py, _make_backward
// and parameter_grads): from the backward kernel's per-group partials
//   p1_g = sum over group g's rows of dy,  p2_g = the same of dy * xhat,
//   d bias = sum_g (1 + scale_g) p1_g,  d weight = sum_g (1 + scale_g) p2_g,
//   d shift = p1,  d scale = weight p2 + bias p1.
// The Python side uses it only in eager mode (torch.compile traces the
// registered op and its Python formula, whose fake kernels it needs), and only
// for CPU tensors: it is device-agnostic, but the CUDA path has not run it on a GPU.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lct::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

using FwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, double, int64_t, bool);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
    const OptT&, const OptT&, int64_t, bool, bool, bool);

const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lct::layer_norm_fwd", "").typed<FwdFn>();
  return op;
}

const c10::TypedOperatorHandle<BwdFn>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lct::layer_norm_bwd", "").typed<BwdFn>();
  return op;
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// Inputs: 0 x, 1 weight, 2 bias, 3 shift, 4 scale, 5 eps, 6 group_rows, 7 save_y.
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptT& weight,
                            const OptT& bias, const OptT& shift, const OptT& scale, double eps,
                            int64_t group_rows, bool save_y) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = fwd_op().call(x, weight, bias, shift, scale, eps, group_rows, save_y);
    ctx->set_materialize_grads(false);
    ctx->saved_data["group_rows"] = group_rows;
    ctx->saved_data["save_y"] = save_y;
    // needs_input_grad counts the tensors that were given (absent optionals have no edge)
    int64_t present = 1;  // bit i: input i (x, weight, bias, shift, scale) was given
    const OptT* optionals[4] = {&weight, &bias, &shift, &scale};
    for (int i = 0; i < 4; ++i)
      if (optionals[i]->has_value() && (*optionals[i])->defined()) present |= int64_t(1) << (i + 1);
    ctx->saved_data["present"] = present;
    ctx->save_for_backward({save_y ? y : x, mean, rstd, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), scale.value_or(at::Tensor())});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    at::Tensor dy = grads[0];
    if (!dy.defined()) return out;
    bool need[5] = {false, false, false, false, false};
    {
      const int64_t present = ctx->saved_data["present"].toInt();
      size_t edge = 0;
      for (int i = 0; i < 5; ++i)
        if ((present >> i) & 1) need[i] = ctx->needs_input_grad(edge++);
    }
    const bool need_x = need[0], need_w = need[1], need_b = need[2], need_shift = need[3],
               need_scale = need[4];
    const bool need_partials = need_w || need_b || need_shift || need_scale;
    if (!(need_x || need_partials)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xy = saved[0], &mean = saved[1], &rstd = saved[2];
    const at::Tensor &weight = saved[3], &bias = saved[4], &scale = saved[5];
    if (dy.size(-1) > 1 && dy.stride(-1) != 1) dy = dy.contiguous();
    auto [dx, p1, p2] = bwd_op().call(dy, xy, mean, rstd, opt(weight), opt(bias), opt(scale),
                                      ctx->saved_data["group_rows"].toInt(),
                                      ctx->saved_data["save_y"].toBool(), need_x, need_partials);
    if (need_x) out[0] = dx;
    if (need_partials) {
      // sum_g (1 + scale_g) p_g, or the plain sum without a modulation
      // (one group without a modulation: p's only row, as a view; a reduction here cost
      // more than the whole backward kernel at the qk-norm's sizes)
      auto over_groups = [&](const at::Tensor& p) {
        if (!scale.defined() && p.size(0) == 1) return p.view({p.size(1)});
        return (scale.defined() ? (scale + 1) * p : p).sum(0);
      };
      if (need_w) out[1] = over_groups(p2);
      if (need_b) out[2] = over_groups(p1);
      if (need_shift) out[3] = p1;
      if (need_scale) {
        at::Tensor d_scale = weight.defined() ? p2 * weight : p2;
        if (bias.defined()) d_scale = d_scale + p1 * bias;
        out[4] = d_scale;
      }
    }
    return out;
  }
};

at::Tensor layer_norm_autograd(const at::Tensor& x, const OptT& weight, const OptT& bias,
                               const OptT& shift, const OptT& scale, double eps,
                               int64_t group_rows, bool save_y) {
  return LayerNormFunction::apply(x, weight, bias, shift, scale, eps, group_rows, save_y);
}

}  // namespace

// Autograd (not CompositeImplicitAutograd): the node is this op's own, and the
// kernels below it are reached through the dispatcher with autograd excluded.
TORCH_LIBRARY_IMPL(lct, Autograd, m) {
  m.impl("layer_norm_autograd", &layer_norm_autograd);
}

// Below autograd (inference tensors, torch.inference_mode): the forward kernel alone.
static at::Tensor layer_norm_autograd_below(const at::Tensor& x, const OptT& weight, const OptT& bias,
                                     const OptT& shift, const OptT& scale, double eps,
                                     int64_t group_rows, bool save_y) {
  return std::get<0>(fwd_op().call(x, weight, bias, shift, scale, eps, group_rows, save_y));
}

TORCH_LIBRARY_IMPL(lct, CompositeExplicitAutograd, m) {
  m.impl("layer_norm_autograd", &layer_norm_autograd_below);
}

}  // namespace lct::cpu
