"""``OTPlanSampler`` and ``wasserstein`` with torchcfm's API (torchcfm.optimal_transport).

Swap ``from torchcfm.optimal_transport import OTPlanSampler`` for
``from lct_kernels.ot import OTPlanSampler``.  Same constructor, same methods,
same return types.  Differences, all in the "exact" method with equal batch
sizes (the minibatch case):

* the plan comes from lct_kernels' exact assignment solvers, on the inputs'
  device, instead of POT's network simplex on the host; it is the same plan
  whenever the optimum is unique (uniform weights make it a permutation / N);
* ``sample_plan(..., replace=False)`` (and ``sample_plan_with_labels``) skip the
  N^2 host draw: the permutation is applied on the device, in random order
  (the pairs torchcfm's draw returns, in a torch-random instead of a
  numpy-random order).  With ``replace=True`` the draw is torchcfm's, from the
  numpy generator, so seeded runs reproduce torchcfm's samples.

Unequal batch sizes in "exact", and the "sinkhorn", "unbalanced" and "partial"
methods, delegate to POT exactly as torchcfm does.
"""

import math
import warnings

import numpy as np
import torch

from ..ops.ot import ot_assign

METHODS = ("exact", "sinkhorn", "unbalanced", "partial")


def _pot():
    try:
        import ot as pot
    except ImportError as exc:  # pragma: no cover - POT is a test dependency
        raise ImportError(
            "lct_kernels.ot: this method delegates to POT; install it with `pip install pot`"
        ) from exc
    return pot


def _flat(x):
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


class OTPlanSampler:
    """Samples pairs from the OT plan (squared Euclidean cost) between two minibatches.

    Args:
        method: "exact", "sinkhorn", "unbalanced" or "partial".
        reg: entropic regularisation of the Sinkhorn-based methods.
        reg_m: marginal relaxation of the unbalanced method.
        normalize_cost: divide the cost by its maximum (as torchcfm).
        num_threads: accepted for compatibility (POT ignores it since 0.9.6).
        warn: warn when a POT plan is numerically degenerate.
        backend: lct_kernels backend for the exact solver (None: automatic).
    """

    def __init__(self, method, reg=0.05, reg_m=1.0, normalize_cost=False, num_threads=1,
                 warn=True, backend=None):
        if method not in METHODS:
            raise ValueError(f"Unknown method: {method}")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.backend = backend

    # -- plan -------------------------------------------------------------
    def _cost(self, x0, x1):
        M = torch.cdist(_flat(x0), _flat(x1)) ** 2
        if self.normalize_cost:
            M = M / M.max()
        return M

    def _exact_permutation(self, M):
        """The optimal permutation of a square cost matrix, solved on M's device."""
        return ot_assign(M.detach().to(torch.float64), backend=self.backend)

    def get_map(self, x0, x1):
        """The OT plan between x0 and x1 as a numpy (N, M) array (float64)."""
        M = self._cost(x0, x1)
        n, m = M.shape
        if self.method == "exact" and n == m:
            perm = self._exact_permutation(M).cpu().numpy()
            a = np.ones(n) / n  # POT's uniform weights: plan entries are exactly these
            p = np.zeros((n, m))
            p[np.arange(n), perm] = a
            return p
        pot = _pot()
        a, b = pot.unif(n), pot.unif(m)
        Mn = M.detach().cpu().numpy()
        if self.method == "exact":
            p = pot.emd(a, b, Mn)
        elif self.method == "sinkhorn":
            p = pot.sinkhorn(a, b, Mn, reg=self.reg)
        elif self.method == "unbalanced":
            p = pot.unbalanced.sinkhorn_knopp_unbalanced(a, b, Mn, reg=self.reg, reg_m=self.reg_m)
        else:
            p = pot.partial.entropic_partial_wasserstein(a, b, Mn, reg=self.reg)
        if not np.all(np.isfinite(p)):
            warnings.warn(f"OT plan is not finite (cost mean {float(M.mean())}, max {float(M.max())})")
        if np.abs(p.sum()) < 1e-8:
            if self.warn:
                warnings.warn("Numerical errors in OT plan, reverting to uniform plan.")
            p = np.ones_like(p) / p.size
        return p

    # -- sampling ---------------------------------------------------------
    def sample_map(self, pi, batch_size, replace=True):
        """Draw batch_size (i, j) index pairs from the plan pi (numpy), as torchcfm."""
        p = pi.flatten()
        p = p / p.sum()
        draws = np.random.choice(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
        return np.divmod(draws, pi.shape[1])

    def _indices(self, x0, x1, replace):
        """Index tensors (i, j) of the sampled pairs, on x0's device when possible."""
        if self.method == "exact" and not replace and x0.shape[0] == x1.shape[0]:
            perm = self._exact_permutation(self._cost(x0, x1))
            order = torch.randperm(x0.shape[0], device=perm.device)
            return order.to(x0.device), perm[order].to(x1.device)
        pi = self.get_map(x0, x1)
        i, j = self.sample_map(pi, x0.shape[0], replace=replace)
        return i, j

    def sample_plan(self, x0, x1, replace=True):
        """(x0[i], x1[j]) for pairs (i, j) drawn from the OT plan."""
        i, j = self._indices(x0, x1, replace)
        return x0[i], x1[j]

    def sample_plan_with_labels(self, x0, x1, y0=None, y1=None, replace=True):
        """(x0[i], x1[j], y0[i], y1[j]) for pairs drawn from the OT plan (labels may be None)."""
        i, j = self._indices(x0, x1, replace)
        return (x0[i], x1[j], y0[i] if y0 is not None else None, y1[j] if y1 is not None else None)

    def sample_trajectory(self, X):
        """OT trajectories through the populations X[:, t] (numpy array (bs, times, *dim))."""
        times = X.shape[1]
        plans = [self.get_map(X[:, t], X[:, t + 1]) for t in range(times - 1)]
        index = [np.arange(X.shape[0])]
        for pi in plans:
            index.append(np.array([np.random.choice(pi.shape[1], p=pi[i] / pi[i].sum())
                                   for i in index[-1]]))
        return np.stack([X[:, t][index[t]] for t in range(times)], axis=1)


def wasserstein(x0, x1, method=None, reg=0.05, power=2, **kwargs):
    """Wasserstein-1 or -2 distance (Euclidean ground cost) between two minibatches.

    "exact" (or None) with equal batch sizes uses lct_kernels' exact solver and sums
    the matched costs exactly as POT's emd2 does; otherwise POT (as torchcfm)."""
    if power not in (1, 2):
        raise ValueError(f"wasserstein: power must be 1 or 2, got {power}")
    if method not in ("exact", None, "sinkhorn"):
        raise ValueError(f"Unknown method: {method}")
    M = torch.cdist(_flat(x0), _flat(x1))
    if power == 2:
        M = M**2
    n, m = M.shape
    if method in ("exact", None) and n == m:
        M64 = M.detach().to(torch.float64)
        perm = ot_assign(M64, backend=kwargs.get("backend")).cpu().numpy()
        Mn = M64.cpu().numpy()
        a = np.ones(n) / n
        ret = 0.0
        for i in range(n):  # POT's emd2 accumulates flow * cost in row order
            ret += float(a[i]) * float(Mn[i, perm[i]])
    else:
        pot = _pot()
        a, b = pot.unif(n), pot.unif(m)
        Mn = M.detach().cpu().numpy()
        if method == "sinkhorn":
            ret = pot.sinkhorn2(a, b, Mn, reg=reg, numItermax=int(1e7))
        else:
            ret = pot.emd2(a, b, Mn, numItermax=int(1e7))
    if power == 2:
        ret = math.sqrt(ret)
    return ret
