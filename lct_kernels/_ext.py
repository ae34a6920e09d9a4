"""Loading of the compiled extensions, with the reason whenever one is missing.

Two shared libraries may sit next to this file:
    _C       the operator schemas (TORCH_LIBRARY(lct)) and the C++ CPU kernels
    _C_cuda  the CUDA kernels (TORCH_LIBRARY_IMPL(lct, CUDA)); needs _C first
setup.py writes ``_build_info.json`` beside them.  An extension built against a
different torch is not loaded at all (its ABI would not match): the status says
how to rebuild instead.  Importing lct_kernels never fails because of this.
"""

import importlib
import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD_HINT = "rebuild with: pip install --no-build-isolation --no-deps --force-reinstall -e ."


class ExtensionStatus:
    """What happened when loading one compiled library."""

    def __init__(self, name):
        self.name = name
        self.loaded = False
        self.reason = "not attempted"
        self.module = None

    def as_dict(self):
        out = {"loaded": self.loaded, "reason": self.reason}
        if self.module is not None:
            out["built_with_torch"] = getattr(self.module, "torch_version", "?")
            out["compiler"] = getattr(self.module, "compiler", "?")
            archs = getattr(self.module, "cuda_archs", "")
            if archs:
                out["cuda_archs"] = archs
        return out


def read_build_info():
    """The JSON record setup.py wrote at build time, or None."""
    path = os.path.join(_HERE, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _library_present(name):
    return any(f.startswith(name + ".") and f.endswith((".so", ".pyd")) for f in os.listdir(_HERE))


def _load(name, build_info):
    status = ExtensionStatus(name)
    if not _library_present(name):
        if build_info is None:
            status.reason = f"not built (no {name}*.so next to lct_kernels); {REBUILD_HINT}"
        elif name not in build_info.get("variants", []):
            status.reason = f"not built: {build_info.get('cuda', 'not requested')}"
        else:
            status.reason = f"build record lists {name} but the library is missing; {REBUILD_HINT}"
        return status
    built_for = (build_info or {}).get("torch_version")
    if built_for is not None and built_for != torch.__version__:
        status.reason = (
            f"built against torch {built_for} but torch {torch.__version__} is running; "
            + REBUILD_HINT
        )
        return status
    try:
        module = importlib.import_module(f"lct_kernels.{name}")
    except (ImportError, OSError) as exc:  # undefined symbols, missing CUDA libraries, ...
        status.reason = f"failed to load: {exc}; {REBUILD_HINT}"
        return status
    embedded = getattr(module, "torch_version", None)
    if embedded not in (None, "unknown", torch.__version__):
        status.reason = (
            f"loaded, but compiled against torch {embedded} while torch {torch.__version__} "
            "is running; " + REBUILD_HINT
        )
        return status
    status.module = module
    status.loaded = True
    status.reason = "loaded"
    return status


BUILD_INFO = read_build_info()
CPU_EXT = _load("_C", BUILD_INFO)
if CPU_EXT.loaded:
    CUDA_EXT = _load("_C_cuda", BUILD_INFO)
else:
    CUDA_EXT = ExtensionStatus("_C_cuda")
    CUDA_EXT.reason = "not loaded because _C (the operator schemas) is missing: " + CPU_EXT.reason
