"""Thin modules over the lct_kernels ops."""

from .losses import CauchyLoss, GemanMcClureLoss, PseudoHuberLoss

__all__ = ["CauchyLoss", "PseudoHuberLoss", "GemanMcClureLoss"]
