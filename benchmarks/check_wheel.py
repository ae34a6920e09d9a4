"""Checks of a built lct_kernels wheel (``make wheel`` and ``make wheel-check``).

    python benchmarks/check_wheel.py --contents dist/lct_kernels-*.whl --source lct_kernels
        The wheel holds every package directory and every .py file under the
        source package, the compiled CPU extension ``lct_kernels/_C*.so`` and
        ``_build_info.json``, and nothing from outside lct_kernels/ except its
        metadata.  A subpackage left out of the build fails here.

    python check_wheel.py --installed        (inside the wheel's venv, outside the tree)
        lct_kernels is imported from site-packages, ``python -m lct_kernels``
        reports ``_C`` loaded, every public op runs once on the C++ CPU backend
        (forward and backward) and matches an independent float64 computation,
        and ``lct-train --preset demo --steps 20`` completes.

Exits non-zero with a message naming the failed check.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fail(msg):
    sys.exit(f"check_wheel: FAILED: {msg}")


# --------------------------------------------------------------------------- contents
def source_packages(src):
    """Every folder under ``src`` (the package root) that holds a .py file, and those .py files,
    as wheel-relative posix paths (``lct_kernels/train/cli.py``)."""
    src = Path(src).resolve()
    base = src.parent
    folders, files = set(), set()
    for path in src.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(base).as_posix()
        files.add(rel)
        folders.add(path.parent.relative_to(base).as_posix())
    return folders, files


def check_contents(wheels, src):
    if len(wheels) != 1:
        fail(f"--contents: expected exactly one wheel, got {wheels}")
    wheel = wheels[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    folders, files = source_packages(src)
    missing_pkgs = sorted(f for f in folders if not any(n.startswith(f + "/") for n in names))
    if missing_pkgs:
        fail(f"{wheel} lacks the package folders {missing_pkgs} (is [tool.setuptools.packages.find] "
             "in pyproject.toml finding them?)")
    missing = sorted(files - names)
    if missing:
        fail(f"{wheel} lacks the source files {missing}")
    ext = [n for n in names if re.fullmatch(r"lct_kernels/_C\.[^/]*\.so", n)]
    if not ext:
        fail(f"{wheel} holds no compiled CPU extension lct_kernels/_C*.so")
    if "lct_kernels/_build_info.json" not in names:
        fail(f"{wheel} holds no lct_kernels/_build_info.json")
    info = json.loads(zipfile.ZipFile(wheel).read("lct_kernels/_build_info.json"))
    if "_C" not in info.get("variants", []):
        fail(f"{wheel}: _build_info.json lists variants {info.get('variants')}, not _C")
    stray = sorted(n for n in names if not n.startswith(("lct_kernels/", "lct_kernels-")))
    if stray:
        fail(f"{wheel} holds files outside lct_kernels/: {stray[:10]}")
    print(f"check_wheel: {Path(wheel).name}: {len(folders)} packages, {len(files)} .py files, "
          f"{ext[0]} (torch {info.get('torch_version')}), _build_info.json: ok")


# --------------------------------------------------------------------------- installed
def close(name, got, want, atol=1e-5, rtol=1e-5):
    import torch

    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        fail(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        fail(f"{name}: max abs error {(got - want).abs().max().item():.3g} vs float64 reference")


def check_import():
    import lct_kernels

    where = Path(lct_kernels.__file__).resolve()
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if not any(s in where.parents for s in site):
        fail(f"lct_kernels was imported from {where}, not from this venv's site-packages "
             f"{sorted(map(str, site))}")
    info = lct_kernels.backend_info()
    if not info["extensions"]["_C"]["loaded"]:
        fail(f"_C is not loaded: {info['extensions']['_C']['reason']}")
    out = subprocess.run([sys.executable, "-m", "lct_kernels"], capture_output=True, text=True)
    if out.returncode != 0 or not re.search(r"^\s*_C\s+yes\s+loaded", out.stdout, re.M):
        fail(f"`python -m lct_kernels` does not show _C loaded:\n{out.stdout}\n{out.stderr}")
    print(f"check_wheel: lct_kernels from {where.parent}; `python -m lct_kernels`: _C loaded")


def rho64(kind, m, c):
    """The three robust losses on the per-sample mean squared error m (float64)."""
    import torch

    if kind == "cauchy":
        return torch.log(1 + m / (2 * c * c))
    if kind == "pseudo_huber":
        return torch.sqrt(m + c * c) - c
    return 2 * m / (m + 4 * c * c)  # geman_mcclure


def check_ops():
    import torch

    import lct_kernels as L
    import lct_kernels.nn as lnn

    torch.manual_seed(0)
    B, D, c = 4, 24, 0.3
    pred = torch.randn(B, D, requires_grad=True)
    target = torch.randn(B, D)
    ran = []
    for kind, fn, mod in (("cauchy", L.cauchy_loss, lnn.CauchyLoss),
                          ("pseudo_huber", L.pseudo_huber_loss, lnn.PseudoHuberLoss),
                          ("geman_mcclure", L.geman_mcclure_loss, lnn.GemanMcClureLoss)):
        p64 = pred.detach().double().requires_grad_()
        want = rho64(kind, (p64 - target.double()).pow(2).mean(1), c).mean()
        want.backward()
        got = fn(pred, target, c, backend="cpu")
        (g,) = torch.autograd.grad(got, pred)
        close(fn.__name__, got, want)
        close(fn.__name__ + " grad", g, p64.grad)
        close(mod.__name__, mod(c, backend="cpu")(pred, target), want)
        ran += [fn.__name__, mod.__name__]

    # consistency objective: mean_i w_i rho(m_i) + coef * sum(mask dw e) / sum(mask)
    student = torch.randn(B, D, requires_grad=True)
    teacher, x0 = torch.randn(B, D), torch.randn(B, D)
    w, dw = torch.rand(B) + 0.5, torch.rand(B) + 0.5
    mask = torch.tensor([True, False, True, False])
    s64 = student.detach().double().requires_grad_()
    m = (s64 - teacher.double()).pow(2).mean(1)
    e = (s64 - x0.double()).pow(2).mean(1)
    want = (w.double() * rho64("cauchy", m, c)).mean() + 5.0 * (
        (mask.double() * dw.double() * e).sum() / mask.double().sum())
    want.backward()
    total, _, _ = L.consistency_objective(student, teacher, x0, w, dw, mask, c, loss="cauchy",
                                          diff_coef=5.0, backend="cpu")
    (g,) = torch.autograd.grad(total, student)
    close("consistency_objective", total, want)
    close("consistency_objective grad", g, s64.grad)
    ran.append("consistency_objective")

    # NsLN and the fused NsLN + adaLN modulate
    T, eps = 5, 1e-6
    x = torch.randn(B, T, D, requires_grad=True)
    bias = torch.randn(D, requires_grad=True)
    shift, scale = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    leaves = (x, bias, shift, scale)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    xd = l64[0]
    xhat = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + eps)
    want_ns = xhat + l64[1]
    want_mod = want_ns * (1 + l64[3][:, None]) + l64[2][:, None]
    close("non_scaling_layer_norm", L.non_scaling_layer_norm(x, D, bias, eps, backend="cpu"), want_ns)
    got = L.nsln_modulate(x, shift, scale, bias, eps, backend="cpu")
    close("nsln_modulate", got, want_mod)
    up = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, up)
    want_grads = torch.autograd.grad(want_mod, l64, up.double())
    for name, g, gw in zip(("x", "bias", "shift", "scale"), grads, want_grads):
        close(f"nsln_modulate grad {name}", g, gw, atol=1e-4)
    ln = lnn.FusedLayerNorm(D)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    close("FusedLayerNorm", ln(x), xhat * ln.weight.double() + ln.bias.double(), atol=1e-4)
    ns = lnn.NonScalingLayerNorm(D)
    close("NonScalingLayerNorm", ns(x), xhat.detach() + ns.bias.double(), atol=1e-4)
    model = torch.nn.Sequential(torch.nn.LayerNorm(D))
    if lnn.patch_layernorms(model) != 1 or lnn.unpatch_layernorms(model) != 1:
        fail("patch_layernorms / unpatch_layernorms did not swap the one LayerNorm")
    mod = lnn.NsLNModulate(D, eps=eps, bias=True)
    mod.backend = "cpu"
    with torch.no_grad():
        mod.bias.copy_(bias)
    close("NsLNModulate", mod(x, shift, scale), want_mod)
    ran += ["non_scaling_layer_norm", "nsln_modulate", "FusedLayerNorm", "NonScalingLayerNorm",
            "NsLNModulate", "patch_layernorms", "unpatch_layernorms"]

    # exact assignment: the optimum of a brute force over all permutations
    n = 6
    cost = torch.rand(n, n, dtype=torch.float64)
    best = min(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
    cols = L.ot_assign(cost, backend="cpu")
    if sorted(cols.tolist()) != list(range(n)):
        fail(f"ot_assign: columns {cols.tolist()} are not a permutation")
    if abs(cost[torch.arange(n), cols].sum().item() - best) > 1e-9:
        fail("ot_assign: the assignment is not optimal")
    x0, x1 = torch.randn(n, 3), torch.randn(n, 3)
    sq = torch.cdist(x0.double(), x1.double()) ** 2
    best = min(sum(sq[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
    perm = L.ot_couple(x0, x1, backend="cpu")
    if abs(sq[torch.arange(n), perm].sum().item() - best) > 1e-6:
        fail("ot_couple: the coupling is not optimal")
    a, b = L.ot.OTPlanSampler(method="exact", backend="cpu").sample_plan(x0, x1, replace=False)
    if abs(((a.double() - b.double()) ** 2).sum().item() - best) > 1e-5:
        fail("ot.OTPlanSampler(method='exact'): the pairs are not the optimal coupling")
    ran += ["ot_assign", "ot_couple", "ot.OTPlanSampler"]
    print(f"check_wheel: {len(ran)} public ops and modules match float64 references: "
          + ", ".join(ran))


def check_train():
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="lct-wheel-") as tmp:
        out = Path(tmp) / "run"
        # the user's digits cache (~/.cache/lct_kernels or $LCT_CACHE_DIR), as the command
        # would use it; stage 1 trains the autoencoder only if the cache is missing
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        cmd = [str(bin_dir / "lct-train"), "--preset", "demo", "--steps", "20", "--out", str(out),
               "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        summary = json.loads((out / "summary.json").read_text())
        if summary.get("step") != 20 or not list((out / "samples").glob("*.png")):
            fail(f"lct-train: summary {summary}, samples {list((out / 'samples').iterdir())}")
        print(f"check_wheel: lct-train --preset demo --steps 20: {summary['status']} at step "
              f"{summary['step']}, samples written")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contents", nargs="+", metavar="WHEEL", help="check a wheel's file list")
    p.add_argument("--source", default=str(REPO / "lct_kernels"), help="the source package folder")
    p.add_argument("--installed", action="store_true", help="check the installed wheel")
    args = p.parse_args(argv)
    if not args.contents and not args.installed:
        p.error("give --contents WHEEL and/or --installed")
    if args.contents:
        check_contents(args.contents, args.source)
    if args.installed:
        check_import()
        check_ops()
        check_train()
    print("check_wheel: ok")


if __name__ == "__main__":
    main()
