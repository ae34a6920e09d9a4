"""Drop-in replacement for ``torchcfm.optimal_transport``: OTPlanSampler and wasserstein,
with the "exact" method solved by lct_kernels' exact assignment solvers."""

from .sampler import OTPlanSampler, wasserstein

__all__ = ["OTPlanSampler", "wasserstein"]
