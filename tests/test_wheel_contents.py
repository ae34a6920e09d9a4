"""The wheel's package list: pyproject.toml lets setuptools *find* the packages, and
that search covers every folder under lct_kernels/ that holds Python files (so a new
subpackage can never be left out of the wheel while the editable install used by the
tests hides it).  ``make wheel`` checks the built wheel's file list the same way
(benchmarks/check_wheel.py --contents)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
setuptools = pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parents[1]


def package_folders():
    """Dotted names of every folder under lct_kernels/ holding a .py file."""
    return {".".join(p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "lct_kernels").rglob("*.py") if "__pycache__" not in p.parts}


def test_pyproject_finds_every_package_folder():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" in tool and isinstance(tool["packages"], dict) and "find" in tool["packages"], \
        "pyproject.toml must use [tool.setuptools.packages.find], not a hand-written list"
    find = tool["packages"]["find"]
    # setuptools' pyproject default is namespaces = true (find_namespace_packages)
    finder = (setuptools.find_namespace_packages if find.get("namespaces", True)
              else setuptools.find_packages)
    found = set(finder(where=str(ROOT / find.get("where", ["."])[0]),
                       include=find.get("include", ["*"]), exclude=find.get("exclude", [])))
    folders = package_folders()
    assert {"lct_kernels", "lct_kernels.train", "lct_kernels.ot"} <= folders
    missing = sorted(folders - found)
    assert not missing, f"setuptools' find in pyproject.toml misses {missing}"
    stray = sorted(p for p in found if not p.startswith("lct_kernels"))
    assert not stray, f"the wheel would also ship {stray}"


def test_every_package_folder_has_an_init():
    """Regular packages, not namespace packages: an __init__.py in every folder."""
    missing = sorted(f for f in package_folders()
                     if not (ROOT / Path(*f.split(".")) / "__init__.py").is_file())
    assert not missing, f"package folders without __init__.py: {missing}"


def test_build_record_ships_as_package_data():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "_build_info.json" in tool.get("package-data", {}).get("lct_kernels", [])
