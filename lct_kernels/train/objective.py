"""The iCT objective and sLCT's additions, as small pure functions.

Every function here is one formula from iCT (Song & Dhariwal, 2023) or sLCT
(Dao et al., 2025), in the form the authors' code uses; the loop composes them
and owns no math.  Conventions (as the paper code):

* the Karras grid is indexed in DESCENDING sigma: index 0 is sigma_max,
  index N-1 is sigma_min;
* a training sample draws an interval index i in {0, ..., N-2}; the student sees
  sigma_i, the teacher the smaller sigma_{i+1}, both with the same noise;
* s = N - 1 is the number of discretisation intervals.
"""

import math

import torch

import lct_kernels as lk

# Constants of the paper code (see the trainer's config for where each is set).
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5
P_MEAN = -1.1
P_STD = 2.0


def karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, dtype=torch.float64):
    """The N-point Karras grid, descending: (N,) with [0] = sigma_max, [N-1] = sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    if n < 2:
        raise ValueError(f"karras_sigmas: n must be >= 2, got {n}")
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype)


def index_probabilities(sigmas, p_mean=P_MEAN, p_std=P_STD):
    """iCT's lognormal categorical over the N-1 intervals: (N-1,) float64 summing to 1.

    p(i) ∝ erf((ln sigma_i - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std))."""
    z = (torch.log(sigmas.double()) - p_mean) / (math.sqrt(2.0) * p_std)
    mass = torch.erf(z[:-1]) - torch.erf(z[1:])
    return mass / mass.sum()


def sample_indices(probabilities, batch_size, generator=None, device=None):
    """Draws (batch_size,) int64 interval indices i ~ probabilities (with replacement)."""
    idx = torch.multinomial(probabilities.float(), batch_size, replacement=True, generator=generator)
    return idx if device is None else idx.to(device)


def stage_length(total_steps, s0=10, s1=640):
    """The curriculum's stage length K' = floor(K / (log2(floor(s1 / s0)) + 1)), at least 1.

    As the authors' code (quandao10/LCT models/script_util.py, ``improve_scale_fn``:
    ``np.floor(total_steps / (np.log2(np.floor(end_scales / start_scales)) + 1))``, which is
    iCT's formula): log2 is NOT rounded, so when s1/s0 is not a power of 2 the last
    stage (s = s1) is shorter than the others.  K = 294 000, s0 = 10, s1 = 640: 42 000."""
    if total_steps < 1:
        raise ValueError(f"stage_length: total_steps must be >= 1, got {total_steps}")
    if not 1 <= s0 <= s1:
        raise ValueError(f"stage_length: need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    return max(int(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))), 1)


def curriculum_intervals(step, total_steps, s0=10, s1=640):
    """iCT's doubling curriculum: s(k) = min(s0 * 2^floor(k / K'), s1), the number of intervals
    at step k (so N(k) = s(k) + 1 grid points), with K' = ``stage_length(K, s0, s1)``.

    With the paper code's s0 = 10, s1 = 640 there are 7 equal stages (10, 20, ..., 640)."""
    if total_steps < 1:
        raise ValueError(f"curriculum_intervals: total_steps must be >= 1, got {total_steps}")
    return min(s0 * 2 ** (step // stage_length(total_steps, s0, s1)), s1)


def consistency_weight(sigmas, indices):
    """iCT weighting lambda_i = 1 / (sigma_i - sigma_{i+1}), (B,) in sigmas' dtype."""
    return 1.0 / (sigmas[indices] - sigmas[indices + 1])


C_SCHEDULES = ("paper", "anchored", "measured")
# c_schedule=measured: c = kappa * sqrt(median(m)).  With kappa = 1/sqrt(2), 2 c^2 = median(m):
# the Cauchy loss ln(1 + m / (2c^2)) has its knee (the per-sample weight 1/(2c^2 + m) at half
# its small-residual value) at the stage's median residual, so the larger half of the
# residuals, where the impulsive outliers are, is down-weighted and the smaller half is not.
MEASURED_C_KAPPA = 1.0 / math.sqrt(2.0)


def cauchy_c(intervals, s0=10, base_c=None, dim=None, adaptive=True, schedule="paper",
             measured=None):
    """The robust loss's scale c for the current number of intervals s (per-element-mean units).

    Stage 1 (s <= s0), and every stage without ``adaptive``: c1 = the iCT constant
    0.00054 * sqrt(D) (``base_c`` overrides it).  From stage 2 on, with ``adaptive``:

    * ``schedule="paper"``: c(s) = exp(-1.15 ln s - 0.85), the authors' log-log fit to the
      per-stage residual statistics of 4x32x32 CelebA latents (D = 4096);
    * ``"anchored"``: c(s) = c1 (s / s0)^-1.15, the fit's slope through stage 1's c, so
      that it falls from stage to stage for any D (0.0156 at s = 20 for D = 4096);
    * ``"measured"``: ``measured``, the value ``measured_c`` set for this stage."""
    if schedule not in C_SCHEDULES:
        raise ValueError(f"cauchy_c: schedule must be one of {', '.join(C_SCHEDULES)}, got {schedule!r}")
    if base_c is None:
        if dim is None:
            raise ValueError("cauchy_c: give the per-sample dimension `dim` or an explicit `base_c`")
        base_c = 0.00054 * math.sqrt(dim)
    if not adaptive or intervals <= s0:
        return base_c
    if schedule == "paper":
        return math.exp(-1.15 * math.log(intervals) - 0.85)
    if schedule == "anchored":
        return base_c * (intervals / s0) ** -1.15
    if measured is None:
        raise ValueError(f"cauchy_c: schedule='measured' needs the measured c of stage s={intervals} "
                         "(measured=...)")
    return float(measured)


def measured_c(m, kappa=MEASURED_C_KAPPA):
    """c = kappa * sqrt(median(m)) from per-sample residuals m (any shape, >= 1 finite values
    >= 0; m = mean over elements of (f_theta - f_theta^-)^2).  The median interpolates between
    the two middle values of an even count (numpy's).  Returns a Python float."""
    if not isinstance(m, torch.Tensor) or m.numel() == 0:
        raise ValueError("measured_c: m must be a non-empty tensor of per-sample residuals")
    m = m.detach().double().flatten()
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("measured_c: m must hold finite values >= 0")
    return kappa * math.sqrt(float(torch.quantile(m, 0.5)))


def convention_scale(loss, convention, dim):
    """Maps a c and a loss weight to the fused kernels' per-element-mean form.

    The kernels apply rho to m = mean((f - f^-)^2) (the paper code's convention,
    ``"mean"``).  iCT applies it to the sum ||f - f^-||^2 = D m (``"sum"``); because
    rho_c(D m) = rho_{c/sqrt(D)}(m) for Cauchy and Geman-McClure, and
    sqrt(D m + c^2) - c = sqrt(D) (sqrt(m + c'^2) - c') with c' = c / sqrt(D) for
    Pseudo-Huber, the sum convention runs on the same kernel with c / sqrt(D) and,
    for Pseudo-Huber, a weight multiplied by sqrt(D).

    Returns (c_divisor, weight_multiplier)."""
    if convention == "mean":
        return 1.0, 1.0
    if convention == "sum":
        root = math.sqrt(dim)
        return root, (root if loss == "pseudo_huber" else 1.0)
    raise ValueError(f"convention_scale: convention must be 'mean' or 'sum', got {convention!r}")


def diffusion_mask(indices, n_points, fraction=0.75):
    """sLCT's diffusion-loss selection: (B,) bool, True where i >= floor(fraction * N).

    Index space, as the paper code: the smallest-sigma quarter of the grid."""
    return indices >= int(math.floor(fraction * n_points))


def edm_weight(sigma, sigma_data=SIGMA_DATA):
    """EDM loss weight 1/sigma^2 + 1/sigma_data^2 (elementwise)."""
    return 1.0 / sigma**2 + 1.0 / sigma_data**2


def cm_coefficients(sigma, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
    """Consistency-model parameterisation with the sigma_min offset, so that f(x, sigma_min) = x:

        c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)
        c_out  = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)
        c_in   = 1 / sqrt(sigma^2 + sigma_d^2)

    Returns (c_skip, c_out, c_in), each shaped like sigma."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def time_input(sigma):
    """The network's time input 250 ln(sigma) (the CM codebase's 1000 * 0.25 ln sigma)."""
    return 250.0 * torch.log(sigma + 1e-44)


def denoise(net, x, sigma, labels=None, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
    """f_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, 250 ln sigma, y).

    x: (B, ...) float; sigma: (B,) float (any float dtype); labels: (B,) or None.
    Returns x's dtype.  The coefficients and the c_skip / c_out combination are computed
    in fp32 (or x's dtype if wider), outside autocast: the loss sees f - f^-, which at the
    last stages is far smaller than bf16's resolution of f."""
    sigma = sigma.to(torch.float32)
    c_skip, c_out, c_in = cm_coefficients(sigma, sigma_min, sigma_data)
    shape = (-1,) + (1,) * (x.dim() - 1)
    out = net((c_in.view(shape) * x).to(x.dtype), time_input(sigma), labels)
    wide = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        f = c_skip.view(shape).to(wide) * x.to(wide) + c_out.view(shape).to(wide) * out.to(wide)
    return f.to(x.dtype)


def ot_pair(data, noise, labels=None, backend=None, *, host_labels=None, return_status=False):
    """Exact minibatch OT coupling (squared Euclidean, uniform weights), through ``lk.ot_couple``.

    Returns (data, noise[perm], labels): the noise is re-ordered so that
    (data[i], noise[i]) are optimal pairs; labels follow the data.

    With labels (a class-conditional model) the coupling is exact within each class
    (``groups=labels``).  A coupling across classes would give each class's data
    the noise that happens to lie near it, so the noise a class sees in training
    would no longer be N(0, I), while sampling draws N(0, I) for every class (on
    the digits this made FD 2-3x worse).

    ``host_labels``: the same labels on the CPU, if the caller has them (the padded
    per-class batch is then sized without reading the device).  ``return_status``:
    also return the solver's device-side status instead of checking it here (see
    ``lk.ot_couple``)."""
    groups = labels if host_labels is None or labels is None else host_labels
    out = lk.ot_couple(data, noise, groups=groups, backend=backend, return_status=return_status)
    perm, status = out if return_status else (out, None)
    paired = data, noise[perm], labels
    return paired + (status,) if return_status else paired


def consistency_losses(net, data, noise, labels, indices, sigmas, *, loss, c, diffusion,
                       diff_coef=5.0, diff_fraction=0.75, weight_multiplier=1.0,
                       sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA, dropout_seed=None,
                       backend=None, teacher_net=None, return_residual=False):
    """One iCT/sLCT loss evaluation (the caller does OT pairing and index sampling).

    data, noise: (B, C, H, W); labels: (B,) or None; indices: (B,) int64 in [0, N-2];
    sigmas: (N,) the current Karras grid.  The teacher is the stop-gradient student at
    sigma_{i+1} with the same noise (iCT).  With dropout, teacher and student share
    the dropout RNG (``dropout_seed``).  ``teacher_net`` (default ``net``) evaluates the
    teacher: the unwrapped module when ``net`` is a DistributedDataParallel wrapper.

    Returns (total, cm_loss_per_sample, diff_loss, diff_mask) from ``lk.consistency_objective``;
    with ``return_residual`` a fifth entry, the per-sample residual
    m = mean over elements of (f_theta - f_theta^-)^2, (B,) fp32, detached (for c_schedule=measured)."""
    sig = sigmas.to(data.device)
    t, t2 = sig[indices], sig[indices + 1]
    shape = (-1,) + (1,) * (data.dim() - 1)
    x_t = data + t.view(shape).to(data.dtype) * noise
    x_t2 = data + t2.view(shape).to(data.dtype) * noise

    def run(model, x, s):
        if dropout_seed is None:
            return denoise(model, x, s, labels, sigma_min, sigma_data)
        with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
            torch.manual_seed(dropout_seed)
            return denoise(model, x, s, labels, sigma_min, sigma_data)

    with torch.no_grad():
        teacher = run(teacher_net if teacher_net is not None else net, x_t2, t2)
    student = run(net, x_t, t)
    weight = consistency_weight(sig, indices).float() * weight_multiplier
    if diffusion:
        mask = diffusion_mask(indices, sig.numel(), diff_fraction)
        diff_weight = edm_weight(t, sigma_data).float()
    else:
        mask, diff_weight = None, None
    total, cm, diff = lk.consistency_objective(
        student, teacher, data, weight, diff_weight, mask, c, loss=loss, diff_coef=diff_coef,
        backend=backend,
    )
    if return_residual:
        residual = (student.detach().float() - teacher.float()).square().flatten(1).mean(1)
        return total, cm, diff, mask, residual
    return total, cm, diff, mask
