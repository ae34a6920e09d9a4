"""Multi-process training helpers (torchrun + torch.distributed; gloo on CPU, nccl on GPU).

The trainer keeps one *global* batch per step: every process derives the same
global data indices, noise and sigma indices from the (seed, step) generators
and takes its contiguous share, so a run's random draws do not depend on the
number of processes.  With ``ot.scope=global`` and the diffusion loss averaged
over the global batch (``diffusion_coefficient``), K processes compute the same
loss and gradient as one process on the whole global batch.
"""

import datetime
import os

import torch
import torch.distributed as dist

import lct_kernels as lk
from lct_kernels.ops.ot import STATUS_MESSAGES


def world():
    """(rank, world_size): (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_type):
    """Joins the process group torchrun describes (WORLD_SIZE > 1); returns the local rank.

    gloo for CPU runs, nccl for CUDA runs.  A no-op for a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return local_rank


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if world()[1] > 1:
        dist.barrier()


def share(tensor, rank, size):
    """This process's contiguous share of a global batch (dim 0 divisible by ``size``)."""
    n = tensor.shape[0] // size
    return tensor[rank * n:(rank + 1) * n]


def all_gather_batch(local):
    """Concatenates every process's ``local`` (same shape) along dim 0, in rank order."""
    rank, size = world()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def global_ot_pair(data_local, noise_local, labels_local=None, backend=None, *,
                   host_labels=None, return_status=False):
    """``ot.scope=global``: one exact OT coupling of the whole global batch.

    All-gathers data and noise, rank 0 solves ``lk.ot_couple`` on its device, the
    permutation is broadcast, and each process keeps the noise paired with its own
    data.  Cost: two all-gathers of B x D values, one B x B assignment on one
    device, one broadcast of B + 1 int64.  With labels the coupling is within each
    class, as ``objective.ot_pair``.  Returns this process's paired noise.

    ``host_labels``: the GLOBAL batch's labels on the CPU (rank order, as the gathered
    batch), if the caller has them: the per-class padding is then sized without a
    device read.  ``return_status``: return (noise, status) instead of checking the
    solve here; status is a 0-d int32 tensor on the device, 0 when every problem was
    solved (else the largest ``lk.ot_couple`` status code), the same on every process
    (it travels with the broadcast permutation), so no process waits for the device."""
    rank, size = world()
    if size == 1:
        groups = labels_local if host_labels is None or labels_local is None else host_labels
        out = lk.ot_couple(data_local, noise_local, groups=groups, backend=backend,
                           return_status=return_status)
        if not return_status:
            return noise_local[out]
        return noise_local[out[0]], out[1].max()
    data = all_gather_batch(data_local)
    noise = all_gather_batch(noise_local)
    groups = None
    if labels_local is not None:
        groups = host_labels if host_labels is not None else all_gather_batch(labels_local)
    B = data.shape[0]
    if rank == 0:
        perm, status = lk.ot_couple(data, noise, groups=groups, backend=backend,
                                    return_status=True)
        packed = torch.cat([perm, status.max().to(torch.int64).reshape(1)])
    else:
        packed = torch.empty(B + 1, dtype=torch.int64, device=data.device)
    dist.broadcast(packed, src=0)
    perm, status = packed[:B], packed[B].to(torch.int32)
    if not return_status:  # the caller asked for the check here: one host read
        code = int(status)
        if code != 0:
            raise ValueError("global_ot_pair: the OT coupling of the global batch failed on "
                             "rank 0: " + STATUS_MESSAGES.get(code, f"status {code}"))
    paired = share(noise[perm], rank, size)
    return (paired, status) if return_status else paired


def diffusion_coefficient(diff_coef, local_mask, global_mask, size):
    """Per-process diffusion coefficient so that the data-parallel average equals the
    diffusion loss averaged over the selected samples of the GLOBAL batch.

    Each process's objective averages over its own selected samples (count n_r);
    data parallelism averages the processes' gradients (factor 1/K).  Scaling
    process r's coefficient by K n_r / n_global gives
    (1/K) sum_r coef K n_r / n_global * (sum_r' e / n_r) = coef * sum_all e / n_global."""
    n_local = int(local_mask.sum())
    n_global = int(global_mask.sum())
    if n_global == 0:
        return diff_coef
    return diff_coef * size * n_local / n_global


def any_process(flag):
    """0-d bool tensor: ``flag`` (0-d bool, on the training device) on any process.
    One all-reduce on the device; the host never reads it."""
    if world()[1] == 1:
        return flag
    t = flag.to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0] > 0


def any_process_host(flag):
    """A host bool true on any process (logging steps only: it waits for the device)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] > 0)


def mean_over_processes(value):
    """The mean of a host float over the processes (logging steps only)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0]) / world()[1]
