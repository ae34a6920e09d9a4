"""Sync-free pieces of the training step: the non-finite skip and the step metrics,
both decided and kept on the device.

Why: on a GPU every host read of a device value (``float(loss)``, ``.item()``,
``.tolist()``, ``bool(t.any())``) waits for all queued work, so nothing of the next
kernels can be queued meanwhile.  The trainer therefore reads the device once per
logging interval (``MetricWindow.fetch``) and never in between.

``GuardedUpdate`` makes "skip this step if the loss or a gradient is not finite"
exact without knowing the answer on the host: it snapshots every tensor that the
update writes (parameters, optimiser state, EMA parameters), runs the update, and
selects ``where(found_nonfinite, before, after)`` on the device.  Cost: about four
passes over those tensors per step (a few ms per step for DiT-B/2 on an H200, next
to a step of ~100 ms), and one extra copy of them in memory while it runs.
"""

import time

import torch


def _grouped(tensors):
    """{(device, dtype): [tensor, ...]} preserving order."""
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


class GuardedUpdate:
    """Runs ``update()`` (optimizer step + EMA) and undoes it on the device when
    ``found`` (a 0-d bool tensor) is true.

    ``tensors()`` returns every tensor the update writes; it is called before the
    update, so lazily created optimiser state must already exist (``ready``: False
    until the optimiser holds state for every parameter; the caller then uses one
    host-checked step instead, once per run)."""

    def __init__(self, optimizer, params, ema_params):
        self.optimizer = optimizer
        self.params = list(params)
        self.ema_params = list(ema_params)

    def ready(self):
        return all(p in self.optimizer.state and self.optimizer.state[p] for p in self.params)

    def tensors(self):
        out = list(self.params) + list(self.ema_params)
        for p in self.params:
            out.extend(v for v in self.optimizer.state[p].values() if torch.is_tensor(v))
        return out

    @torch.no_grad()
    def __call__(self, found, update):
        groups = _grouped(self.tensors())
        before = {k: torch.cat([t.reshape(-1) for t in ts]) for k, ts in groups.items()}
        update()
        for key, ts in groups.items():
            after = torch.cat([t.reshape(-1) for t in ts])
            keep = found.to(device=key[0])
            torch.where(keep, before[key], after, out=after)
            torch._foreach_copy_(ts, [a.view_as(t) for a, t in zip(after.split([t.numel() for t in ts]), ts)])


def nonfinite_grads(grads, device):
    """0-d bool on ``device``: does any gradient hold a NaN or an infinity?  One fused
    pass per (device, dtype) group (torch's AMP check, with a unit scale)."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    for (dev, _), ts in _grouped(grads).items():
        flag = torch.zeros((), dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, flag, torch.ones((), device=dev))
        found = torch.maximum(found, flag.to(device))
    return found > 0


class MetricWindow:
    """Step metrics summed on the device between two logging steps.

    ``add(found, values)``: ``values`` a (K,) float32 tensor of this step's metrics,
    counted only when ``found`` (0-d bool) is false.  ``fetch()``: one host transfer
    of (sums, good steps, skipped steps, longest run of consecutive skips), then
    reset."""

    def __init__(self, n_values, device, consecutive=0):
        self.n, self.device = n_values, device
        self._start_consecutive = consecutive
        self._reset()

    def _reset(self):
        z = torch.zeros
        self.sums = z((self.n,), dtype=torch.float64, device=self.device)
        self.good = z((), dtype=torch.float64, device=self.device)
        self.skipped = z((), dtype=torch.float64, device=self.device)
        self.run = torch.full((), float(self._start_consecutive), dtype=torch.float64,
                              device=self.device)
        self.longest = self.run.clone()

    def add(self, found, values):
        ok = ~found
        self.sums += torch.where(ok, values.detach().to(torch.float64), 0.0)
        self.good += ok.to(torch.float64)
        self.skipped += found.to(torch.float64)
        self.run = torch.where(found, self.run + 1, 0.0)
        self.longest = torch.maximum(self.longest, self.run)

    def peek(self):
        """(skipped steps, consecutive skips now, longest run) without resetting: one host
        read (checkpoint steps, which wait for the device anyway)."""
        skipped, run, longest = torch.stack([self.skipped, self.run, self.longest]).tolist()
        return int(skipped), int(run), int(longest)

    def fetch(self):
        """(means (K,) list of floats, good, skipped, consecutive skips now, longest run)."""
        packed = torch.cat([self.sums, torch.stack([self.good, self.skipped, self.run,
                                                    self.longest])]).tolist()
        sums, (good, skipped, run, longest) = packed[:self.n], packed[self.n:]
        means = [s / good if good else float("nan") for s in sums]
        self._start_consecutive = int(run)
        self._reset()
        return means, int(good), int(skipped), int(run), int(longest)


class OTTimer:
    """Wall time of the OT coupling per step.  On the CPU a host clock; on CUDA a pair of
    events per step (a host clock would time only the kernel launches), read by
    ``drain`` after the logging step's fetch has waited for the device anyway."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = []

    def start(self):
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self):
        """Milliseconds on the CPU; NaN on CUDA (known after ``drain``)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._begin, end))
            return float("nan")
        return (time.perf_counter() - self._t0) * 1e3

    def drain(self):
        """Milliseconds of the CUDA steps timed since the last drain."""
        out = [b.elapsed_time(e) for b, e in self.pending]
        self.pending = []
        return out
