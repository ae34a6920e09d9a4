"""The trainer's per-step schedules: the curriculum stage, the robust loss's c (with the
``measured`` schedule's per-stage measurement), the learning rate and the sigma grid.

``StageSchedule`` is a mixin of :class:`lct_kernels.train.loop.Trainer`: it reads
``self.cfg``, ``self.total_steps``, ``self.dim``, ``self.device``, ``self.world`` and
``self.is_main``, and keeps the measured schedule's state (``_measured``, ``_pending_m``,
``stage_log``).  The formulas themselves are the pure functions of ``objective``.
"""

import math
import sys

import torch

from . import distributed as ddp_lib
from . import objective as obj


class StageSchedule:
    """intervals(step), robust_c(step), lr(step), grid(N) and the stage log."""

    def intervals(self, step):
        o = self.cfg.objective
        return obj.curriculum_intervals(step, self.total_steps, o.s0, o.s1)

    def _measuring(self, step):
        """Whether step ``step`` is in its stage's c-measurement window (c_schedule=measured)."""
        o = self.cfg.objective
        s = self.intervals(step)
        return o.adaptive_c and o.c_schedule == "measured" and s > o.s0 and s not in self._measured

    def robust_c(self, step):
        """c in the kernels' per-element-mean units.

        Stage 1's c1 (0.00054 sqrt(D) or objective.c) is read in the c_convention's units
        (sum: c1 / sqrt(D) per element); the fitted (paper), anchored (c1 (s/s0)^-1.15)
        and measured c are per-element values already and are not rescaled.  While a
        stage's c is being measured, the previous stage's c is used."""
        o = self.cfg.objective
        divisor, _ = obj.convention_scale(o.loss, o.c_convention, self.dim)
        base = (o.c if o.c > 0 else 0.00054 * math.sqrt(self.dim)) / divisor
        s = self.intervals(step)
        if o.adaptive_c and o.c_schedule == "measured" and s > o.s0:
            if s not in self._measured:  # measuring: the c of the step before this stage
                K1 = obj.stage_length(self.total_steps, o.s0, o.s1)
                return self.robust_c((step // K1) * K1 - 1)
            return self._measured[s]
        return obj.cauchy_c(s, o.s0, base_c=base, adaptive=o.adaptive_c, schedule=o.c_schedule)

    def _log_stage(self, step, note=""):
        """Records (stage_log, summary.json) and prints the c a stage trains with."""
        o = self.cfg.objective
        s = self.intervals(step)
        stage = step // obj.stage_length(self.total_steps, o.s0, o.s1) + 1
        rule = "constant" if not o.adaptive_c or s <= o.s0 else o.c_schedule
        entry = {"stage": stage, "s": s, "step": step, "c": self.robust_c(step), "rule": rule}
        self.stage_log.append(entry)
        if self.is_main:
            print(f"lct-train: step {step}: stage {stage} (s={s}, N={s + 1}): c={entry['c']:.5g} "
                  f"({rule}{note})", file=sys.stderr)

    def _record_residuals(self, step, m):
        """c_schedule=measured: collect m of the window's batches; set c when it is full."""
        self._pending_m.append(m.detach())
        o = self.cfg.objective
        if len(self._pending_m) < o.c_measure_batches:
            return
        local = torch.cat(self._pending_m)
        everything = ddp_lib.all_gather_batch(local) if self.world > 1 else local
        s = self.intervals(step)
        self._measured[s] = obj.measured_c(everything)
        self._pending_m = []
        median = float(torch.quantile(everything.double(), 0.5))
        self._log_stage(step + 1, f": sqrt(median m / 2) over {everything.numel()} samples of "
                                  f"{o.c_measure_batches} batches, median m = {median:.3g}")

    def lr(self, step):
        o = self.cfg.optim
        if o.warmup_steps and step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        return o.lr

    def grid(self, n_points):
        """(Karras sigmas on the device, index probabilities) for N points; changes once
        per curriculum stage, so it is built once per N."""
        cache = self.__dict__.setdefault("_grid_cache", {})
        if n_points not in cache:
            o = self.cfg.objective
            sigmas = obj.karras_sigmas(n_points, o.sigma_min, o.sigma_max, o.rho)
            # pinned + non_blocking: a stage change between logging steps must not sync
            cache[n_points] = (self._to_device(sigmas),
                               obj.index_probabilities(sigmas, o.p_mean, o.p_std))
        return cache[n_points]
