"""Benchmark cases shared by the pytest-benchmark suite and report.py.

Every implementation computes the same training-time quantity: the weighted
mean over the batch of the per-sample Cauchy loss (sLCT), or the full
consistency + diffusion objective.  Baselines:
    eager    the paper code's expression (quandao10/LCT, karras_diffusion.py),
             re-written here: ln(mean((pred - target)^2)/2 + c^2) - 2 ln c, weighted, mean
    compile  torch.compile of that same expression (inductor, default mode)
    lct-*    lct_kernels with a forced backend
"""

import math
import time

import torch

import lct_kernels as L

SHAPES = {
    "256x4x32x32": (256, 4, 32, 32),
    "128x4x32x32": (128, 4, 32, 32),
    "64x4x64x64": (64, 4, 64, 64),
    "8x64": (8, 64),
}
# report.py --tiny (gpu_check.sh --dry-run): the same code paths at plumbing-check sizes
TINY_SHAPES = {
    "4x4x8x8": (4, 4, 8, 8),
    "8x64": (8, 64),
}
# report.py --tiny sets "eager": torch.compile still traces (dynamo) but skips inductor's
# code generation, which would take minutes on a small CPU machine
COMPILE_BACKEND = "inductor"
C_STAGE1 = 0.00054 * math.sqrt(4096)  # the paper code's c for 4x32x32 latents


def paper_cauchy(pred, target, weight, c):
    """The paper code's eager Cauchy loss (per-sample form), weighted and averaged."""
    dims = tuple(range(1, pred.dim()))
    m = ((pred - target) ** 2).mean(dim=dims)
    loss = torch.log(m / 2 + c**2) - 2 * math.log(c)
    return (weight * loss).mean()


def paper_objective(student, teacher, x0, weight, diff_weight, diff_mask, c):
    """The paper code's loss: weighted Cauchy consistency loss + 5 x EDM-weighted diffusion loss."""
    dims = tuple(range(1, student.dim()))
    m = ((student - teacher) ** 2).mean(dim=dims)
    cm = weight * (torch.log(m / 2 + c**2) - 2 * math.log(c))
    e = ((student - x0) ** 2).mean(dim=dims)
    diff = (diff_weight * e)[diff_mask].mean()
    return cm.mean() + 5.0 * diff


def compile_fn(fn):
    """torch.compile(fn) with the backend report.py chose (COMPILE_BACKEND)."""
    return torch.compile(fn, backend=COMPILE_BACKEND)


def lct_backends(device):
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [b for b in names if L._backend.status("robust_loss", b, device)[0]]


def loss_impls(device):
    """name -> f(pred, target, weight, c) returning a scalar loss."""
    impls = {"eager": paper_cauchy, "compile": compile_fn(paper_cauchy)}
    for be in lct_backends(device):
        impls[f"lct-{be}"] = (
            lambda p, t, w, c, be=be: L.cauchy_loss(p, t, c, weight=w, backend=be)
        )
    return impls


def objective_impls(device):
    impls = {"eager": paper_objective, "compile": compile_fn(paper_objective)}
    for be in lct_backends(device):
        impls[f"lct-{be}"] = (
            lambda s, t, x0, w, dw, mask, c, be=be: L.consistency_objective(
                s, t, x0, w, dw, mask, c, backend=be
            )[0]
        )
    return impls


def loss_inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    pred = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    target = (pred.detach().float().cpu() + 0.1 * torch.randn(shape, generator=g)).to(
        device=device, dtype=dtype
    )
    weight = (torch.rand(shape[0], generator=g) * 10).to(device)
    return pred, target, weight, C_STAGE1


def objective_inputs(shape, dtype, device):
    pred, teacher, weight, c = loss_inputs(shape, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    diff_weight = (torch.rand(shape[0], generator=g) * 100 + 4).to(device)
    diff_mask = (torch.arange(shape[0]) % 3 == 0).to(device)
    return pred, teacher, x0, weight, diff_weight, diff_mask, c


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def modes(fn, inputs, device, grad_out=None):
    """{"fwd": (setup, run), "bwd": ..., "fwd+bwd": ...} for fn(*inputs).

    fwd runs the forward with inputs requiring grad (as in training: the fused
    kernels compute their gradient there); bwd times backward alone, its forward
    done in the untimed setup; fwd+bwd times both.  Gradients are cleared untimed.
    A non-scalar output is backpropagated with ``grad_out``.
    """
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    state = {}

    def clear():
        for t in leaves:
            t.grad = None

    def backward(out):
        out.backward(grad_out)

    def fwd():
        state["out"] = fn(*inputs)

    def setup_bwd():
        clear()
        state["out"] = fn(*inputs)
        sync(device)

    def bwd():
        backward(state["out"])

    def fwd_bwd():
        backward(fn(*inputs))

    return {"fwd": (clear, fwd), "bwd": (setup_bwd, bwd), "fwd+bwd": (clear, fwd_bwd)}


def time_once(setup, run, device):
    """Seconds for one run() (after an untimed setup())."""
    setup()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def copy_bandwidth(device, nbytes=256 * 2**20, reps=20):
    """Measured device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        times.append(time_once(lambda: None, lambda: dst.copy_(src), device))
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def floor_bytes(shape, dtype):
    """Fewest bytes for fused loss fwd+bwd: read pred and target once, write the gradient once."""
    numel = math.prod(shape)
    return 3 * numel * torch.empty((), dtype=dtype).element_size()
