"""Specification of the package layout: every module imports, and the import graph of
lct_kernels is acyclic and layered.

The graph is built from the source (the AST of every ``lct_kernels/**/*.py``), not from
``sys.modules``: an edge A -> B for every ``import``/``from ... import`` in A that names
module B of the package, at any depth (imports inside functions count: a lazy import
still closes a cycle, as data.py <-> autoencoder.py once did).  ``from P import name``
is an edge to the submodule ``P.name`` when that module exists, else to ``P``.  The
implicit import of a target's parent packages is not an edge (every module would then
depend on lct_kernels/__init__.py, which imports the ops).

Layers (lower never imports higher):
    _ext, _validate, _backend  <  ops, triton, nn, ot, optim  <  lct_kernels (__init__)
    <  train (core)  <  eval  <  train.cli (the one module that joins trainer and eval)
"""

import ast
import importlib
from pathlib import Path

import pytest

import lct_kernels

ROOT = Path(lct_kernels.__file__).resolve().parent


def module_files(root):
    """{module name: path} for every .py file under the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(not p.isidentifier() for p in parts):
            continue  # not importable as a module (e.g. a scratch file)
        out[".".join(parts)] = path
    return out


def _known(name, modules):
    """The longest prefix of dotted ``name`` that is a module of the package, or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in modules:
            return cand
    return None


def import_graph(root):
    """{module: set of package modules it imports} (see the module docstring)."""
    modules = module_files(root)
    top = root.name
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top:
                        target = _known(alias.name, modules)
                        assert target is not None, f"{name} imports unknown {alias.name}"
                        edges.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level > 1:
                        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != top:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else _known(base, modules)
                    assert target is not None, f"{name} imports unknown {base}"
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None when the graph is acyclic."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack = []

    def visit(u):
        color[u] = GREY
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if color.get(v, BLACK) == GREY:
                return stack[stack.index(v):] + [v]
            if color.get(v) == WHITE:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        color[u] = BLACK
        return None

    for u in sorted(graph):
        if color[u] == WHITE:
            found = visit(u)
            if found:
                return found
    return None


GRAPH = import_graph(ROOT)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_lct_kernels_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_the_layout():
    # Guards the checker itself: it must see known edges (lazy ones included).
    assert "lct_kernels.train.data.common" in GRAPH["lct_kernels.train.data.autoencoder"]
    assert "lct_kernels._backend" in GRAPH["lct_kernels.ops.layer_norm"]
    assert "lct_kernels.eval.evaluate" in GRAPH["lct_kernels.train.cli"]  # a lazy import
    assert "lct_kernels.triton.robust_loss" in GRAPH["lct_kernels.ops.robust_loss"]
    assert len(GRAPH) > 40


def test_the_checker_finds_a_lazy_cycle_and_a_package_relative_one(tmp_path):
    pkg = tmp_path / "lct_kernels"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from lct_kernels.sub import a\n")
    (pkg / "c.py").write_text("from .sub import a\n")
    g = import_graph(pkg)
    assert g["lct_kernels.sub.a"] == {"lct_kernels.sub.b"}
    assert g["lct_kernels.sub.b"] == {"lct_kernels.sub.a"}
    assert g["lct_kernels.c"] == {"lct_kernels.sub.a"}
    assert find_cycle(g) in (["lct_kernels.sub.a", "lct_kernels.sub.b", "lct_kernels.sub.a"],
                             ["lct_kernels.sub.b", "lct_kernels.sub.a", "lct_kernels.sub.b"])
    (pkg / "sub" / "b.py").write_text("import os\nfrom lct_kernels.sub import __name__ as n\n")
    assert find_cycle(import_graph(pkg)) is None


def _layer(name):
    if name in ("lct_kernels._ext", "lct_kernels._validate", "lct_kernels._backend",
                "lct_kernels._build_info"):
        return 0
    if name.startswith(("lct_kernels.ops", "lct_kernels.triton", "lct_kernels.nn", "lct_kernels.ot",
                        "lct_kernels.optim")):
        return 1
    if name in ("lct_kernels", "lct_kernels.__main__"):
        return 2
    if name in ("lct_kernels.train.cli", "lct_kernels.train.__main__"):
        return 5
    if name.startswith("lct_kernels.eval"):
        return 4
    if name.startswith("lct_kernels.train"):
        return 3
    return 0


def test_the_layers_import_only_downwards():
    # ops never import the trainer, the trainer's core never imports eval, and
    # _backend (which every op imports) imports no op.
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, targets in GRAPH.items() for b in targets
           if _layer(b) > _layer(a) and not (_layer(a) == 1 and b == "lct_kernels")]
    assert not bad, "\n".join(bad)
    assert not any(t.startswith("lct_kernels.ops") for t in GRAPH["lct_kernels._backend"])


def test_pick_backend_and_kernel_dtypes_live_in_backend():
    from lct_kernels import _backend
    from lct_kernels.ops import consistency_objective, layer_norm, robust_loss

    for mod in (robust_loss, layer_norm, consistency_objective):
        assert mod.pick_backend is _backend.pick_backend
    assert _backend.KERNEL_DTYPES == (__import__("torch").float32, __import__("torch").float16,
                                      __import__("torch").bfloat16)
