// Autograd nodes in C++ for the CPU-only pointwise families: lct::gated_residual_autograd
// and lct::bias_gelu_autograd.
//
// Why (as csrc/cpu/layer_norm_autograd.cpp): at the demo's sizes each kernel takes
// 10-20 us, and the Python autograd Function around it (lct_kernels/ops/_fused_grad.py)
// added about 20 us forward and 17 us backward per call (torch.profiler, 2026-12-02,
// (128, 4, 128) float32), where ATen's elementwise ops keep their nodes in C++.  These
// ops run the same registered kernels (through the dispatcher, below autograd) from a
// torch::autograd::Function: one dispatcher call forward, no Python backward.
//
// The math is the Python formulas' (lct_kernels/ops/gated_residual.py and
// ops/bias_gelu.py, _backward): the Python side uses these nodes only for eager calls
// on CPU tensors; torch.compile traces the registered kernels with their Python
// formulas and fake kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lct::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// --- gated residual: out = x + gate[:, None] * (y + bias) ----------------------------
using OptT = std::optional<at::Tensor>;
using GatedFwdFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&);
using GatedBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, bool, bool, bool);

const c10::TypedOperatorHandle<GatedFwdFn>& gated_fwd_op() {
  static const auto op = find_op<GatedFwdFn>("lct::gated_residual_fwd");
  return op;
}
const c10::TypedOperatorHandle<GatedBwdFn>& gated_bwd_op() {
  static const auto op = find_op<GatedBwdFn>("lct::gated_residual_bwd");
  return op;
}

// Inputs: 0 x, 1 gate, 2 y, 3 bias (optional: its needs_input_grad edge exists only when given).
struct GatedResidualFunction : public torch::autograd::Function<GatedResidualFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate,
                            const at::Tensor& y, const OptT& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = gated_fwd_op().call(x, gate, y, bias);
    ctx->set_materialize_grads(false);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    ctx->save_for_backward({gate, y, has_bias ? *bias : at::Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    at::Tensor dout = grads[0];
    if (!dout.defined()) return out;
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_gate = ctx->needs_input_grad(1),
               need_y = ctx->needs_input_grad(2), need_bias = has_bias && ctx->needs_input_grad(3);
    if (need_x) out[0] = dout;  // d out / d x = identity
    if (!(need_gate || need_y || need_bias)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &y = saved[1], &bias = saved[2];
    at::Tensor g = dout.scalar_type() == y.scalar_type() ? dout : dout.to(y.scalar_type());
    if (!g.is_contiguous()) g = g.contiguous();
    auto [dgate, dy, dbias] = gated_bwd_op().call(g, gate, y, has_bias ? OptT(bias) : OptT(),
                                                  need_gate, need_y, need_bias);
    if (need_gate) out[1] = dgate.scalar_type() == gate.scalar_type() ? dgate : dgate.to(gate.scalar_type());
    if (need_y) out[2] = dy;
    if (need_bias) out[3] = dbias.scalar_type() == bias.scalar_type() ? dbias : dbias.to(bias.scalar_type());
    return out;
  }
};

at::Tensor gated_residual_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                                   const OptT& bias) {
  return GatedResidualFunction::apply(x, gate, y, bias);
}

at::Tensor gated_residual_autograd_below(const at::Tensor& x, const at::Tensor& gate,
                                         const at::Tensor& y, const OptT& bias) {
  return gated_fwd_op().call(x, gate, y, bias);
}

// --- bias + GELU(tanh): y = gelu_tanh(h + bias) -------------------------------------
using GeluFwdFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using GeluBwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, bool, bool);

const c10::TypedOperatorHandle<GeluFwdFn>& gelu_fwd_op() {
  static const auto op = find_op<GeluFwdFn>("lct::bias_gelu_fwd");
  return op;
}
const c10::TypedOperatorHandle<GeluBwdFn>& gelu_bwd_op() {
  static const auto op = find_op<GeluBwdFn>("lct::bias_gelu_bwd");
  return op;
}

struct BiasGeluFunction : public torch::autograd::Function<BiasGeluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y = gelu_fwd_op().call(h, bias);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({h, bias});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);
    at::Tensor dy = grads[0];
    if (!dy.defined()) return out;
    const bool need_h = ctx->needs_input_grad(0), need_bias = ctx->needs_input_grad(1);
    if (!(need_h || need_bias)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &bias = saved[1];
    at::Tensor g = dy.scalar_type() == h.scalar_type() ? dy : dy.to(h.scalar_type());
    if (!g.is_contiguous()) g = g.contiguous();
    auto [dh, dbias] = gelu_bwd_op().call(g, h, bias, need_h, need_bias);
    if (need_h) out[0] = dh;
    if (need_bias) out[1] = dbias.scalar_type() == bias.scalar_type() ? dbias : dbias.to(bias.scalar_type());
    return out;
  }
};

at::Tensor bias_gelu_autograd(const at::Tensor& h, const at::Tensor& bias) {
  return BiasGeluFunction::apply(h, bias);
}

at::Tensor bias_gelu_autograd_below(const at::Tensor& h, const at::Tensor& bias) {
  return gelu_fwd_op().call(h, bias);
}

}  // namespace

// Autograd (not CompositeImplicitAutograd): the nodes are these ops' own, and the
// kernels below them are reached through the dispatcher with autograd excluded.
TORCH_LIBRARY_IMPL(lct, Autograd, m) {
  m.impl("gated_residual_autograd", &gated_residual_autograd);
  m.impl("bias_gelu_autograd", &bias_gelu_autograd);
}

// Below autograd (inference tensors, torch.inference_mode): the forward kernels alone.
TORCH_LIBRARY_IMPL(lct, CompositeExplicitAutograd, m) {
  m.impl("gated_residual_autograd", &gated_residual_autograd_below);
  m.impl("bias_gelu_autograd", &bias_gelu_autograd_below);
}

}  // namespace lct::cpu
