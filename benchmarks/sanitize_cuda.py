"""Call every CUDA kernel of lct_kernels once on tiny shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    python benchmarks/sanitize_cuda.py --dry-run     # same cases, CPU tensors, default backends

Each case forces backend="cuda" (the CUDA C++ kernels; Triton is not what the sanitizer
is for here), runs forward and backward, synchronizes, and prints one line.  The cases
cover each kernel template the dispatchers can pick: robust losses per-sample and
elementwise (register and streamed rows, 16-byte packs and element loads, mean / none
reductions), the consistency objective (cached and streamed rows), layer norm forward and
backward in each path (warp rows, two warps per row for 1025-2048 bf16/fp16, block rows;
no parameters, bias, bias without dx, weight + bias, from y, adaLN modulate; several
chunks; D = 0), and
ot_assign with the cost staged in shared memory and streamed, plus a padded batch.  Each
dtype is run where it selects a different kernel.  Shapes stay tiny so a memcheck run
takes seconds.  Exits 1 if a case raised; without a CUDA device (and no --dry-run) it
prints a line and exits 0.
"""

import argparse
import sys
import time

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}


def loss_cases(dev, be, L):
    fns = (L.cauchy_loss, L.pseudo_huber_loss, L.geman_mcclure_loss)
    for dt in DTYPES:
        # (2, 16): packs; (3, 7): element loads; (2, 40000): rows longer than the
        # registers hold (> 4 x 1024 packs of 4 fp32 / 8 bf16) -> streamed.
        for shape in ((2, 16), (3, 7), (2, 40000)):
            for ew in (False, True):
                for i, fn in enumerate(fns):
                    if shape[1] == 40000 and i > 0:
                        continue  # the kind is a runtime argument: one is enough for the long rows
                    red = "mean" if i != 1 else "none"

                    def case(shape=shape, ew=ew, fn=fn, red=red, dt=dt):
                        p = torch.randn(shape, device=dev).to(dt).requires_grad_()
                        t = torch.randn(shape, device=dev).to(dt)
                        w = torch.rand(shape[0], device=dev) if red == "none" else None
                        out = fn(p, t, 0.1, weight=w, reduction=red, elementwise=ew, backend=be)
                        out.sum().backward()

                    yield f"{fn.__name__} {SHORT[dt]} {shape} elementwise={ew} {red}", case


def objective_cases(dev, be, L):
    for dt in DTYPES:
        # (3, 16) cached rows; (2, 9) element loads; (2, 20000) streamed (> 2 x 1024 packs).
        for shape in ((3, 16), (2, 9), (2, 20000)):
            def case(shape=shape, dt=dt):
                s = torch.randn(shape, device=dev).to(dt).requires_grad_()
                t = torch.randn(shape, device=dev).to(dt)
                x0 = torch.randn(shape, device=dev).to(dt)
                w = torch.rand(shape[0], device=dev) + 0.5
                mask = torch.arange(shape[0], device=dev) % 2 == 0
                total, _cm, _diff = L.consistency_objective(s, t, x0, w, w, mask, 0.05, backend=be)
                total.backward()

            yield f"consistency_objective {SHORT[dt]} {shape}", case


# Row lengths per dtype: one per layer-norm kernel path (packs of 16 bytes, element loads).
def ln_widths(dt):
    if dt == torch.float32:  # 4 per pack: warp rows up to 1024
        return {"warp D=64": 64, "warp D=1024": 1024, "block D=1028": 1028,
                "warp unaligned D=7": 7, "block unaligned D=301": 301}
    # 8 per pack: warp rows up to 2048; 1025-2048 take two warps per row
    return {"warp D=64": 64, "warp D=768": 768, "warp 2/row D=1152": 1152,
            "block D=2056": 2056, "warp unaligned D=7": 7, "block unaligned D=301": 301}


def layer_norm_cases(dev, be, L):
    from lct_kernels.ops.layer_norm import layer_norm  # general LayerNorm (not re-exported)

    for dt in DTYPES:
        for label, D in ln_widths(dt).items():
            # 2 x 3 rows: one chunk; D = 64 also runs 1100 rows (3 chunks of 512 rows).
            for rows in ((2, 3), (2, 550)) if D == 64 else ((2, 3),):
                for params in ("none", "bias", "bias, no dx", "weight+bias", "from y", "modulate"):
                    if rows[1] > 3 and params not in ("weight+bias", "modulate"):
                        continue

                    def case(D=D, rows=rows, params=params, dt=dt):
                        x = torch.randn(*rows, D, device=dev).to(dt).requires_grad_(params != "bias, no dx")
                        w = (torch.rand(D, device=dev) + 0.5).to(dt).requires_grad_()
                        b = torch.randn(D, device=dev).to(dt).requires_grad_()
                        if params == "none":
                            y = L.non_scaling_layer_norm(x, D, backend=be)
                        elif params in ("bias", "bias, no dx"):  # no dx: partials only
                            y = L.non_scaling_layer_norm(x, D, bias=b, backend=be)
                        elif params == "weight+bias":
                            y = layer_norm(x, D, weight=w, bias=b, backend=be)
                        elif params == "from y":
                            y = L.non_scaling_layer_norm(x, D, bias=b, backend=be, memory_efficient=True)
                        else:
                            sh = torch.randn(rows[0], D, device=dev).to(dt).requires_grad_()
                            sc = (0.1 * torch.randn(rows[0], D, device=dev)).to(dt).requires_grad_()
                            y = L.nsln_modulate(x, sh, sc, bias=b, backend=be)
                        y.float().square().sum().backward()

                    yield f"layer_norm {SHORT[dt]} {label} rows={rows} {params}", case

    def empty_rows():  # D = 0: the raw backward returns empty results, launches nothing
        z = torch.zeros(4, 0, device=dev)
        stats = torch.zeros(4, device=dev)
        dx, p1, p2 = torch.ops.lct.layer_norm_bwd(z, z, stats, stats, None, None, None, 2,
                                                  False, True, True)
        assert dx.shape == (4, 0) and p1.shape == (2, 0) and p2.shape == (2, 0)

    yield "layer_norm_bwd raw D=0 M=4", empty_rows


def ot_cases(dev, be, L):
    def solve(shape, dt):
        def case():
            cost = torch.rand(shape, device=dev, dtype=dt)
            L.ot_assign(cost, backend=be)
        return case

    # (3, 16, 16) fp32 / fp64 and (2, 5, 9): staged in shared memory; (1, 200, 300) fp32
    # (234 KB) does not fit in one SM's shared memory: the cost streams from L2.
    yield "ot_assign fp32 (3, 16, 16) staged", solve((3, 16, 16), torch.float32)
    yield "ot_assign fp64 (2, 12, 12) staged", solve((2, 12, 12), torch.float64)
    yield "ot_assign fp32 (2, 5, 9) staged rectangular", solve((2, 5, 9), torch.float32)
    yield "ot_assign fp32 (1, 200, 300) streamed", solve((1, 200, 300), torch.float32)

    def padded():
        cost = torch.rand(3, 8, 10, device=dev)
        sizes = torch.tensor([[8, 10], [3, 5], [0, 0]], device=dev)
        _x, _u, _v, status = torch.ops.lct.ot_assign(cost, sizes)
        assert (status.cpu() == 0).all(), status

    yield "ot_assign raw fp32 (3, 8, 10) padded sizes", padded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run the cases on CPU tensors through the default backends")
    ap.add_argument("-k", default="", help="only cases whose name contains this text")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device: nothing to sanitize")
        return 0
    import lct_kernels as L

    dev, be = ("cpu", None) if a.dry_run else ("cuda", "cuda")
    sync = (lambda: None) if a.dry_run else torch.cuda.synchronize
    torch.manual_seed(0)
    failed, n, t_all = [], 0, time.perf_counter()
    for family in (loss_cases, objective_cases, layer_norm_cases, ot_cases):
        for name, case in family(dev, be, L):
            if a.k not in name:
                continue
            n += 1
            t0 = time.perf_counter()
            try:
                case()
                sync()
                status, why = "ok", ""
            except Exception as exc:  # noqa: BLE001 - report every case, fail at the end
                status, why = "FAIL", f"  {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                failed.append(name)
            print(f"{status:<4} {(time.perf_counter() - t0) * 1e3:8.1f} ms  {name}{why}", flush=True)
    where = "CPU dry run" if a.dry_run else torch.cuda.get_device_name()
    print(f"sanitize_cuda: {n - len(failed)}/{n} cases ok on {where} in "
          f"{time.perf_counter() - t_all:.1f} s")
    return 1 if failed or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
