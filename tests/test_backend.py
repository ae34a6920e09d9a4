"""Specification of backend discovery, selection, reporting and extension loading."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import lct_kernels as L
from lct_kernels import _backend, _ext
from helpers import HAS_TRITON_CPU

HAS_CPU_EXT = _ext.CPU_EXT.loaded


def which_backend_ran(out):
    """The registered op behind a (B,) loss from reduction='none' and no weight."""
    name = getattr(out.grad_fn, "lct_op", type(out.grad_fn).__name__)
    if "triton_robust_loss" in name:
        return "triton"
    if "robust_loss" in name:
        return "compiled"
    return "torch"


def run_loss(**kw):
    pred = torch.randn(3, 8, requires_grad=True)
    return L.cauchy_loss(pred, torch.randn(3, 8), 0.1, reduction="none", **kw)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="compiled CPU extension not built")
def test_cpu_tensors_use_the_compiled_cpu_op_by_default():
    assert which_backend_ran(run_loss()) == "compiled"


def test_backend_argument_forces_a_backend():
    assert which_backend_ran(run_loss(backend="torch")) == "torch"
    if HAS_TRITON_CPU:
        assert which_backend_ran(run_loss(backend="triton")) == "triton"


def test_lct_backend_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("LCT_BACKEND", "torch")
    assert which_backend_ran(run_loss()) == "torch"
    monkeypatch.setenv("LCT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="LCT_BACKEND must be one of"):
        run_loss()


def test_forced_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    with pytest.raises(L.BackendUnavailable, match="backend 'cuda' is unavailable: the cuda backend runs on cuda tensors"):
        run_loss(backend="cuda")
    monkeypatch.setitem(_backend._COMPILED, ("robust_loss", "cpu"), (False, "simulated: no _C"))
    with pytest.raises(L.BackendUnavailable, match="simulated: no _C"):
        run_loss(backend="cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = _backend.status("robust_loss", "triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason


def test_automatic_fallback_warns_once_and_names_the_reason(monkeypatch):
    monkeypatch.setitem(_backend._COMPILED, ("robust_loss", "cpu"), (False, "simulated missing"))
    monkeypatch.setattr(_backend, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="falls back to the 'torch' backend.*simulated missing"):
        out = run_loss()
    assert which_backend_ran(out) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_loss()  # second call: no warning


def test_backend_info_reports_versions_extensions_and_backends():
    info = L.backend_info()
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["extensions"]) == {"_C", "_C_cuda"}
    for ext in info["extensions"].values():
        assert isinstance(ext["loaded"], bool) and ext["reason"]
    for op in ("robust_loss", "consistency_objective"):
        cpu = info["backends"][op]["cpu"]
        assert cpu["torch"]["usable"] is True
        assert cpu["cpu"]["usable"] is HAS_CPU_EXT
        cuda = info["backends"][op]["cuda"]
        if not torch.cuda.is_available():
            assert not cuda["cuda"]["usable"] and cuda["cuda"]["reason"]
    text = L.format_backend_info(info)
    assert "Compiled extensions" in text and "robust_loss" in text


def test_python_dash_m_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "lct_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert "lct_kernels environment" in out and "_C" in out
    js = subprocess.run([sys.executable, "-m", "lct_kernels", "--json"], capture_output=True,
                        text=True, check=True).stdout
    assert json.loads(js)["versions"]["torch"] == torch.__version__


def test_extension_built_for_another_torch_is_not_loaded_and_says_rebuild():
    status = _ext._load("_C", {"torch_version": "1.0.0", "variants": ["_C"]})
    assert not status.loaded
    assert "built against torch 1.0.0" in status.reason and "rebuild" in status.reason


def test_missing_extension_reports_why():
    status = _ext._load("_C_nonexistent", {"variants": ["_C"], "cuda": "skipped: LCT_BUILD_CUDA=0"})
    assert not status.loaded and "not built: skipped: LCT_BUILD_CUDA=0" in status.reason


def test_import_never_fails_without_the_extension(tmp_path):
    """A copy of the package without any compiled library still imports and computes."""
    src = os.path.dirname(L.__file__)
    dst = tmp_path / "lct_kernels"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "_build_info.json",
                                                            "__pycache__"))
    code = (
        "import warnings, torch, lct_kernels as L\n"
        "assert L.__file__.startswith(%r)\n"
        "info = L.backend_info()\n"
        "assert not info['extensions']['_C']['loaded'], info['extensions']\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = L.cauchy_loss(torch.ones(2, 3), torch.zeros(2, 3), 0.5)\n"
        "assert any('falls back' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "print(round(out.item(), 6))\n"
    ) % str(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("LCT_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) == pytest.approx(1.0986123, rel=1e-6)  # ln(1 + 1/0.5)
