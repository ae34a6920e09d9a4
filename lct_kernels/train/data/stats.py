"""LatentStats: the per-element standardisation applied to latents before training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LatentStats"]


@dataclass(eq=False)  # a generated __eq__ would compare tensors ambiguously
class LatentStats:
    """Per-element standardisation of latents to a target std (0.5 in the paper).

    mean, std: float32 tensors shaped like one latent (C, H, W) (any per-sample
    shape works). ``standardize`` maps data to per-element mean 0, std target_std.
    """

    mean: Tensor
    std: Tensor
    target_std: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.mean, Tensor) and isinstance(self.std, Tensor)
                and self.mean.shape == self.std.shape):
            raise ValueError("LatentStats mean and std must be tensors of the same shape")
        self.mean = self.mean.detach().to(torch.float32)
        self.std = self.std.detach().to(torch.float32)
        self.target_std = float(self.target_std)
        if not ((self.std > 0).all() and self.target_std > 0):
            raise ValueError("LatentStats std and target_std must be > 0")

    @classmethod
    def compute(cls, latents: Tensor, target_std: float = 0.5, eps: float = 1e-6) -> "LatentStats":
        """Stats over dim 0 of ``latents`` (N, C, H, W), N >= 1: mean and population std
        (correction 0, so the standardised set has std exactly ``target_std``),
        std clamped to >= ``eps`` so constant elements do not divide by zero.
        Accumulated in float64."""
        if not isinstance(latents, Tensor) or latents.dim() < 2 or latents.shape[0] == 0:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got {shape}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        z = latents.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf; cannot compute stats")
        std, mean = torch.std_mean(z, dim=0, correction=0)
        return cls(mean=mean, std=std.clamp_min(eps), target_std=target_std)

    def _stats_like(self, z: Tensor) -> tuple[Tensor, Tensor]:
        k = self.mean.dim()
        if not (isinstance(z, Tensor) and z.is_floating_point() and z.dim() >= k
                and tuple(z.shape[z.dim() - k:]) == tuple(self.mean.shape)):
            got = (z.dtype, tuple(z.shape)) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError("LatentStats expects floating-point latents shaped "
                             f"(..., {', '.join(map(str, self.mean.shape))}), got {got}")
        return (self.mean.to(device=z.device, dtype=z.dtype),
                self.std.to(device=z.device, dtype=z.dtype))

    def standardize(self, z: Tensor) -> Tensor:
        """(z - mean) / std * target_std for z (..., C, H, W), in z's dtype and device."""
        mean, std = self._stats_like(z)
        return (z - mean) / std * self.target_std

    def destandardize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`standardize`: x * std / target_std + mean."""
        mean, std = self._stats_like(x)
        return x * std / self.target_std + mean

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone(), "target_std": self.target_std}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LatentStats":
        if not isinstance(d, dict):
            raise TypeError(f"LatentStats state dict must be a dict, got {type(d).__name__}")
        missing = sorted({"mean", "std", "target_std"} - set(d))
        if missing:
            raise ValueError(f"LatentStats state dict is missing {missing}")
        return cls(mean=d["mean"], std=d["std"], target_std=d["target_std"])
