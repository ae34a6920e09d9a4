"""The hand mutants of ``tests/train_mutants.py`` stay applicable (tests/README.md, "Mutants
tried").

Running the mutants takes 10-15 minutes and is not part of ``make test``; this file checks,
in a second, what keeps that list honest as the code moves: every mutant's text occurs
exactly once in its source file (else the runner reports NOT APPLIED and the mutant silently
stops being tried), the replacement differs from it, the test files it names exist, and
the README's table lists as many mutants as the runner holds.
"""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_mutants", REPO / "tests" / "train_mutants.py")
train_mutants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mutants)  # defines M; runs nothing (main() is guarded)


@pytest.mark.parametrize("name, rel, old, new, tests", train_mutants.M,
                         ids=[m[0] for m in train_mutants.M])
def test_mutant_text_occurs_once(name, rel, old, new, tests):
    source = (REPO / "lct_kernels" / rel).read_text()
    assert source.count(old) == 1, f"{name!r}: its text is in {rel} {source.count(old)} times"
    assert new != old and source.replace(old, new) != source
    assert tests and all((REPO / t).is_file() for t in tests)


def test_names_are_unique_and_the_readme_lists_them_all():
    names = [m[0] for m in train_mutants.M]
    assert len(set(names)) == len(names)
    readme = (REPO / "tests" / "README.md").read_text()
    section = readme.split("## Mutants tried", 1)[1]
    table_rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| mutant")]
    assert len(table_rows) == len(names), (len(table_rows), len(names))
    assert f"all {len(names)} mutants" in section
