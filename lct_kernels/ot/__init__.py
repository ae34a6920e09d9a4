"""Drop-in replacement for ``torchcfm.optimal_transport``: OTPlanSampler and wasserstein,
with the "exact" method solved by lct_kernels' exact assignment solvers.

``patch_torchcfm()`` makes torchcfm itself build these samplers (``unpatch_torchcfm()``
undoes it)."""

from .patch import patch_torchcfm, unpatch_torchcfm
from .sampler import OTPlanSampler, wasserstein

__all__ = ["OTPlanSampler", "wasserstein", "patch_torchcfm", "unpatch_torchcfm"]
