"""Resource usage of every CUDA kernel in a built ``_C_cuda`` extension, for sm_90 (no GPU needed).

    python benchmarks/cuda_resources.py build-cuda/lib/lct_kernels [--write docs/gpu_resources.md]

Reads the extension's embedded cubins with ``cuobjdump`` (the toolkit's, else the copy
Triton ships): ``-res-usage`` gives registers, stack, local and static shared memory per
kernel; ``-sass`` gives the spill instructions (STL / LDL: local stores / loads; the
kernels have no local arrays, so any is a spill); ``-elf`` gives the launch bound
(EIATTR_MAX_THREADS).  Each template instantiation is mapped to what the host dispatcher
sends to it (op, dtype, vector width, row-length range), and the blocks per SM follow from
the sm_90 limits at the block size the dispatcher launches.

Prints the table and, with --write, puts it between ``<!-- BEGIN cuda -->`` and
``<!-- END cuda -->`` in the given markdown file (created with both marker pairs if absent).
Exits 1 when a layer-norm or robust-loss kernel that serves the DiT widths (384, 768, 1024,
1152) or the qk-norm case (D = 64) spills, or when no sm_90 kernel is found.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ARCH = "sm_90"
HEADLINE_D = (64, 384, 768, 1024, 1152)
# sm_90 (H100 / H200) limits.
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM, BLOCK_SMEM_RESERVED, REG_UNIT = 65536, 64, 32, 233472, 1024, 256
DTYPES = {"float": ("fp32", 4), "c10::Half": ("fp16", 2), "c10::BFloat16": ("bf16", 2),
          "double": ("fp64", 8)}
# Measured on the tree before the register work (commit d632953, torch 2.11.0, nvcc 13.0,
# sm_90), kept to show the change: kernel -> (regs, spill st/ld, blocks/SM, kernel after).
BEFORE = {
    "ln_bwd_warp_kernel<bf16, 8, 8>": (206, "0/0", 1, "ln_bwd_warp_kernel<bf16, 8, 4, 2>"),
    "ln_bwd_warp_kernel<fp16, 8, 8>": (206, "0/0", 1, "ln_bwd_warp_kernel<fp16, 8, 4, 2>"),
    "ln_bwd_warp_kernel<fp32, 4, 8>": (128, "0/0", 2, "ln_bwd_warp_kernel<fp32, 4, 8, 1>"),
    "robust_loss_kernel<bf16, 8, true>": (64, "1/2", 16, "robust_loss_kernel<bf16, 8, true>"),
    "robust_loss_kernel<fp16, 8, true>": (64, "1/2", 16, "robust_loss_kernel<fp16, 8, true>"),
}

# Spills outside the gated kernels, explained (checked against ptxas -v for these sources).
EXPLAINED = {
    "objective_kernel<bf16, 8>": "3 values parked in local memory once per thread across the "
                                 "row reductions (one STL, one LDL each), at the 64-register "
                                 "cap of 1024-thread blocks; not in a loop",
    "objective_kernel<fp16, 8>": "as bf16",
    "lap_kernel<fp32>": "not register pressure (48 regs): the 32-byte ABI stack frame of the "
                        "non-inlined block-reduction calls (ptxas: 28 B spill stores, 40 B loads)",
    "lap_kernel<fp64>": "as fp32",
}


def find_cuobjdump():
    """The toolkit's cuobjdump, else Triton's copy (this venv's, then the repo's .venv)."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             shutil.which("cuobjdump") or ""]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for prefix in (sys.prefix, os.path.join(here, ".venv"), os.path.join(here, ".venv-cuda")):
        cands += glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "triton",
                                        "backends", "nvidia", "bin", "cuobjdump"))
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("cuda_resources: no cuobjdump found (set CUDA_HOME, or install triton)")


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cuda_resources: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        sys.exit("cuda_resources: c++filt (binutils) is needed to demangle kernel names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def parse_res_usage(text):
    """{mangled: {REG, STACK, SHARED, LOCAL}} for the sm_90 cubins in cuobjdump -res-usage."""
    res, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):$", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            if arch in (None, ARCH):  # a lone cubin prints no arch line
                res[fn] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return res


def parse_sass_spills(text):
    """{mangled: (STL count, LDL count)} from cuobjdump -sass."""
    out, fn = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            out[fn] = [0, 0]
        elif fn:
            if re.search(r"\bSTL(\.\w+)*\b", line):
                out[fn][0] += 1
            elif re.search(r"\bLDL(\.\w+)*\b", line):
                out[fn][1] += 1
    return {k: tuple(v) for k, v in out.items()}


def parse_max_threads(text):
    """{mangled: max threads per block (launch bound)} from cuobjdump -elf."""
    out, fn, want = {}, None, False
    for line in text.splitlines():
        if line.startswith(".nv.info._Z"):
            fn, want = line[len(".nv.info."):].strip(), False
        elif fn and "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and "Value:" in line:
            out[fn] = int(line.split()[1], 16)
            want = False
    return out


def signature(demangled):
    """('ln_bwd_warp_kernel', ['c10::BFloat16', '8', '4', '2']) from a demangled name."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "").strip()
    head = re.sub(r"^.*::", "", head.split("<")[0]) + ("<" + head.split("<", 1)[1] if "<" in head else "")
    m = re.match(r"(\w+)(?:<(.*)>)?$", head)
    args = [a.strip() for a in m.group(2).split(",")] if m.group(2) else []
    return m.group(1), args


def threads_for(n_packs, items=4, max_threads=1024):  # csrc/cuda/row_kernels.cuh
    want, t = (n_packs + items - 1) // items, 32
    while t < want and t < max_threads:
        t *= 2
    return t


def d_range(total_items, vec):
    """Row lengths served by a warp-per-row kernel holding total_items packs per lane."""
    lo = 1 if total_items == 1 else 16 * total_items * vec + vec
    return lo, 32 * total_items * vec


def describe(name, args):
    """(op, dtype, served range text, served predicate on D, block threads at D, reachable)."""
    dt, size = DTYPES.get(args[0], (args[0], 0)) if args else ("fp32", 4)
    reachable = dt != "fp64" or name == "lap_kernel"  # LCT_DISPATCH_KERNEL_TYPES refuses double
    vec = int(args[1]) if len(args) > 1 and name != "lap_kernel" else 1
    native = vec > 1
    align = "16-byte packs" if native else "unaligned (element loads)"

    def mult(d):
        return d % vec == 0 if native else True

    if name in ("ln_fwd_warp_kernel", "ln_bwd_warp_kernel"):
        total = int(args[2]) * (int(args[3]) if len(args) > 3 else 1)
        lo, hi = d_range(total, vec)
        split = f", {args[3]} warps per row" if len(args) > 3 and args[3] != "1" else ""
        op = "layer_norm fwd" if "fwd" in name else "layer_norm bwd"
        return (op, dt, f"D {lo}-{hi}, {align}{split}", lambda d: lo <= d <= hi and mult(d),
                lambda d: 256, reachable)
    if name in ("ln_fwd_block_kernel", "ln_bwd_block_kernel"):
        lo = 256 * vec + vec
        op = "layer_norm fwd" if "fwd" in name else "layer_norm bwd"
        return (op, dt, f"D >= {lo}, {align}", lambda d: d >= lo and mult(d),
                lambda d: threads_for(d // vec), reachable)
    if name == "ln_reduce_partials_kernel":
        return ("layer_norm bwd (weight/bias grads)", "fp32 partials", "all D", lambda d: True,
                lambda d: 256, True)
    if name == "robust_loss_kernel":
        kind = "elementwise" if args[2] == "true" else "per-sample"
        return (f"robust_loss {kind}", dt, f"rows of N, {align}", lambda d: mult(d),
                lambda d: threads_for(d // vec), reachable)
    if name == "reduce_loss_kernel":
        return ("robust_loss mean/sum", "fp32", "all B", lambda d: True, lambda d: 1024, True)
    if name == "objective_kernel":
        return ("consistency_objective", dt, f"rows of N, {align}", lambda d: mult(d),
                lambda d: threads_for(d // vec, items=2), reachable)
    if name in ("mask_count_kernel", "finalize_kernel"):
        return ("consistency_objective", "fp32", "all B", lambda d: True, lambda d: 1024, True)
    if name == "lap_kernel":
        return ("ot_assign", dt, "all (N, M); cost staged in dynamic smem when it fits",
                lambda d: True, lambda d: None, True)
    return (name, dt, "?", lambda d: True, lambda d: None, reachable)


def blocks_per_sm(regs, smem, threads):
    warps = (threads + 31) // 32
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = (SM_REGS // per_warp) // warps if per_warp else SM_BLOCKS
    by_smem = SM_SMEM // (smem + BLOCK_SMEM_RESERVED)
    return min(SM_BLOCKS, SM_WARPS // warps, by_regs, by_smem)


def collect(folder):
    (so,) = glob.glob(os.path.join(folder, "_C_cuda*.so")) or [None]
    if so is None:
        sys.exit(f"cuda_resources: no _C_cuda*.so in {folder} (build it: make cuda-check)")
    tool = find_cuobjdump()
    res = parse_res_usage(run([tool, "-res-usage", "-arch", ARCH, so]))
    if not res:
        sys.exit(f"cuda_resources: no {ARCH} kernel in {so} (TORCH_CUDA_ARCH_LIST must include 9.0)")
    spills = parse_sass_spills(run([tool, "-sass", "-arch", ARCH, so]))
    bounds = parse_max_threads(run([tool, "-elf", "-arch", ARCH, so]))
    names = demangle(sorted(res))
    rows = []
    for mangled, r in res.items():
        name, args = signature(names[mangled])
        op, dt, served, serves, block, reachable = describe(name, args)
        stl, ldl = spills.get(mangled, (0, 0))
        short = f"{name}<{', '.join([dt] + args[1:])}>" if args else name
        rows.append(dict(kernel=short, name=name, op=op, dtype=dt, served=served, serves=serves,
                         block=block, reachable=reachable, regs=r["REG"], stack=r.get("STACK", 0),
                         local=r.get("LOCAL", 0), smem=r.get("SHARED", 0), stl=stl, ldl=ldl,
                         max_threads=bounds.get(mangled, 1024)))
    rows.sort(key=lambda x: (x["op"], x["dtype"], x["kernel"]))
    return so, tool, rows


def spilled(row):
    return row["stl"] > 0 or row["ldl"] > 0 or row["local"] > 0


def gated(row):
    """Layer-norm and robust-loss kernels reached by a DiT width or D = 64 (reachable dtypes)."""
    return (row["reachable"] and (row["op"].startswith("layer_norm") or row["op"].startswith("robust"))
            and any(row["serves"](d) for d in HEADLINE_D))


def spill_text(row):
    return f"{row['stl']}/{row['ldl']}" + (f" ({row['local']} B local)" if row["local"] else "")


def markdown(so, tool, rows):
    lines = [
        f"Generated by `make cuda-check` (benchmarks/cuda_resources.py) from `{os.path.basename(so)}` "
        f"({ARCH} cubins, read with `{os.path.basename(os.path.dirname(tool))}/cuobjdump`; no GPU). "
        "regs and static smem from `-res-usage`; spills are the STL/LDL (local store/load) "
        "instructions in the SASS (no kernel has a local array, so they are register spills, "
        "or the ABI stack of a non-inlined call: see the notes); max threads is the launch bound; blocks/SM is what sm_90 fits "
        "(64K registers in 256-register units per warp, 64 warps, 32 blocks, 228 KB shared) at "
        "the block size the dispatcher launches (for row kernels sized by the row, the block "
        "at the largest headline width served, else 1024). fp64 instantiations come from "
        "AT_DISPATCH but are refused by the op (unreachable). The build fails if a "
        "layer-norm or robust-loss kernel serving D in {64, 384, 768, 1024, 1152} spills.",
        "",
        "Headline configurations (reachable dtypes, aligned rows):",
        "",
        "| op | dtype | D | kernel | regs | spill st/ld | smem (B) | block | blocks/SM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    head = []
    for r in rows:
        if not (r["reachable"] and r["op"].startswith("layer_norm") and r["name"] != "ln_reduce_partials_kernel"):
            continue
        if "unaligned" in r["served"]:
            continue
        for d in list(HEADLINE_D) + [2048]:
            if r["serves"](d):
                t = r["block"](d)
                head.append(((r["op"], r["dtype"], d),
                             f"| {r['op']} | {r['dtype']} | {d} | {r['kernel']} | {r['regs']} | {spill_text(r)} "
                             f"| {r['smem']} | {t} | {blocks_per_sm(r['regs'], r['smem'], t)} |"))
    lines += [line for _key, line in sorted(head)]
    lines += ["", "Register work (before: commit d632953, same toolchain; blocks/SM at 256 threads for "
              "the layer-norm rows, 64 for the loss rows of 4096 bf16):", "",
              "| kernel before | regs | spill st/ld | blocks/SM | kernel after | regs | spill st/ld | blocks/SM |",
              "|---|---|---|---|---|---|---|---|"]
    after = {r["kernel"]: r for r in rows}
    for old, (regs, sp, blocks, new) in BEFORE.items():
        r = after.get(new)
        if r is not None:
            t = 256 if new.startswith("ln_") else 64
            lines.append(f"| {old} | {regs} | {sp} | {blocks} | {new} | {r['regs']} | {spill_text(r)} | "
                         f"{blocks_per_sm(r['regs'], r['smem'], t)} |")
    lines += ["", "Every kernel:", "",
              "| kernel | op | serves | regs | spill st/ld | stack (B) | smem (B) | max threads | block | blocks/SM | gated | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ds = [d for d in HEADLINE_D if r["serves"](d)]
        t = r["block"](max(ds)) if ds and r["block"](max(ds)) else r["max_threads"]
        t = min(t, r["max_threads"])
        reach = "" if r["reachable"] else " (unreachable)"
        lines.append(f"| {r['kernel']} | {r['op']}{reach} | {r['served']} | {r['regs']} | {spill_text(r)} | "
                     f"{r['stack']} | {r['smem']} | {r['max_threads']} | {t} | "
                     f"{blocks_per_sm(r['regs'], r['smem'], t)} | {'yes' if gated(r) else ''} | "
                     f"{EXPLAINED.get(r['kernel'], '') if spilled(r) else ''} |")
    return "\n".join(lines) + "\n"


def write_section(path, body):
    text = open(path).read() if os.path.exists(path) else (
        "# GPU resource usage per kernel\n\n## CUDA kernels\n\n<!-- BEGIN cuda -->\n<!-- END cuda -->\n\n"
        "## Triton kernels\n\n<!-- BEGIN triton -->\n<!-- END triton -->\n")
    begin, end = "<!-- BEGIN cuda -->", "<!-- END cuda -->"
    if begin not in text or end not in text:
        sys.exit(f"cuda_resources: {path} lacks the {begin} / {end} markers")
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + body + end + tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="folder holding the built _C_cuda*.so")
    ap.add_argument("--write", metavar="MD", help="markdown file whose cuda section is replaced")
    a = ap.parse_args(argv)
    so, tool, rows = collect(a.folder)
    body = markdown(so, tool, rows)
    print(body)
    if a.write:
        write_section(a.write, body)
        print(f"cuda_resources: wrote the cuda section of {a.write}")
    loose = [r["kernel"] for r in rows if spilled(r) and not gated(r) and r["reachable"]
             and r["kernel"] not in EXPLAINED]
    if loose:
        print("cuda_resources: note: unexplained spills outside the gated kernels: " + ", ".join(loose))
    bad = [r["kernel"] for r in rows if gated(r) and spilled(r)]
    if bad:
        print("cuda_resources: FAIL: spills in kernels serving the headline widths: " + ", ".join(bad))
        return 1
    print(f"cuda_resources: OK: {len(rows)} {ARCH} kernels, {sum(gated(r) for r in rows)} gated, none spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
