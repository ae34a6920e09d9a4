"""Outlier statistics of training latents (``lct-inspect`` and the start of ``lct-train``).

sLCT's case for the Cauchy loss is that latents (and the consistency residuals on
them) hold impulsive outliers far beyond a Gaussian's tails (the paper's Fig. 1).
These numbers show whether a user's latents do:

* per-channel excess kurtosis of z, E[(v - mean)^4] / var^2 - 3 over every value v of
  the channel: 0 for a Gaussian, 3 for a Laplace, large for impulsive data;
* the fraction of elements with |z| > 4 (a Gaussian has erfc(4 / sqrt 2) = 6.3e-5);
* the largest |z|,

where z is the latents standardised per element over the data set (mean 0, population
std 1 per (c, h, w), as ``LatentStats`` does, up to its target std).
"""

import math

import torch

GAUSSIAN_FRAC_4SIGMA = math.erfc(4.0 / math.sqrt(2.0))


def outlier_stats(latents, threshold=4.0):
    """Outlier statistics of ``latents`` (N, C, ...) float, N >= 2.

    Returns a dict: n, shape (per sample), kurtosis_per_channel (C floats),
    frac_beyond_4sigma (the fraction of |z| > threshold), max_abs_z, max_abs_z_channel,
    threshold, gaussian_frac_beyond_4sigma (a Gaussian's fraction beyond ``threshold``).
    Computed in float64; elements with zero spread over the data set count as z = 0."""
    fn = "outlier_stats"
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or latents.shape[0] < 2:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{fn}: latents must be an (N, C, ...) tensor with N >= 2, got {shape}")
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise ValueError(f"{fn}: latents must be finite floating-point values")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"{fn}: threshold must be a number > 0, got {threshold!r}")
    x = latents.detach().to("cpu", torch.float64)
    std, mean = torch.std_mean(x, dim=0, correction=0)
    z = torch.where(std > 0, (x - mean) / std.clamp_min(1e-300), torch.zeros_like(x))
    C = x.shape[1]
    per_channel = z.transpose(0, 1).reshape(C, -1)
    centred = per_channel - per_channel.mean(1, keepdim=True)
    var = (centred ** 2).mean(1)
    kurt = torch.where(var > 0, (centred ** 4).mean(1) / var.clamp_min(1e-300) ** 2 - 3.0,
                       torch.zeros_like(var))
    absz = z.abs()
    flat = int(absz.argmax())
    channel = (flat // int(torch.tensor(x.shape[2:]).prod())) % C if x.dim() > 2 else flat % C
    return {
        "n": int(x.shape[0]), "shape": list(x.shape[1:]),
        "kurtosis_per_channel": [float(k) for k in kurt],
        "frac_beyond_4sigma": float((absz > threshold).double().mean()),
        "max_abs_z": float(absz.max()), "max_abs_z_channel": int(channel),
        "threshold": float(threshold),
        "gaussian_frac_beyond_4sigma": math.erfc(threshold / math.sqrt(2.0)),
    }


def format_outlier_report(stats, name="latents"):
    """A few lines of text for ``outlier_stats``'s dict."""
    t = stats["threshold"]
    kurt = ", ".join(f"{k:.2f}" for k in stats["kurtosis_per_channel"])
    ratio = stats["frac_beyond_4sigma"] / stats["gaussian_frac_beyond_4sigma"]
    label = f"{t:g} sigma" if t != 4 else "4 sigma"
    return "\n".join([
        f"{name}: {stats['n']} samples of shape {tuple(stats['shape'])} (z = per-element standardised)",
        f"  excess kurtosis per channel (Gaussian 0, Laplace 3): {kurt}",
        f"  fraction of elements beyond {label}: {stats['frac_beyond_4sigma']:.3g} "
        f"({ratio:.1f}x a Gaussian's {stats['gaussian_frac_beyond_4sigma']:.3g})",
        f"  max |z|: {stats['max_abs_z']:.2f} (channel {stats['max_abs_z_channel']})",
    ])
