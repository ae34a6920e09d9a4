"""Load an out-of-tree CUDA build of lct_kernels and check its registrations (no GPU needed).

    python benchmarks/check_cuda_build.py build-cuda/lib/lct_kernels
"""

import glob
import json
import os
import sys

import torch


def main(folder):
    info = json.load(open(os.path.join(folder, "_build_info.json")))
    assert "_C_cuda" in info["variants"], info
    for name in ("_C", "_C_cuda"):  # schemas first, then the CUDA kernels
        (path,) = glob.glob(os.path.join(folder, name + ".*.so"))
        torch.ops.load_library(path)
    ops = ("lct::robust_loss", "lct::consistency_objective", "lct::layer_norm_fwd",
           "lct::layer_norm_bwd", "lct::ot_assign")
    for op in ops:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    print(f"CUDA build OK: torch {torch.__version__}, archs {info['cuda_archs']}, "
          f"{len(ops)} ops have CPU and CUDA kernels")


if __name__ == "__main__":
    main(sys.argv[1])
