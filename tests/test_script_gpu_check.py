"""benchmarks/gpu_check.sh's plumbing, on the CPU: the summary helper's parsing and checks, and
the script's deadline, budget and stage-selection logic (the whole dry run is `make
gpu-check-dry-run`; these tests take seconds).  Not named test_gpu*.py: gpu_check.sh runs those
files as the GPU tests.

Contracts (from issue 11, item 4): a stage that does not fit in the time left is skipped and
marked "skipped: deadline"; a stage that overruns its budget is killed and marked "timeout";
summary.md lists every stage and the failed test ids; $OUT holds at most 8 files, one of them
logs.tar.gz with every log; in the dry run, GPU-only stages must say "skipped: no GPU".
"""

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_summary as S  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_gpu" name="test_a[cuda-8x64]" time="0.1"/>
<testcase classname="tests.test_gpu.TestOT" name="test_b" time="0.1"/>
<testcase classname="tests.test_gpu_triton" name="test_c[bf16]" time="0.1">
  <failure message="AssertionError: tensors differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_gpu_cuda" name="test_d" time="0.1">
  <error message="RuntimeError: CUDA error: an illegal memory access">trace</error></testcase>
<testcase classname="tests.test_gpu" name="test_e" time="0.0">
  <skipped message="needs two GPUs"/></testcase>
</testsuite></testsuites>
"""


def make_work(tmp_path, stages, planned=None, logs=("env.log",)):
    """A gpu_check.sh work folder: stages.tsv rows (name, status, log), planned.txt, logs/."""
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    for lg in logs:
        (work / "logs" / lg).write_text("ENV torch 9.9.9\n" if lg == "env.log" else "log\n")
    rows = [f"{n}\t{st}\t1\t10\t{lg}\t" for n, st, lg in stages]
    (work / "stages.tsv").write_text("\n".join(rows) + "\n")
    (work / "planned.txt").write_text("\n".join(planned or [n for n, _, _ in stages]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    return work, out


def archive(work, out, names):
    with tarfile.open(out / "logs.tar.gz", "w:gz") as t:
        for n in names:
            t.add(work / "logs" / n, arcname=f"logs/{n}")


def test_junit_counts_and_failed_ids(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text(JUNIT)
    r = S.parse_junit(str(p))
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (2, 1, 1, 1)
    assert r["failures"] == [
        ("tests/test_gpu_triton.py::test_c[bf16]", "AssertionError: tensors differ"),
        ("tests/test_gpu_cuda.py::test_d", "RuntimeError: CUDA error: an illegal memory access"),
    ]
    assert S._test_id("tests.test_gpu.TestOT", "test_b") == "tests/test_gpu.py::TestOT::test_b"


def test_verbose_log_fallback_when_killed_before_the_xml(tmp_path):
    log = tmp_path / "t.log"
    log.write_text("tests/test_gpu.py::test_a[x] PASSED   [ 10%]\n"
                   "tests/test_gpu.py::test_b FAILED   [ 20%]\nnoise\n"
                   "tests/test_gpu.py::test_c SKIPPED (needs a CUDA device) [ 30%]\n")
    r = S.parse_verbose_log(str(log))
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 1)
    assert [tid for tid, _ in r["failures"]] == ["tests/test_gpu.py::test_b"]


def test_summary_lists_every_stage_failed_ids_and_unreached_stages(tmp_path):
    work, out = make_work(tmp_path, [("env", "pass", "env.log"),
                                     ("test_gpu", "failed (rc 1)", "test_gpu.log")],
                          planned=["env", "test_gpu", "bench_train"],
                          logs=("env.log", "test_gpu.log"))
    (work / "logs" / "test_gpu.xml").write_text(JUNIT)
    S.render(str(work), str(out), "gpu", 480, 100)
    text = (out / "summary.md").read_text()
    assert "| env | pass |" in text and "| test_gpu | failed (rc 1) |" in text
    assert "| bench_train | not reached |" in text  # planned but never recorded
    assert "2 passed, 1 failed, 1 errors, 1 skipped" in text
    assert "`tests/test_gpu_triton.py::test_c[bf16]`" in text
    assert "`tests/test_gpu_cuda.py::test_d`" in text
    assert "- torch 9.9.9" in text  # the env log's ENV lines are the versions


def test_gpu_mode_marks_a_test_stage_that_ran_nothing(tmp_path):
    work, out = make_work(tmp_path, [("test_gpu", "pass", "test_gpu.log")], logs=("test_gpu.log",))
    (work / "logs" / "test_gpu.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="t">'
        '<skipped message="needs a CUDA device"/></testcase></testsuite></testsuites>')
    S.render(str(work), str(out), "gpu", 480, 10)
    assert "| test_gpu | empty: every test skipped |" in (out / "summary.md").read_text()


def test_check_passes_a_well_formed_dry_run(tmp_path):
    work, out = make_work(tmp_path, [("env", "pass", "env.log"),
                                     ("memcheck", "skipped: no GPU", "memcheck.log"),
                                     ("racecheck", "skipped: no GPU", ""),
                                     ("bench_dit_patch", "skipped: script missing", "b.log")],
                          logs=("env.log", "memcheck.log", "b.log"))
    S.render(str(work), str(out), "dry", 300, 10)
    archive(work, out, ["env.log", "memcheck.log", "b.log"])
    results = S.check(str(work), str(out), "dry", 300, 10)
    assert all(ok for ok, _ in results), results


@pytest.mark.parametrize("defect", ["nine files", "log not archived", "gpu stage passed",
                                    "deadline skip", "over deadline", "deep file"])
def test_check_fails_each_broken_rule(tmp_path, defect):
    stages = [("env", "pass", "env.log"), ("test_gpu", "skipped: no GPU", "t.log"),
              ("bench_train", "pass", "b.log")]
    if defect == "gpu stage passed":
        stages[1] = ("test_gpu", "pass", "t.log")
    if defect == "deadline skip":
        stages[2] = ("bench_train", "skipped: deadline", "")
    work, out = make_work(tmp_path, stages, logs=("env.log", "t.log", "b.log"))
    S.render(str(work), str(out), "dry", 300, 10)
    archive(work, out, ["env.log", "b.log"] if defect == "log not archived"
            else ["env.log", "t.log", "b.log"])
    if defect == "nine files":
        for i in range(7):
            (out / f"plot{i}.png").write_bytes(b"x")
    if defect == "deep file":
        (out / "a" / "b" / "c").mkdir(parents=True)
        (out / "a" / "b" / "c" / "f.txt").write_text("x")
    elapsed = 301 if defect == "over deadline" else 10
    results = S.check(str(work), str(out), "dry", 300, elapsed)
    failed = [msg for ok, msg in results if not ok]
    assert len(failed) == 1, results
    expect = {"nine files": "files in OUT", "log not archived": "logs.tar.gz",
              "gpu stage passed": "skipped: no GPU", "deadline skip": "deadline;",
              "over deadline": "elapsed", "deep file": "2 folders deep"}[defect]
    assert expect in failed[0]


def run_script(tmp_path, env, *args):
    out = tmp_path / "out"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(OUT=str(out), **env)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=full,
                       capture_output=True, text=True, timeout=120)
    return p, out


def test_script_skips_every_stage_past_the_deadline_and_still_reports(tmp_path):
    # GPU_CHECK_DEADLINE=5 is under the 10 s kept for the summary: no stage fits
    p, out = run_script(tmp_path, {"GPU_CHECK_DEADLINE": "5", "PY": sys.executable}, "--dry-run")
    assert p.returncode == 3, p.stdout + p.stderr  # the dry run's checks fail
    text = (out / "summary.md").read_text()
    planned = ["env", "peers", "build", "backend", "registration", "memcheck", "bench_kernels",
               "bench_dit_patch", "bench_train"] + [f.stem for f in (ROOT / "tests").glob("test_gpu*.py")]
    for name in planned:
        assert f"| {name} | skipped: deadline |" in text, name
    assert "| racecheck | skipped: no GPU |" in text
    assert len(list(out.iterdir())) <= 8
    with tarfile.open(out / "logs.tar.gz") as t:
        assert "logs/summary.md" in t.getnames()


def test_script_kills_a_stage_over_its_budget_and_runs_only_selected_stages(tmp_path):
    # a python that hangs, except for the summary helper (the script's own bookkeeping)
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$1" in *gpu_check_summary.py) exec {sys.executable} "$@";; esac
        sleep 60
        """))
    fake.chmod(0o755)
    env = {"PY": str(fake), "GPU_CHECK_STAGES": "env,backend", "GPU_CHECK_BUDGET_ENV": "2",
           "GPU_CHECK_BUDGET_BACKEND": "1", "GPU_CHECK_DEADLINE": "100"}
    p, out = run_script(tmp_path, env, "--dry-run")
    assert p.returncode != 0
    text = (out / "summary.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:3] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert rows["env"][0] == "timeout" and int(rows["env"][1]) <= 10, rows["env"]
    assert rows["backend"][0] == "timeout" and int(rows["backend"][1]) <= 10
    assert rows["build"][0] == "skipped: not selected"
    assert rows["bench_train"][0] == "skipped: not selected"
