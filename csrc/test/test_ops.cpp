// ctest smoke test of liblct_ops.so: load it the way torch.ops.load_library
// does (dlopen, which runs the TORCH_LIBRARY registrations), call the ops
// through the dispatcher, and compare with a float64 loop written from the
// formulas.  Exit code 0 on success.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/scalar_tensor.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const char* what) {
  const double err = std::fabs(got - want);
  if (!(err <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::printf("usage: %s path/to/liblct_ops.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::printf("FAIL dlopen: %s\n", dlerror());
    return 1;
  }
  using LossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      int64_t, bool, int64_t, bool);
  auto loss_op = c10::Dispatcher::singleton().findSchemaOrThrow("lct::robust_loss", "").typed<LossFn>();

  const int64_t B = 5, N = 37;
  const double c = 0.3;
  at::Tensor pred = at::randn({B, N}), target = at::randn({B, N}), weight = at::randn({B}).abs();
  at::Tensor c_t = at::scalar_tensor(c, at::TensorOptions().dtype(at::kDouble));
  for (int64_t kind = 0; kind < 3; ++kind) {
    auto [out, rho, grad] = loss_op.call(pred, target, c_t, weight, kind, false, /*mean*/ 1, true);
    const float* p = pred.const_data_ptr<float>();
    const float* t = target.const_data_ptr<float>();
    const float* w = weight.const_data_ptr<float>();
    double total = 0;
    for (int64_t r = 0; r < B; ++r) {
      double m = 0;
      for (int64_t j = 0; j < N; ++j) m += std::pow(double(p[r * N + j]) - t[r * N + j], 2) / N;
      const double c2 = c * c;
      const double value = kind == 0 ? std::log1p(m / (2 * c2))
                           : kind == 1 ? std::sqrt(m + c2) - c
                                       : 2 * m / (m + 4 * c2);
      const double deriv = kind == 0 ? 1 / (m + 2 * c2)
                           : kind == 1 ? 0.5 / std::sqrt(m + c2)
                                       : 8 * c2 / ((m + 4 * c2) * (m + 4 * c2));
      expect_close(rho.const_data_ptr<float>()[r], value, 1e-5, "rho");
      total += w[r] * value / B;
      const double g0 = w[r] / B * deriv * 2 * (double(p[r * N]) - t[r * N]) / N;
      expect_close(grad.const_data_ptr<float>()[r * N], g0, 1e-4, "grad");
    }
    expect_close(out.const_data_ptr<float>()[0], total, 1e-5, "mean loss");
  }
  std::printf(failures == 0 ? "lct_ops smoke test: OK\n" : "lct_ops smoke test: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
