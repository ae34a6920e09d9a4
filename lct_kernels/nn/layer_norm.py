"""LayerNorm modules on the fused kernels, and in-place patching of existing models.

* ``FusedLayerNorm``: an ``nn.LayerNorm`` (same parameters, state_dict and
  constructor) computed by ``lct_kernels.ops.layer_norm.layer_norm``; exact for
  any weight, so it can replace any ``nn.LayerNorm``.
* ``NonScalingLayerNorm``: sLCT's NsLN.  ``weight`` exists, is all ones and has
  ``requires_grad=False`` (so state_dicts match the paper code's module);
  ``bias`` is learnable.  If the weight is ever changed, it is honoured: the
  kernels take the weight, so the module never silently drops it.
* ``NsLNModulate``: DiT's ``modulate(norm(x), shift, scale)`` in one kernel.
"""

import torch
from torch import nn

from ..ops import layer_norm as ops


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` on lct_kernels' fused kernels (fp32 statistics)."""

    backend = None  # None: automatic; or "cuda", "triton", "cpu", "torch"

    def forward(self, x):
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                              backend=self.backend)


class NonScalingLayerNorm(FusedLayerNorm):
    """Non-scaling LayerNorm: y = (x - mean) / sqrt(var + eps) + bias (scale fixed at 1).

    Usable wherever ``nn.LayerNorm`` is, e.g. as timm's ``norm_layer`` for qk-norm
    over head_dim.  ``elementwise_affine=False`` drops both weight and bias;
    ``bias=False`` keeps the frozen unit weight but no bias.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype)
        if self.weight is not None:
            self.weight.requires_grad_(False)

    def forward(self, x):
        if self.weight is not None and (self.weight.requires_grad or not _is_unit(self.weight)):
            return super().forward(x)  # a changed or unfrozen weight is honoured
        return ops.non_scaling_layer_norm(x, self.normalized_shape, self.bias, self.eps,
                                          backend=self.backend)


def _is_unit(weight):
    """Whether weight is all ones; checked once per in-place change (tensor version).

    Under torch.compile the answer is always False, so the general kernel path,
    which multiplies by the weight and is exact for any weight, is traced."""
    if torch.compiler.is_compiling():
        return False
    key = (weight.data_ptr(), weight._version)
    cached = getattr(weight, "_lct_unit_check", None)
    if cached is None or cached[0] != key:
        cached = (key, bool(torch.all(weight == 1)))
        weight._lct_unit_check = cached
    return cached[1]


class NsLNModulate(nn.Module):
    """y = NsLN(x) * (1 + scale[:, None]) + shift[:, None] in one fused kernel.

    Args:
        normalized_shape: D, the last dimension of x.
        eps: 1e-6 as in DiT.
        bias: add a learnable NsLN bias (DiT's block norms have none).
    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D)
    """

    def __init__(self, normalized_shape, eps=1e-6, bias=False, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = int(normalized_shape)
        self.eps = eps
        self.bias = (nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
                     if bias else None)
        self.backend = None

    def forward(self, x, shift, scale):
        return ops.nsln_modulate(x, shift, scale, self.bias, self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


def patch_layernorms(model, non_scaling=False):
    """Switch every ``nn.LayerNorm`` in ``model`` (subclasses included) to the fused modules.

    In place: the modules keep their identity, parameters, buffers, hooks and
    training mode (only their class changes), so optimizers stay valid.
    Outputs are unchanged (``FusedLayerNorm`` honours any weight).  With
    ``non_scaling=True`` they become ``NonScalingLayerNorm``: the weight is set to
    ones and frozen, which changes the outputs of modules whose weight was not
    ones.  Returns the number of modules switched.  ``unpatch_layernorms`` undoes it.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        target = NonScalingLayerNorm if non_scaling else FusedLayerNorm
        if isinstance(module, target):  # already fused (NsLN counts as fused)
            continue
        if not hasattr(module, "_lct_original_class"):
            module._lct_original_class = type(module)
        module.__class__ = target
        if non_scaling and module.weight is not None:
            with torch.no_grad():
                module.weight.fill_(1.0)
            module.weight.requires_grad_(False)
        count += 1
    return count


def unpatch_layernorms(model):
    """Restore the classes ``patch_layernorms`` replaced; returns the number restored.

    Parameters keep their current values (a weight reset by ``non_scaling=True``
    stays ones and frozen)."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop("_lct_original_class", None)
        if original is not None:
            module.__class__ = original
            count += 1
    return count
