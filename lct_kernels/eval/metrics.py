"""Sample-quality metrics for the trainer: pure functions of tensors, float64 inside.

    mu, sigma = feature_statistics(feats)                  # feats: (N, D)
    fd = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)     # FID-style, in any feature space
    fd = frechet_distance_features(real_feats, fake_feats)
    pr = precision_recall(real_feats, fake_feats, k=3)     # {"precision", "recall"}
    sw = sliced_wasserstein(real, fake)                     # any (N, ...) samples
    hist = class_histogram(predicted_labels, num_classes)   # counts, coverage, entropy

Features usually come from :func:`lct_kernels.eval.digit_classifier.digit_features`
(the digits) but nothing here depends on where they come from. Inputs may be any
real floating / integer tensors on any device; they are copied to the CPU in
float64, so results do not depend on the input dtype's rounding beyond the input
values themselves. Every function returns Python floats (or a dict of them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_features",
           "precision_recall", "sliced_wasserstein", "class_histogram"]

# Pairwise-distance blocks hold at most this many float64 entries (32 MiB):
# 5000 x 5000 distances are then computed in ~7 row blocks instead of one
# 200 MB matrix, and the per-block top-k / comparison temporaries stay small.
_BLOCK_ELEMENTS = 1 << 22


def _as_float64(x, name: str, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _as_samples(x, name: str, min_n: int = 1) -> Tensor:
    """(N, ...) -> (N, D) float64 on the CPU, N >= min_n, D >= 1."""
    x = _as_float64(x, name, min_dim=1)
    if x.dim() == 1:
        raise ValueError(f"{name} must be (N, D) samples (or (N, ...), flattened), got a 1-D "
                         f"tensor of shape {tuple(x.shape)}; use x[:, None] for 1-D data")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} sample(s), got {x.shape[0]}")
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero features per sample (shape {tuple(x.shape)})")
    return x


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- Frechet distance
def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of ``features`` (N, D), N >= 2.

    Returns (mu (D,), sigma (D, D)), both float64 on the CPU; sigma is the unbiased
    covariance sum_i (x_i - mu)(x_i - mu)^T / (N - 1), exactly symmetric.
    """
    x = _as_float64(features, "features", min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"features needs N >= 2 samples for a covariance, got N={x.shape[0]}")
    if x.shape[1] == 0:
        raise ValueError("features has D = 0 columns")
    mu = x.mean(dim=0)
    centered = x - mu
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _clean_psd_eigenvalues(evals: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to exactly 0.

    eigh finds each eigenvalue only to about D * eps * max|eigenvalue|, so smaller
    ones (including slightly negative ones, whose true value is >= 0) are zeroed.
    Why: singular covariances are common here (dead ReLU features, D > N), and the
    square root magnifies noise of size eps into sqrt(eps) ~ 1e-8: FD(x, x) on a
    rank-deficient covariance would come out ~1e-6 instead of 0.
    """
    tol = evals.abs().max().clamp_min(0.0) * evals.shape[0] * torch.finfo(evals.dtype).eps
    return torch.where(evals > tol, evals, torch.zeros_like(evals))


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh (noise-level
    eigenvalues zeroed by :func:`_clean_psd_eigenvalues`)."""
    evals, evecs = torch.linalg.eigh(0.5 * (s + s.T))
    return (evecs * _clean_psd_eigenvalues(evals).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the squared 2-Wasserstein
    distance between the Gaussians, as in FID).

        FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})

    mu1, mu2: (D,); sigma1, sigma2: (D, D) symmetric PSD covariances. float64 throughout.

    The trace term is the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^{1/2} S2 S1^{1/2} (same eigenvalues as S1 S2), found with ``eigh``:
    unlike a general matrix square root of the non-symmetric S1 S2 it stays real
    and needs no "discard the imaginary part" step, even for singular covariances
    (D > N features). Eigenvalues below the eigensolver's resolution
    (D * eps * the largest), negative ones included, count as exactly 0, so a
    rank-deficient FD(x, x) is 0 to rounding rather than ~sqrt(eps); a result that
    rounding pushed just below 0 is returned as 0 (FD is a squared distance).
    """
    m1 = _as_float64(mu1, "mu1")
    m2 = _as_float64(mu2, "mu2")
    s1 = _as_float64(sigma1, "sigma1")
    s2 = _as_float64(sigma2, "sigma2")
    if m1.dim() != 1:
        raise ValueError(f"mu1 must be 1-D (D,), got shape {tuple(m1.shape)}")
    d = m1.shape[0]
    if d == 0:
        raise ValueError("mu1 is empty (D = 0)")
    if tuple(m2.shape) != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {tuple(m2.shape)}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if tuple(s.shape) != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(s.shape)}")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    evals = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_sqrt = _clean_psd_eigenvalues(evals).sqrt().sum()
    fd = (m1 - m2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * trace_sqrt
    return max(float(fd), 0.0)


def frechet_distance_features(real: Tensor, fake: Tensor) -> float:
    """:func:`frechet_distance` between the Gaussian fits (:func:`feature_statistics`)
    of ``real`` (N, D) and ``fake`` (M, D) features, N, M >= 2."""
    mu_r, s_r = feature_statistics(real)
    mu_f, s_f = feature_statistics(fake)
    if mu_r.shape != mu_f.shape:
        raise ValueError(f"real and fake features must have the same D, got {mu_r.shape[0]} "
                         f"and {mu_f.shape[0]}")
    return frechet_distance(mu_r, s_r, mu_f, s_f)


# ----------------------------------------------------------------------------- precision / recall
def _block_rows(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, n_cols))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """(N,) distance from each row of x (N, D) to its k-th nearest OTHER row."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=torch.float64)
    step = _block_rows(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion): exact zeros
        # for duplicates, so a duplicated point really is inside its twin's ball.
        d = torch.cdist(x[start:stop], x, compute_mode="donot_use_mm_for_euclid_dist")
        rows = torch.arange(stop - start)
        d[rows, rows + start] = math.inf  # a point is not its own neighbour
        radii[start:stop] = d.topk(k, dim=1, largest=False).values[:, -1]
    return radii


def _fraction_inside(points: Tensor, centers: Tensor, radii: Tensor) -> float:
    """Fraction of ``points`` within distance radii[j] (inclusive) of some centers[j]."""
    inside = torch.empty(points.shape[0], dtype=torch.bool)
    step = _block_rows(centers.shape[0])
    for start in range(0, points.shape[0], step):
        stop = min(start + step, points.shape[0])
        d = torch.cdist(points[start:stop], centers, compute_mode="donot_use_mm_for_euclid_dist")
        inside[start:stop] = (d <= radii).any(dim=1)
    return float(inside.double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al., 2019) from k-NN manifold estimates.

    real: (N, D) and fake: (M, D) features (any (N, ...) is flattened to (N, D)).
    Each real point r gets a ball of radius ||r - r_k||, r_k its k-th nearest OTHER
    real point; the union of the balls estimates the real manifold.

        precision = fraction of fake points within (<=) some real ball
        recall    = fraction of real points within some fake ball (radii from fake k-NN)

    Distances are exact Euclidean (direct differences, float64), computed in row
    blocks of at most 2^22 entries (32 MiB), so even N = M = 5000 never holds a full
    distance matrix. k must be an int with 1 <= k < N and k < M.

    Returns {"precision": float, "recall": float}, each in [0, 1].
    """
    r = _as_samples(real, "real")
    f = _as_samples(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must have the same number of features, got "
                         f"{r.shape[1]} and {f.shape[1]}")
    _check_int(k, "k", 1)
    for name, x in (("real", r), ("fake", f)):
        if k >= x.shape[0]:
            raise ValueError(f"k must be smaller than the number of {name} samples "
                             f"({x.shape[0]}), got k={k}")
    precision = _fraction_inside(f, r, _knn_radii(r, k))
    recall = _fraction_inside(r, f, _knn_radii(f, k))
    return {"precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- sliced Wasserstein
def _quantiles(sorted_cols: Tensor, levels: int) -> Tensor:
    """Empirical quantiles of each column of ``sorted_cols`` (n, P) at the ``levels``
    mid-point levels (i + 0.5) / levels, i = 0 .. levels-1, by linear interpolation.

    Sample j (0-based) of n sits at level (j + 0.5) / n, so when levels == n the
    quantiles are exactly the sorted samples; outside [0.5/n, 1 - 0.5/n] the end
    samples are used (no extrapolation).
    """
    n = sorted_cols.shape[0]
    if levels == n:
        return sorted_cols
    q = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    pos = (q * n - 0.5).clamp(0.0, n - 1.0)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n - 1)
    w = (pos - lo.double())[:, None]
    return sorted_cols[lo] * (1.0 - w) + sorted_cols[hi] * w


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between the samples ``x`` (N, ...) and ``y`` (M, ...).

    Both are flattened to (N, D) / (M, D) (same D). ``n_projections`` unit directions
    theta_p are drawn as normalised Gaussians from a ``torch.Generator`` seeded with
    ``seed`` (the global RNG is untouched; same seed, same directions). For each
    direction, the 1-D W2 between the projections <x_i, theta_p> and <y_j, theta_p>
    is the L2 distance between their quantile functions, compared at the
    L = max(N, M) levels (i + 0.5) / L (linear interpolation between sorted samples
    when N != M; exactly the sorted difference when N == M).

    Returns sqrt(mean_p W2_p^2), float64 arithmetic. For y = x + s this is
    sqrt(mean_p <s, theta_p>^2), about ||s|| / sqrt(D) for many projections.
    """
    a = _as_samples(x, "x")
    b = _as_samples(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same number of features per sample, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    _check_int(n_projections, "n_projections", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_projections, a.shape[1], generator=gen, dtype=torch.float64)
    # A zero-norm Gaussian draw has probability 0 but is guarded anyway.
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-300)
    levels = max(a.shape[0], b.shape[0])
    pa = _quantiles((a @ dirs.T).sort(dim=0).values, levels)
    pb = _quantiles((b @ dirs.T).sort(dim=0).values, levels)
    w2_sq = (pa - pb).square().mean(dim=0)  # (P,) squared W2 per direction
    return math.sqrt(float(w2_sq.mean()))


# ----------------------------------------------------------------------------- class histogram
def class_histogram(labels: Tensor, num_classes: int) -> dict:
    """Summary of a label distribution, e.g. the predicted classes of generated samples.

    labels: (N,) integer class indices in [0, num_classes), N >= 1 (float tensors
    holding whole numbers are accepted). Returns

        counts          list[int], length num_classes
        coverage        fraction of classes with at least one sample
        coverage_quarter  fraction of classes with count >= 0.25 * N / num_classes, i.e.
                        at least a quarter of their share under a uniform distribution
                        (a class the sampler almost never produces does not count)
        entropy         H(p) / log(num_classes) with p = counts / N: 1 for a uniform
                        histogram, 0 when every sample is one class (defined as 1.0
                        when num_classes == 1)
    """
    _check_int(num_classes, "num_classes", 1)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if labels.shape[0] == 0:
        raise ValueError("labels is empty: need at least one label")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.detach().cpu()
    if labels.is_floating_point():
        if not (torch.isfinite(labels).all() and torch.equal(labels, labels.round())):
            raise ValueError("labels must be whole numbers (class indices)")
    labels = labels.to(torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    n = labels.shape[0]
    p = counts / n
    if num_classes == 1:
        entropy = 1.0
    else:
        nz = p[p > 0]
        entropy = float(-(nz * nz.log()).sum() / math.log(num_classes))
        entropy = min(max(entropy, 0.0), 1.0)  # rounding can step just outside [0, 1]
    return {"counts": [int(c) for c in counts.tolist()],
            "coverage": float((counts > 0).double().mean()),
            "coverage_quarter": float((counts >= 0.25 * n / num_classes).double().mean()),
            "entropy": entropy}
