"""nn.Module wrappers over the fused robust losses."""

import torch

from .. import _validate as V
from ..ops import robust_loss as ops

_CPU = torch.device("cpu")


class _RobustLoss(torch.nn.Module):
    _fn = None  # set by subclasses

    def __init__(self, c, reduction="mean", elementwise=False, backend=None):
        super().__init__()
        name = type(self).__name__
        V.choice(name, "reduction", reduction, V.REDUCTIONS)
        self.reduction = reduction
        self.elementwise = elementwise
        self.backend = backend
        self.c = c

    @property
    def c(self):
        """The robustness scale; assign a new number or 0-d tensor at any step."""
        return self._c

    @c.setter
    def c(self, value):
        device = value.device if isinstance(value, torch.Tensor) else _CPU
        V.positive_scalar(type(self).__name__, "c", value, device)
        self._c = value

    def forward(self, pred, target, weight=None):
        return type(self)._fn(
            pred, target, self._c, weight=weight, reduction=self.reduction,
            elementwise=self.elementwise, backend=self.backend,
        )

    def extra_repr(self):
        c = float(self._c) if not isinstance(self._c, torch.Tensor) or self._c.device.type == "cpu" else self._c
        return f"c={c}, reduction={self.reduction!r}, elementwise={self.elementwise}"


class CauchyLoss(_RobustLoss):
    """ln(1 + m / (2 c^2)) per sample, m = mean((pred - target)^2); see lct_kernels.cauchy_loss."""

    _fn = staticmethod(ops.cauchy_loss)


class PseudoHuberLoss(_RobustLoss):
    """sqrt(m + c^2) - c per sample; see lct_kernels.pseudo_huber_loss."""

    _fn = staticmethod(ops.pseudo_huber_loss)


class GemanMcClureLoss(_RobustLoss):
    """2 m / (m + 4 c^2) per sample; see lct_kernels.geman_mcclure_loss."""

    _fn = staticmethod(ops.geman_mcclure_loss)
