"""The public API is reachable after a bare ``import lct_kernels``.

The checks run in one fresh interpreter: in this test process other tests (and
conftest) have already imported the subpackages, which would hide a missing
import in lct_kernels/__init__.py."""

import json
import subprocess
import sys

import pytest

HEAVY = ("ot", "scipy", "torchcfm", "timm", "lct_kernels.train")  # "ot" is POT

PROBE = f"""
import json, sys
import lct_kernels as lk
report = {{}}
try:
    report["sampler"] = type(lk.ot.OTPlanSampler(method="exact")).__module__
except AttributeError as exc:
    report["sampler"] = repr(exc)
report["missing"] = [n for n in lk.__all__ if not hasattr(lk, n)]
if hasattr(lk, "ot"):
    report["missing"] += ["ot." + n for n in lk.ot.__all__ if not hasattr(lk.ot, n)]
report["missing"] += ["nn." + n for n in lk.nn.__all__ if not hasattr(lk.nn, n)]
report["patch_dit"] = getattr(getattr(lk.nn, "patch_dit", None), "__module__", None)
report["loaded"] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_import():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ot_is_an_attribute_after_a_bare_import(fresh_import):
    assert fresh_import["sampler"] == "lct_kernels.ot.sampler"


def test_every_name_in_all_is_an_attribute_after_a_bare_import(fresh_import):
    assert fresh_import["missing"] == []
    assert fresh_import["patch_dit"] == "lct_kernels.nn.dit"


def test_bare_import_stays_light(fresh_import):
    # POT, SciPy, torchcfm, timm and the trainer are imported only when used
    assert fresh_import["loaded"] == []
