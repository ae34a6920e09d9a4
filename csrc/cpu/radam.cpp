// CPU kernel of the fused RAdam + EMA step (lct::radam_step).
//
// Design: the parameters of a group are cut into spans of kSpan elements (a
// tensor's last span is shorter), and the spans are the parallel tasks: one
// pass per span updates param, exp_avg and exp_avg_sq and, when EMA tensors are
// given, lerps the EMA towards the new param while it is still in a register
// (isa/radam_span.h).  The step's scalars (bias corrections, rectification) are
// the host's, in float64, so this kernel has no reduction and no state of its
// own: the optimizer state is torch.optim.RAdam's, tensor for tensor.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "isa/cpu_features.h"
#include "isa/pointwise_isa.h"
#include "parallel.h"

namespace lct::cpu {
namespace {

constexpr int64_t kSpan = 16384;  // elements per task: parallel.h's kMinElemsPerThread

void check_state(const at::Tensor& t, const at::Tensor& param, const char* name, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == param.numel(),
              "lct: radam_step: ", name, "[", i, "] must be a contiguous float32 CPU tensor with "
              "params[", i, "]'s ", param.numel(), " elements");
}

void radam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList emas, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double bias_correction1,
                    double sqrt_bias_correction2, double rect, bool rectified,
                    double ema_weight) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "lct: radam_step: params, grads, exp_avgs and exp_avg_sqs must have the same "
              "length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size());
  TORCH_CHECK(emas.empty() || emas.size() == n,
              "lct: radam_step: emas must be empty or as long as params (", n, "), got ",
              emas.size());
  for (size_t i = 0; i < n; ++i) {
    check_state(params[i], params[i], "params", i);
    check_state(grads[i], params[i], "grads", i);
    check_state(exp_avgs[i], params[i], "exp_avgs", i);
    check_state(exp_avg_sqs[i], params[i], "exp_avg_sqs", i);
    if (!emas.empty()) check_state(emas[i], params[i], "emas", i);
  }
  RAdamCoefs c;
  c.lr = static_cast<float>(lr);
  c.one_minus_b1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_b2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.bc1 = static_cast<float>(bias_correction1);
  c.sqrt_bc2 = static_cast<float>(sqrt_bias_correction2);
  c.rect = static_cast<float>(rect);
  c.rectified = rectified;
  c.ema_weight = static_cast<float>(ema_weight);

  struct Span {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<Span> spans;
  for (size_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < params[i].numel(); b += kSpan)
      spans.push_back({i, b, std::min(params[i].numel(), b + kSpan)});
  const auto kernel = use_avx2() ? &avx2::radam_span_f32 : &base::radam_span_f32;
  parallel_tasks(int64_t(spans.size()), kSpan, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const Span& sp = spans[size_t(s)];
      const size_t i = sp.tensor;
      float* ema = emas.empty() ? nullptr : emas[i].mutable_data_ptr<float>() + sp.begin;
      kernel(c, params[i].mutable_data_ptr<float>() + sp.begin,
             grads[i].const_data_ptr<float>() + sp.begin,
             exp_avgs[i].mutable_data_ptr<float>() + sp.begin,
             exp_avg_sqs[i].mutable_data_ptr<float>() + sp.begin, ema, sp.end - sp.begin);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) { m.impl("radam_step", &radam_step_cpu); }

}  // namespace lct::cpu
