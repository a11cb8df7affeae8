"""Mutation testing: put one small semantic bug at a time into a copy of src/ and run the fast tests
that should notice it; a mutant the tests still pass is a proof that cannot fail.

    python tools/mutate.py                 # every mutant of tools/mutants.py
    python tools/mutate.py -k top-p        # the mutants whose name or area contains "top-p"
    python tools/mutate.py --list          # the table, nothing run
    python tools/mutate.py --check         # only check that every snippet is still found

For each mutant: src/ is copied to a temporary directory, the mutant's `original` snippet (which must
occur exactly once in its file) is replaced, and `python -m pytest -x -q -m "not slow" <tests>` runs with
the copy first on PYTHONPATH. Exit status 1 from pytest (a test failed) kills the mutant; 0 means it
survived; anything else (collection error, timeout, crash) is reported as such. The unmutated tree is run
first with the union of the tests: they must pass. Exit status: 0 when every mutant was killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "leanformers"


class SnippetError(Exception):
    pass


def check_snippets(mutants: list[Mutant], src: Path) -> None:
    """Every original snippet occurs exactly once in its file; raises naming every one that does not."""
    problems = []
    for m in mutants:
        path = src / PACKAGE / m.file
        if not path.is_file():
            problems.append(f"{m.name!r}: file src/{PACKAGE}/{m.file} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.original)
        if n != 1:
            where = "not found" if n == 0 else f"found {n} times (make it unique)"
            problems.append(f"{m.name!r}: snippet {m.original.strip()[:70]!r} {where} in src/{PACKAGE}/{m.file}")
    if problems:
        raise SnippetError("mutation table out of date (update tools/mutants.py):\n  " + "\n  ".join(problems))


def mutated_tree(m: Mutant | None, workdir: Path) -> Path:
    """A copy of src/ with the mutant applied (None: unmutated); returns the directory to put on PYTHONPATH."""
    dst = workdir / "src"
    shutil.copytree(ROOT / "src", dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if m is not None:
        path = dst / PACKAGE / m.file
        text = path.read_text(encoding="utf-8")
        assert text.count(m.original) == 1
        path.write_text(text.replace(m.original, m.replacement), encoding="utf-8")
    return dst


def run_tests(pythonpath: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'error (rc N)' | 'timeout', seconds, pytest's output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONDONTWRITEBYTECODE="1", COLUMNS="400")  # wide: full summary lines
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    seconds = time.perf_counter() - t0
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, f"error (rc {proc.returncode})")
    return outcome, seconds, proc.stdout + proc.stderr


def killed_by(output: str) -> str:
    """The first failing test and its exception, from pytest's short summary ("test_x[a] AssertionError"):
    a mutant killed by a crash (TypeError, NameError...) rather than a failed check shows as such."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            test, _, why = line.split(" ", 1)[1].partition(" - ")
            return f"{test.split('::')[-1]} {why.split(':')[0].strip() or '?'}"[:90]
    return ""


def imported_from(pythonpath: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def union_of_tests(mutants: list[Mutant]) -> list[tuple[str, ...]]:
    seen: list[tuple[str, ...]] = []
    for m in mutants:
        if m.tests not in seen:
            seen.append(m.tests)
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="select", help="only mutants whose name or area contains this text")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet is found once")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output for survivors and errors")
    args = ap.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.select or args.select.lower() in (m.name + " " + m.area).lower()]
    if not mutants:
        print(f"no mutant matches {args.select!r}", file=sys.stderr)
        return 2
    if args.list:
        for i, m in enumerate(mutants, 1):
            print(f"{i:2d}. [{m.area}] {m.name}{'  (issue 17)' if m.issue else ''}\n    src/{PACKAGE}/{m.file}: "
                  f"{m.original.strip()[:60]!r} -> {m.replacement.strip()[:60]!r}\n    tests: {' '.join(m.tests)}")
        return 0
    try:
        check_snippets(mutants, ROOT / "src")
    except SnippetError as exc:
        print(f"mutate.py: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(mutants)} snippets found exactly once")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        if not args.no_baseline:
            base = mutated_tree(None, Path(tmp) / "baseline")
            where = imported_from(base)
            if not where.startswith(str(base)):
                print(f"mutate.py: the copy is not what gets imported ({where}); is {PACKAGE} on PYTHONPATH "
                      "or installed non-editable ahead of it?", file=sys.stderr)
                return 2
            for tests in union_of_tests(mutants):
                outcome, seconds, tail = run_tests(base, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {'passed' if outcome == 'survived' else outcome} ({seconds:.0f} s)",
                      flush=True)
                if outcome != "survived":
                    print(tail[-3000:], file=sys.stderr)
                    print("mutate.py: the tests fail without any mutant; fix that first", file=sys.stderr)
                    return 2

        rows = []
        for i, m in enumerate(mutants, 1):
            tree = mutated_tree(m, Path(tmp) / f"m{i}")
            outcome, seconds, tail = run_tests(tree, m.tests, args.timeout)
            shutil.rmtree(tree.parent)
            by = killed_by(tail) if outcome == "killed" else ""
            rows.append((m, outcome, seconds, by))
            print(f"[{i}/{len(mutants)}] {outcome:9s} {seconds:5.0f} s  [{m.area}] {m.name}  {by}", flush=True)
            if args.verbose and outcome != "killed":
                print(tail[-3000:])

    killed = sum(o in ("killed", "timeout") for _, o, _, _ in rows)
    print("\n| # | area | mutant | result | first failing test | s |\n|---|---|---|---|---|---|")
    for i, (m, outcome, seconds, by) in enumerate(rows, 1):
        print(f"| {i} | {m.area} | {m.name}{' *' if m.issue else ''} | {outcome} | {by} | {seconds:.0f} |")
    print(f"\nscore: {killed}/{len(rows)} killed ({100 * killed / len(rows):.0f}%); * = named in issue 17")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
