"""Consistency sampling (1 and 2 steps) and a sigma_mid search, as small pure functions.

1 step:  x = f(sigma_max z, sigma_max).
2 steps (the CM multistep sampler): x0 = f(sigma_max z, sigma_max);
         x = f(x0 + sqrt(sigma_mid^2 - sigma_min^2) z', sigma_mid).
"""

import math

import torch

from .objective import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, denoise, karras_sigmas


def default_sigma_mid(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
    """The paper code's default 2-step setting: index 22 of a 40-point Karras grid (about 1.38)."""
    return float(karras_sigmas(40, sigma_min, sigma_max, rho)[22])


@torch.no_grad()
def sample(net, shape, steps=1, labels=None, sigma_mid=None, generator=None, device="cpu",
           sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA, rho=7.0):
    """Draws samples in the (standardised) latent space.

    shape: (n, C, H, W); steps: 1 or 2; labels: (n,) int64 or None;
    sigma_mid: the 2-step re-noising level (None: ``default_sigma_mid``).
    Returns (n, C, H, W) float32 on ``device``."""
    if steps not in (1, 2):
        raise ValueError(f"sample: steps must be 1 or 2, got {steps}")
    if sigma_mid is None:
        sigma_mid = default_sigma_mid(sigma_min, sigma_max, rho)
    if steps == 2 and not sigma_min < sigma_mid < sigma_max:
        raise ValueError(f"sample: sigma_mid must be in ({sigma_min}, {sigma_max}), got {sigma_mid}")
    n = shape[0]
    z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    full = torch.full((n,), sigma_max, device=device, dtype=torch.float32)
    x = denoise(net, sigma_max * z, full, labels, sigma_min, sigma_data)
    if steps == 2:
        z2 = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        mid = torch.full((n,), sigma_mid, device=device, dtype=torch.float32)
        x = denoise(net, x + math.sqrt(sigma_mid**2 - sigma_min**2) * z2, mid, labels,
                    sigma_min, sigma_data)
    return x.float()


def search_sigma_mid(metric, lo=0.05, hi=10.0, iterations=12):
    """Ternary search of sigma_mid in [lo, hi] (in log space) minimising ``metric(sigma_mid)``.

    ``metric`` should be a deterministic function (fix the sampler's seed inside it)
    that is unimodal enough in log sigma.  Returns (best_sigma_mid, best_value,
    [(sigma_mid, value), ...] of every evaluation)."""
    if not 0 < lo < hi:
        raise ValueError(f"search_sigma_mid: need 0 < lo < hi, got lo={lo}, hi={hi}")
    a, b = math.log(lo), math.log(hi)
    history = []

    def evaluate(u):
        value = float(metric(math.exp(u)))
        history.append((math.exp(u), value))
        return value

    for _ in range(iterations):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        if evaluate(m1) <= evaluate(m2):
            b = m2
        else:
            a = m1
    best_sigma, best_value = min(history, key=lambda item: item[1])
    return best_sigma, best_value, history
