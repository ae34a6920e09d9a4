"""summary.md and the plumbing checks of benchmarks/gpu_check.sh (standard library only: it runs
under the GPU machine's python3 and under .venv alike).

    gpu_check_summary.py write --work DIR --out OUT --mode gpu|dry --deadline S --elapsed S
    gpu_check_summary.py check --work DIR --out OUT --mode gpu|dry --deadline S --elapsed S

The work folder holds what gpu_check.sh recorded:
    planned.txt   the stage names, one a line, in run order
    stages.tsv    name <TAB> status <TAB> seconds <TAB> budget <TAB> log <TAB> note, one line per
                  stage that has been decided (ran, or was skipped)
    logs/         every stage's log, and NAME.xml (pytest's junit XML) for test stages

``write`` renders OUT/summary.md: the versions (the env log's ``ENV`` lines), a table
stage | status | seconds | budget | note (a test stage's note gives its pass/fail/skip counts),
the failed test ids, and the benchmarks' key lines (their Markdown headings and tables).

``check`` exits 1 unless: summary.md lists every planned stage; logs.tar.gz holds every log that
stages.tsv names; OUT holds at most MAX_FILES files, each within the device tool's limits
(16 MiB, at most 2 folders deep); the elapsed time is within the deadline; and, in the dry
run, every stage either passed or was skipped for a stated reason that is not the deadline
(the GPU-only stages must say "skipped: no GPU", or "skipped: script missing").
"""

import argparse
import datetime
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET

MAX_FILES = 8  # the device tool returns at most 8 files from $OUT ...
MAX_BYTES = 16 * 2**20  # ... of at most 16 MiB each ...
MAX_DEPTH = 2  # ... at most 2 folders down
GPU_ONLY = ("test_gpu", "memcheck", "racecheck")  # stage names (prefixes) that need a device
BENCH_STAGES = ("bench_kernels", "bench_dit_patch", "bench_train")
BENCH_LINES = 150  # at most this many key lines per benchmark stage in summary.md


def read_stages(work):
    """[{name, status, seconds, budget, log, note}] from stages.tsv, in run order."""
    path = os.path.join(work, "stages.tsv")
    rows = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                parts += [""] * (6 - len(parts))
            rows.append(dict(zip(("name", "status", "seconds", "budget", "log", "note"), parts)))
    return rows


def read_planned(work):
    path = os.path.join(work, "planned.txt")
    return [s.strip() for s in open(path)] if os.path.exists(path) else []


def _test_id(classname, name):
    """pytest's junit (classname "tests.test_gpu" or "tests.test_gpu.TestX", name) -> node id."""
    parts = classname.split(".") if classname else []
    mod = max((i for i, p in enumerate(parts) if p.startswith("test_")), default=None)
    if mod is None:
        return "::".join(parts + [name])
    return "/".join(parts[: mod + 1]) + ".py::" + "::".join(parts[mod + 1:] + [name])


def parse_junit(path):
    """{"passed", "failed", "errors", "skipped": int, "failures": [(id, first message line)]}."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        tid = _test_id(case.get("classname", ""), case.get("name", "?"))
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            el = case.find(tag)
            msg = (el.get("message") or el.text or "").strip().splitlines()
            out["failed" if tag == "failure" else "errors"] += 1
            out["failures"].append((tid, (msg[0] if msg else tag)[:200]))
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def parse_verbose_log(path):
    """The same counts from pytest -v lines, for a run killed before it wrote its junit XML."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
           "SKIPPED": "skipped", "XFAIL": "skipped"}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = _VERBOSE.match(line)
        if m:
            out[key[m.group(2)]] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                out["failures"].append((m.group(1), m.group(2).lower() + " (from the -v log)"))
    return out


def test_results(work, stage):
    """Counts for a test stage: its junit XML, else its -v log (None if neither has any)."""
    xml = os.path.join(work, "logs", stage["name"] + ".xml")
    if os.path.exists(xml):
        try:
            return parse_junit(xml)
        except ET.ParseError:
            pass
    log = os.path.join(work, "logs", stage["log"]) if stage["log"] else ""
    if log and os.path.exists(log):
        res = parse_verbose_log(log)
        if sum(res[k] for k in ("passed", "failed", "errors", "skipped")):
            return res
    return None


def bench_lines(path):
    """Markdown headings, bold labels and table rows of a benchmark log (its key lines)."""
    keep = [line.rstrip() for line in open(path, encoding="utf-8", errors="replace")
            if line.startswith(("###", "**", "|", "- device", "- torch", "Peers:"))]
    if len(keep) > BENCH_LINES:
        keep = keep[:BENCH_LINES] + [f"... ({len(keep) - BENCH_LINES} more lines in logs.tar.gz)"]
    return keep


def env_lines(work):
    """The versions: ``ENV`` lines of the env and peers logs."""
    lines = []
    for name in ("env.log", "peers.log"):
        path = os.path.join(work, "logs", name)
        if os.path.exists(path):
            lines += [line[4:].rstrip() for line in open(path, encoding="utf-8", errors="replace")
                      if line.startswith("ENV ")]
    return lines


def _cell(text):
    return text.replace("|", "\\|")


def render(work, out_dir, mode, deadline, elapsed):
    stages = read_stages(work)
    planned = read_planned(work)
    done = {s["name"] for s in stages}
    failures = []
    rows = []
    for s in stages:
        note = s["note"]
        if s["name"].startswith("test_") or s["name"] == "registration":
            res = test_results(work, s)
            if res:
                counts = (f"{res['passed']} passed, {res['failed']} failed, {res['errors']} errors, "
                          f"{res['skipped']} skipped")
                note = counts + (f"; {note}" if note else "")
                failures += [(s["name"], tid, msg) for tid, msg in res["failures"]]
                ran = res["passed"] + res["failed"] + res["errors"]
                if mode == "gpu" and s["status"] == "pass" and ran == 0:
                    s["status"] = "empty: every test skipped"
        rows.append(dict(s, note=note))
    for name in planned:
        if name not in done:
            rows.append({"name": name, "status": "not reached", "seconds": "", "budget": "",
                         "log": "", "note": "the script stopped before this stage"})
    bad = [r for r in rows if r["status"].startswith(("failed", "timeout", "not reached", "empty"))]
    title = "dry run on the CPU (plumbing check; no kernel ran on a GPU)" if mode == "dry" else "GPU"
    lines = [
        f"# gpu_check.sh: {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- elapsed: {elapsed} s of the {deadline} s deadline",
        f"- stages: {len(rows)}; failed, timed out, empty or not reached: {len(bad)}"
        + (" (" + ", ".join(r["name"] for r in bad) + ")" if bad else ""),
    ]
    lines += [f"- {e}" for e in env_lines(work)]
    lines += ["", "| stage | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_cell(r['status'])} | {r['seconds']} | {r['budget']} | "
                     f"{_cell(r['note'])} |")
    lines += ["", "## Failed tests", ""]
    if failures:
        lines += [f"- `{tid}` ({stage}): {_cell(msg)}" for stage, tid, msg in failures]
    else:
        lines.append("none")
    lines += ["", "## Key benchmark lines", ""]
    for s in stages:
        if s["name"] in BENCH_STAGES and s["log"]:
            path = os.path.join(work, "logs", s["log"])
            got = bench_lines(path) if os.path.exists(path) else []
            lines += [f"**{s['name']}** ({s['status']})", ""] + (got or ["(no table lines)"]) + [""]
    lines += ["Every log, the junit XML and the benchmark outputs: logs.tar.gz.", ""]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    return rows


def out_files(out_dir):
    """(relative path, bytes, folder depth) of every file under out_dir."""
    files = []
    for dirpath, _, names in os.walk(out_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), out_dir)
            files.append((rel, os.path.getsize(os.path.join(dirpath, n)), rel.count(os.sep)))
    return sorted(files)


def check(work, out_dir, mode, deadline, elapsed):
    """[(ok, message)] for each plumbing rule (see the module docstring)."""
    results = []
    stages = read_stages(work)
    planned = read_planned(work)
    summary = os.path.join(out_dir, "summary.md")
    text = open(summary).read() if os.path.exists(summary) else ""
    listed = set(re.findall(r"^\| (\S+) \|", text, flags=re.M))
    missing = [p for p in planned if p not in listed]
    results.append((bool(text) and bool(planned) and not missing,
                    f"summary.md lists every planned stage ({len(planned)})"
                    + (f"; missing: {missing}" if missing else "")))
    archive = os.path.join(out_dir, "logs.tar.gz")
    try:
        with tarfile.open(archive) as t:
            members = set(t.getnames())
    except (OSError, tarfile.TarError) as e:
        members, err = set(), str(e)
    else:
        err = ""
    logs = [s["log"] for s in stages if s["log"]]
    absent = [lg for lg in logs if f"logs/{lg}" not in members]
    results.append((not err and not absent,
                    f"logs.tar.gz holds every stage log ({len(logs)})"
                    + (f"; absent: {absent}" if absent else "") + (f"; {err}" if err else "")))
    files = out_files(out_dir)
    results.append((len(files) <= MAX_FILES, f"{len(files)} files in OUT (at most {MAX_FILES}): "
                    + ", ".join(f for f, _, _ in files)))
    big = [f for f, size, depth in files if size > MAX_BYTES or depth > MAX_DEPTH
           or not re.fullmatch(r"[A-Za-z0-9._/-]+", f)]
    results.append((not big, "every file within 16 MiB, 2 folders deep, plain name"
                    + (f"; not: {big}" if big else "")))
    results.append((elapsed <= deadline, f"elapsed {elapsed} s within the {deadline} s deadline"))
    if mode == "dry":
        wrong = []
        for s in stages:
            st = s["status"]
            if s["name"].startswith(GPU_ONLY):
                if st not in ("skipped: no GPU", "skipped: script missing", "skipped: not selected"):
                    wrong.append(f"{s['name']}: {st} (a GPU-only stage must say 'skipped: no GPU')")
            elif not (st == "pass" or (st.startswith("skipped: ") and st != "skipped: deadline")):
                wrong.append(f"{s['name']}: {st}")
        results.append((not wrong, "dry run: every stage passed or was skipped for a stated "
                        "reason other than the deadline" + (f"; not: {wrong}" if wrong else "")))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("write", "check"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("gpu", "dry"), required=True)
    ap.add_argument("--deadline", type=int, required=True)
    ap.add_argument("--elapsed", type=int, required=True)
    args = ap.parse_args(argv)
    if args.action == "write":
        render(args.work, args.out, args.mode, args.deadline, args.elapsed)
        return 0
    results = check(args.work, args.out, args.mode, args.deadline, args.elapsed)
    for ok, msg in results:
        print(("PASS  " if ok else "FAIL  ") + msg)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
