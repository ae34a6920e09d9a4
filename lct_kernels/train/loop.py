"""The training loop: batches, OT pairing, the objective, the optimiser, EMA, logging,
samples, checkpoints.  It owns no math (that is ``objective``).

Reproducibility: every random draw of step k (the batch's data indices, the noise,
the sigma indices, dropout) comes from generators seeded by (seed, k), so a
resumed run repeats an uninterrupted one exactly: only the step, model, EMA and
optimiser state need to be restored.  (The global RNG states are saved too.)
"""

import copy
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from .._backend import select
from ..cpu_heap import cpu_heap_status, tune_cpu_heap
from ..optim import FusedRAdam
from . import distributed as ddp_lib
from . import objective as obj
from .checkpoint import CheckpointError, list_checkpoints, resolve_resume, save_checkpoint
from .latent_report import format_outlier_report, outlier_stats
from .checkpoint import checkpoint_path as checkpoint_name
from .config import from_dict, resolve_total_steps, save_config
from .device_step import GuardedUpdate, MetricWindow, OTTimer, nonfinite_grads
from .pipeline import build_model, make_decoder, prepare_data
from .outputs import EVAL_FIELDS, METRIC_FIELDS, RunOutputs  # noqa: F401 (re-exported)
from .plots import plot_metrics
from .stage_schedule import StageSchedule



class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


def _seed_for(seed, step, stream):
    # Distinct, well-spread 63-bit seeds for (seed, step, stream).
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + stream * 0xC2B2AE3D) % (2**63 - 1)


def resolve_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{local_rank}"  # torchrun: one GPU per process
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name}: CUDA is not available on this machine")
    return device


class Trainer(StageSchedule, RunOutputs):
    """One training run in ``out_dir`` (config, checkpoints/, samples/, metrics.csv,
    loss.png, summary.json).  ``resume``: a checkpoint file or folder (or True for
    ``out_dir/checkpoints``).

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: ``optim.batch_size``
    is the global batch, each process takes an equal share, process 0 alone
    writes logs, samples and checkpoints.

    ``evaluator``: the periodic evaluation of ``run.eval_every``, a callable
    ``evaluator(trainer) -> dict`` of metric columns (see EVAL_FIELDS), called on
    process 0 every eval_every steps.  The loop knows no metric: the CLI passes
    :class:`lct_kernels.eval.evaluate.PeriodicDigitsEval` (the trainer and the
    evaluation never import each other).  run.eval_every > 0 without an evaluator
    is an error."""

    def __init__(self, cfg, out_dir, resume=None, data=None, overwrite=False, evaluator=None):
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.sample_dir = self.out / "samples"
        want = cfg.run.device if cfg is not None else "auto"
        local_rank = ddp_lib.init_from_env("cuda" if want.startswith("cuda") or (
            want == "auto" and torch.cuda.is_available()) else "cpu")
        self.rank, self.world = ddp_lib.world()
        self.is_main = self.rank == 0
        if not resume and list_checkpoints(self.ckpt_dir):
            if not overwrite:
                raise FileExistsError(
                    f"{self.out} already holds a run ({list_checkpoints(self.ckpt_dir)[-1][1].name}): "
                    "pass --resume to continue it, --overwrite to start over, or another --out"
                )
            if self.is_main:
                self._clear_outputs()
            ddp_lib.barrier()
        state = None
        if resume:
            target = self.ckpt_dir if resume is True else Path(resume)
            _, state = resolve_resume(target)
            cfg = self._merge_resumed_config(state["config"], cfg)
        self.cfg = cfg
        r = cfg.run
        if evaluator is not None and not callable(evaluator):
            raise TypeError(f"Trainer: evaluator must be callable (trainer -> dict), "
                            f"got {type(evaluator).__name__}")
        if r.eval_every and evaluator is None:
            raise ValueError(
                f"Trainer: run.eval_every={r.eval_every} needs evaluator= (a callable trainer -> "
                "dict, e.g. lct_kernels.eval.evaluate.PeriodicDigitsEval()), or run.eval_every=0")
        self.evaluator = evaluator
        self.device = resolve_device(r.device, local_rank)
        if self.device.type == "cpu" and r.cpu_heap and not tune_cpu_heap():
            warnings.warn(f"lct-train: run.cpu_heap=true could not be applied ({cpu_heap_status()[1]}); "
                          "steps pay page faults for their activations", RuntimeWarning, stacklevel=2)
        self.autocast = (r.precision == "bf16" or (r.precision == "auto" and self.device.type == "cuda"))
        self.backend = r.backend or None
        if cfg.optim.batch_size % self.world:
            raise ValueError(f"optim.batch_size: the global batch {cfg.optim.batch_size} must be "
                             f"divisible by the number of processes ({self.world})")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.toml")

        if data is None and not self.is_main:
            ddp_lib.barrier()  # process 0 builds the stage-1 cache first
        self.data = data if data is not None else prepare_data(cfg, progress=r.progress and self.is_main)
        if data is None and self.is_main:
            ddp_lib.barrier()
        if self.data.latents.shape[0] < cfg.optim.batch_size:
            raise ValueError(
                f"optim.batch_size: {cfg.optim.batch_size} exceeds the {self.data.latents.shape[0]} "
                "training latents"
            )
        # K: run.steps, or floor(|D| / B) * optim.epochs
        self.total_steps = resolve_total_steps(cfg, self.data.latents.shape[0])
        o = cfg.objective
        if o.adaptive_c and o.c_schedule == "measured":
            stage = obj.stage_length(self.total_steps, o.s0, o.s1)
            if o.c_measure_batches >= stage:
                raise ValueError(
                    f"objective.c_measure_batches: {o.c_measure_batches} batches do not fit in a "
                    f"curriculum stage of {stage} steps; use fewer batches or more steps")
        self._measured = {}     # c_schedule=measured: {s: c} of the stages measured so far
        self._pending_m = []    # the current stage's per-sample residuals m, until it is measured
        self.stage_log = []     # [{"stage", "s", "step", "c", "rule"}], one per stage (and c)
        self._announced_s = None
        torch.manual_seed(r.seed)
        self.model = build_model(cfg, self.data.latent_shape, self.data.num_classes).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ddp = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        o = cfg.optim
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # capturable: RAdam keeps its step count on the GPU, so its update never reads
        # the device from the host (and the skip guard can restore it on the device)
        # On the CPU the fused RAdam (lct_kernels.optim.FusedRAdam: torch's RAdam update and
        # the EMA in one C++ pass, the same state_dict); elsewhere, or with
        # run.backend=torch, torch's RAdam.
        self.fused_optimizer = self.device.type == "cpu" and select(
            "radam", self.device, "torch" if self.backend == "torch" else None, "lct-train") == "cpu"
        if self.fused_optimizer:
            shadows = dict(zip(self.model.parameters(), self.ema.parameters()))
            self.optimizer = FusedRAdam(self._params, lr=o.lr, weight_decay=o.weight_decay,
                                        eps=o.eps, ema=[shadows[p] for p in self._params])
        else:
            self.optimizer = torch.optim.RAdam(
                self._params, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps,
                capturable=self.device.type == "cuda",
            )
        self._guard = GuardedUpdate(self.optimizer, self._params, list(self.ema.parameters()))
        # run.compile: one compiled module serves student and teacher (a training graph and
        # a no_grad graph, compiled at the first step); c and N never enter the model, so
        # a curriculum stage change does not retrace it.
        self.compiled = None
        if r.sync_free not in ("auto", "true", "false"):
            raise ValueError(f"run.sync_free: must be auto, true or false, got {r.sync_free!r}")
        self.sync_free = r.sync_free == "true" or (r.sync_free == "auto" and self.device.type == "cuda")
        if r.compile:
            if self.world > 1:
                raise ValueError("run.compile: not supported under torchrun yet (compile runs on "
                                 "one process); set run.compile=false")
            self.compiled = torch.compile(self.model, fullgraph=True, dynamic=False)
        self.latents = self.data.latents.to(self.device)
        self.labels = None if self.data.labels is None else self.data.labels.to(self.device)
        self.dim = self.latents[0].numel()
        self.step = 0
        self.skipped_total = 0
        self.consecutive_nonfinite = 0
        self._stop_signal = None
        self._stop_all = False
        self._grids = {}
        if state is not None:
            self._load_state(state)
        # loss, cm loss, diffusion loss, grad-norm sum, grad-norm count
        self._window = MetricWindow(5, self.device, consecutive=self.consecutive_nonfinite)
        self._ot_timer = OTTimer(self.device)
        self._ot_failed = torch.zeros((), dtype=torch.bool, device=self.device)

    # ---- config and state -------------------------------------------------------------
    @staticmethod
    def _merge_resumed_config(saved, given):
        """A resumed run keeps its saved config; only run.* fields may change (e.g. steps)."""
        resumed = from_dict(saved)
        if given is not None:
            for section in ("data", "model", "objective", "ot", "optim"):
                if getattr(given, section) != getattr(resumed, section):
                    print(f"lct-train: --resume keeps the checkpoint's [{section}] settings "
                          "(the given ones differ and are ignored)", file=sys.stderr)
            resumed.run = given.run
        return resumed

    def _state(self):
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "curriculum": {"intervals": self.intervals(self.step), "c": self.robust_c(self.step),
                           "measured": dict(self._measured), "stage_log": list(self.stage_log),
                           "pending_m": [m.cpu() for m in self._pending_m]},
            "counters": self._counters(),
            "latent_stats": self.data.stats.state_dict(),
            "latent_shape": list(self.data.latent_shape),
            "num_classes": self.data.num_classes,
            "decoder": self.data.decoder,
            "world_size": self.world,
        }

    def _load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        curriculum = state.get("curriculum", {})
        self._measured = {int(k): float(v) for k, v in curriculum.get("measured", {}).items()}
        self._pending_m = [m.to(self.device) for m in curriculum.get("pending_m", [])]
        self.stage_log = list(curriculum.get("stage_log", []))
        self._announced_s = self.stage_log[-1]["s"] if self.stage_log else None
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world and self.is_main:
            print(f"lct-train: resuming a run saved by {saved_world} process(es) on {self.world}: "
                  "the global batch and every random draw are unchanged"
                  + (" (with ot.scope=rank the OT coupling groups differ)"
                     if self.cfg.objective.ot and self.cfg.ot.scope == "rank" else ""),
                  file=sys.stderr)
        self.skipped_total = int(state["counters"]["skipped_total"])
        self.consecutive_nonfinite = int(state["counters"]["consecutive_nonfinite"])

    def _counters(self):
        """Skip counters including the steps not yet fetched from the device."""
        skipped, run, _ = self._window.peek()
        return {"skipped_total": self.skipped_total + skipped, "consecutive_nonfinite": run}

    def check_divergence(self):
        """At a checkpoint step: stop a diverged run before it saves (one host read)."""
        _, _, longest = self._window.peek()
        if longest >= self.cfg.run.max_nonfinite:
            self.fetch_metrics()  # updates the counters and raises

    def save(self):
        """Process 0 writes the checkpoint (all processes hold identical weights)."""
        if not self.is_main:
            return checkpoint_name(self.ckpt_dir, self.step)
        return save_checkpoint(self._state(), self.ckpt_dir, self.step, keep=self.cfg.run.keep_ckpts)

    # ---- one step ---------------------------------------------------------------------
    def batch_indices(self, step, batch_size=None):
        """Data indices of step ``step``: epoch-wise permutations seeded by (seed, epoch)."""
        n = self.latents.shape[0]
        B = batch_size or self.cfg.optim.batch_size
        per_epoch = n // B
        epoch, j = divmod(step, per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(_seed_for(self.cfg.run.seed, epoch, 1))
            self._perm = torch.randperm(n, generator=g)
            self._perm_epoch = epoch
        return self._perm[j * B:(j + 1) * B]

    def step_inputs(self, step):
        """(data, noise, labels, indices, sigmas, ot_ms, global_indices) of this process for
        step ``step``, OT-paired if enabled.

        The global batch's draws (data indices, noise, sigma indices) are the same for
        any number of processes; each process takes its contiguous share."""
        cfg, o = self.cfg, self.cfg.objective
        share = lambda t: ddp_lib.share(t, self.rank, self.world)  # noqa: E731
        idx_host = self.batch_indices(step)
        idx = self._to_device(idx_host)
        B = idx.shape[0]
        g_dev = torch.Generator(device=self.device).manual_seed(_seed_for(cfg.run.seed, step, 2))
        noise = share(torch.randn((B,) + self.data.latent_shape, generator=g_dev,
                                  device=self.device, dtype=self.latents.dtype))
        idx = share(idx)
        x = self.latents[idx]
        y = None if self.labels is None else self.labels[idx]
        ot_ms = 0.0
        if o.ot:
            timer = self._ot_timer.start()
            if cfg.ot.scope == "global":  # the host labels: of the global batch, rank order
                host_y = None if y is None else self.data.labels[idx_host]
                noise, status = ddp_lib.global_ot_pair(x, noise, y, backend=self.backend,
                                                       host_labels=host_y, return_status=True)
            else:
                host_y = None if y is None else self.data.labels[share(idx_host)]
                x, noise, y, status = obj.ot_pair(x, noise, y, backend=self.backend,
                                                  host_labels=host_y, return_status=True)
            self._ot_failed = self._ot_failed | (status != 0).any()  # checked when fetched
            ot_ms = timer.stop()
        sigmas, probs = self.grid(self.intervals(step) + 1)
        g_cpu = torch.Generator().manual_seed(_seed_for(cfg.run.seed, step, 3))
        # drawn on the host (its counts feed the DDP diffusion coefficient without a
        # device read), then copied without waiting for the device
        global_indices = obj.sample_indices(probs, B, generator=g_cpu)
        local = self._to_device(share(global_indices))
        return x, noise, y, local, sigmas, ot_ms, global_indices

    def _to_device(self, t):
        """A host tensor on the training device, without a host-device sync on CUDA."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def train_step(self, fetch=True):
        """One optimisation step.  Returns a dict of the step's metrics; with
        ``fetch=False`` (the loop, between logging steps) only the host-side ones (c, N,
        lr, ot_ms): the device-side ones stay summed on the device for
        ``fetch_metrics``, so the step never waits for the device."""
        cfg, o = self.cfg, self.cfg.objective
        step = self.step
        if self.intervals(step) != self._announced_s:  # a new stage: say which c it trains with
            self._announced_s = self.intervals(step)
            if self._measuring(step):
                if self.is_main:
                    print(f"lct-train: step {step}: stage (s={self.intervals(step)}) measures its c "
                          f"over {o.c_measure_batches} batches, training with c="
                          f"{self.robust_c(step):.5g} meanwhile", file=sys.stderr)
            else:
                self._log_stage(step)
        measuring = self._measuring(step)
        x, noise, y, indices, sigmas, ot_ms, global_indices = self.step_inputs(step)
        c = self.robust_c(step)
        diff_coef = o.diff_coef
        if o.diffusion_loss and self.world > 1:  # average over the global batch's selected samples
            n_points = sigmas.numel()
            share = ddp_lib.share(global_indices, self.rank, self.world)  # host copies
            diff_coef = ddp_lib.diffusion_coefficient(
                o.diff_coef, obj.diffusion_mask(share, n_points, o.diff_fraction),
                obj.diffusion_mask(global_indices, n_points, o.diff_fraction), self.world)
        _, weight_mult = obj.convention_scale(o.loss, o.c_convention, self.dim)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            total, cm, diff, _, *residual = obj.consistency_losses(
                self.ddp if self.compiled is None else self.compiled, x, noise, y, indices, sigmas,
                loss=o.loss, c=c, teacher_net=self.model if self.compiled is None else self.compiled,
                diffusion=o.diffusion_loss, diff_coef=diff_coef, diff_fraction=o.diff_fraction,
                weight_multiplier=weight_mult, sigma_min=o.sigma_min, sigma_data=o.sigma_data,
                dropout_seed=(_seed_for(cfg.run.seed, step, 4) if cfg.model.dropout > 0 else None),
                backend=self.backend, return_residual=measuring,
            )
        self.optimizer.zero_grad(set_to_none=True)
        # No host read of a device value from here on (see device_step.py): the skip
        # decision, the metrics and the divergence count stay on the device until the
        # next logging step.
        total.backward()
        params = self._params
        grads = [p.grad for p in params if p.grad is not None]
        clip = cfg.optim.grad_clip
        log_norm = fetch or (self.step + 1) % cfg.run.log_every == 0
        if clip > 0 or log_norm:  # no grad-norm pass otherwise
            # the parameters, not their grads: given tensors, clip_grad_norm_ reads their
            # .grad (None for a grad tensor), so it would clip nothing and return a CPU 0
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], clip if clip > 0 else float("inf"),
                foreach=True)
            found = ~torch.isfinite(grad_norm.to(self.device)) | ~torch.isfinite(total.detach())
        else:
            grad_norm = torch.full((), float("nan"), device=self.device)
            found = nonfinite_grads(grads, self.device) | ~torch.isfinite(total.detach())
        found = ddp_lib.any_process(found)  # every process takes the same decision
        if measuring:  # the measured c schedule reads its first batches' residuals (a sync)
            if not bool(found):
                self._record_residuals(step, residual[0])
        if self.sync_free and self._guard.ready():
            self._guard(found, lambda: self.update(step))
        elif bool(found):  # host check: sync_free off (CPU), or the run's first update (no
            # optimiser state to snapshot yet: one sync)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.update(step)
        # no norm this step: count 0 (grad_norm * 0 would be NaN * 0 = NaN)
        has_norm = (torch.isfinite(grad_norm).float() if (clip > 0 or log_norm)
                    else torch.zeros((), device=self.device))
        values = torch.stack([total.detach().float(), cm.detach().float().mean(),
                              diff.detach().float(), torch.nan_to_num(grad_norm.float(), nan=0.0),
                              has_norm])
        self._window.add(found, values)
        self.step += 1
        metrics = {"c": c, "N": self.intervals(step) + 1, "lr": self.lr(step), "ot_ms": ot_ms}
        if fetch:
            metrics.update(self.fetch_metrics())
        return metrics

    def fetch_metrics(self):
        """One host read of the metrics summed since the last fetch (means over the
        good steps); updates the skip counters and stops a diverged run."""
        (loss, cm_loss, diff_loss, norm_sum, norm_count), good, skipped, run, longest = \
            self._window.fetch()
        grad_norm = norm_sum / norm_count if norm_count else float("nan")
        if bool(self._ot_failed):  # read with the metrics: the device has finished anyway
            raise ValueError(
                f"lct-train: the exact OT coupling failed at a step before {self.step} (a NaN or "
                "-inf in the data or the noise); the checkpoint before it is intact")
        if self.world > 1:
            loss = ddp_lib.mean_over_processes(loss)
        self.skipped_total += skipped
        self.consecutive_nonfinite = run
        limit = self.cfg.run.max_nonfinite
        if longest >= limit:
            raise TrainingDiverged(
                f"stopping: {longest} consecutive non-finite losses/gradients "
                f"(run.max_nonfinite={limit}) by step {self.step}; the skipped steps left the "
                f"weights untouched and the last checkpoint in {self.ckpt_dir} is intact.  Try a "
                "lower optim.lr or optim.grad_clip > 0."
            )
        return {"loss": loss, "cm_loss": cm_loss, "diff_loss": diff_loss, "grad_norm": grad_norm,
                "good": good, "skipped": skipped}

    def ema_decay(self, step):
        """The EMA decay of step k: optim.ema_decay, warmed up as min(ema_decay,
        (1 + k) / (10 + k)) with optim.ema_warmup."""
        o = self.cfg.optim
        return min(o.ema_decay, (1 + step) / (10 + step)) if o.ema_warmup else o.ema_decay

    def update(self, step):
        """The optimiser step, then the EMA update (folded into the fused RAdam's pass
        on the CPU: the same lerp)."""
        if not self.fused_optimizer:
            self.optimizer.step()
            self.update_ema(step)
            return
        decay = self.ema_decay(step)
        self.optimizer.step(ema_decay=decay)  # every trainable parameter's EMA
        with torch.no_grad():
            frozen = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters())
                      if not p.requires_grad]
            if frozen:
                torch._foreach_lerp_([e for e, _ in frozen], [p for _, p in frozen], 1.0 - decay)
            for eb, b in zip(self.ema.buffers(), self.model.buffers()):
                eb.copy_(b)

    @torch.no_grad()
    def update_ema(self, step):
        """ema = lerp(ema, model, 1 - ema_decay(step)) for every parameter; buffers copied."""
        decay = self.ema_decay(step)
        ema_params = list(self.ema.parameters())
        params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    def evaluate(self):
        """run.eval_every: the metric columns from ``self.evaluator(self)`` ({} without one)."""
        return {} if self.evaluator is None else dict(self.evaluator(self))

    # ---- the loop -----------------------------------------------------------------------
    def _handle_signal(self, signum, _frame):
        self._stop_signal = signum

    def train(self, stop_after=None):
        """Runs until run.steps (or ``stop_after`` more steps, or SIGTERM/SIGINT, which
        save a checkpoint and return).  Returns the summary dict (also summary.json)."""
        r = self.cfg.run
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        main = self.is_main
        fh, writer = self._open_metrics() if main else (None, None)
        tb = self._tensorboard() if main else None
        from tqdm.auto import tqdm

        if main:
            print(format_outlier_report(self.latent_outliers(), "lct-train: training latents"),
                  file=sys.stderr)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (r.progress and main),
                   desc="lct-train", unit="step", dynamic_ncols=True)
        start_step, t_start = self.step, time.perf_counter()
        window, t_window = [], time.perf_counter()
        status = "completed"
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        try:
            while self.step < end:
                log_now = (self.step + 1) % r.log_every == 0 or self.step + 1 == end
                metrics = self.train_step(fetch=False)
                window.append(metrics)
                bar.update(1)
                if self.world == 1:
                    self._stop_all = self._stop_signal is not None
                if log_now:
                    row = self._summarise(window, self.fetch_metrics(), time.perf_counter() - t_window)
                    if self.world > 1:  # every process stops at the same step
                        self._stop_all = ddp_lib.any_process_host(self._stop_signal is not None)
                    if main and r.eval_every and self.step % r.eval_every == 0:
                        row.update(self.evaluate())
                    if main:
                        writer.writerow(row)
                        fh.flush()
                    if tb is not None:
                        for key in ("loss", "cm_loss", "diff_loss", "c", "N", "lr", "grad_norm"):
                            tb.add_scalar(f"train/{key}", row[key], self.step)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", c=f"{row['c']:.3g}", N=row["N"])
                    window, t_window = [], time.perf_counter()
                if self.step % r.ckpt_every == 0:
                    self.check_divergence()
                    self.save()
                    if main:
                        plot_metrics(self.out / "metrics.csv", self.out / "loss.png", EVAL_FIELDS)
                if r.sample_every and self.step % r.sample_every == 0 and main:
                    self.write_samples()
                if self._stop_all:
                    name = (signal.Signals(self._stop_signal).name if self._stop_signal
                            else "a signal to another process")
                    status = f"interrupted by {name}"
                    break
            if self.step < self.total_steps and status == "completed":
                status = "stopped early (stop_after)"
        finally:
            bar.close()
            if fh is not None:
                fh.close()
            if tb is not None:
                tb.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        ckpt = self.save()
        if main:
            plot_metrics(self.out / "metrics.csv", self.out / "loss.png", EVAL_FIELDS)
        if status == "completed" and main:
            self.write_samples()
        elapsed = time.perf_counter() - t_start
        summary = {
            "status": status, "step": self.step, "steps_total": self.total_steps,
            "steps_this_run": self.step - start_step, "seconds": round(elapsed, 2),
            "steps_per_s": round((self.step - start_step) / max(elapsed, 1e-9), 3),
            "skipped_nonfinite": self.skipped_total, "checkpoint": str(ckpt),
            "device": str(self.device), "precision": "bf16" if self.autocast else "fp32",
            "processes": self.world,
            "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "final": self._last_row(), "stages": list(self.stage_log),
            "latent_outliers": self.latent_outliers(),
        }
        if main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        ddp_lib.barrier()
        return summary

    def latent_outliers(self):
        """Outlier statistics of the training latents (at most 4096 of them: the first ones)."""
        if getattr(self, "_outliers", None) is None:
            self._outliers = outlier_stats(self.data.latents[:4096])
        return self._outliers

    def _summarise(self, window, fetched, seconds):
        """One metrics.csv row from the window's host metrics and the fetched device ones
        (means over the window's good steps; grad_norm over the steps that computed it:
        every step with clipping on, else the logging step alone)."""
        last = window[-1]
        ot = self._ot_timer.drain() if self._ot_timer.cuda else [m["ot_ms"] for m in window]
        row = {"step": self.step, "loss": fetched["loss"], "cm_loss": fetched["cm_loss"],
               "diff_loss": fetched["diff_loss"], "c": last["c"], "N": last["N"], "lr": last["lr"],
               "grad_norm": fetched["grad_norm"], "steps_per_s": len(window) / max(seconds, 1e-9),
               "ot_ms": sum(ot) / len(ot) if ot else 0.0, "skipped": fetched["skipped"]}
        self._last = row
        return row

    def _last_row(self):
        return getattr(self, "_last", None)


def load_for_sampling(ckpt_path, device="cpu", use_ema=True):
    """(model, state, decoder, cfg) from a checkpoint, ready for ``sampling.sample``."""
    from .checkpoint import load_checkpoint
    from .data.stats import LatentStats

    state = load_checkpoint(ckpt_path)
    cfg = from_dict(state["config"])
    model = build_model(cfg, tuple(state["latent_shape"]), state["num_classes"])
    try:
        model.load_state_dict(state["ema" if use_ema else "model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt_path}: weights do not match the saved config: {exc}") from None
    model = model.to(device).eval()
    stats = LatentStats.from_state_dict(state["latent_stats"])
    decoder = make_decoder(state["decoder"], stats, device)
    return model, state, decoder, cfg
