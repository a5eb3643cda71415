"""The test suite as CI runs it: a fresh clone of this repository's HEAD, `bash .ci/run` (the
README's set-up and test commands), with and without ../shared beside the clone.

    python benchmarks/ci_suite.py [--modes with_shared without_shared] [--keep DIR]

Each mode clones HEAD into a temporary folder (committed files only), puts ../shared beside it
(a symlink to the one beside this checkout) or nothing (and EMP_SSL_NO_SHARED=1), runs
`bash .ci/run` and parses pytest's summary line. Writes
``benchmarks/results/test_suite_<host>_<date>.json`` (passed, skipped, failed, the skip reasons,
wall minutes of the whole CI command and of pytest) and each mode's output tail; exits 1 when a
mode fails. The README's status table reads the counts from that file.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, results_path, write_json  # noqa: E402
from benchmarks.runner import portable  # noqa: E402

MODES = ("with_shared", "without_shared")
SUMMARY = re.compile(r"^=*\s*(?P<body>(?:\d+ \w+(?:, )?)+) in (?P<secs>[\d.]+)s")


def parse_summary(text: str) -> dict:
    """Counts and seconds from pytest's last summary line ('270 passed, 12 skipped in 868.07s')."""
    for line in reversed(text.splitlines()):
        m = SUMMARY.match(line.strip())
        if m:
            counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", m.group("body"))}
            out = {k: counts.get(k, 0) for k in ("passed", "skipped", "failed", "errors")}
            out["errors"] += counts.get("error", 0)
            out["pytest_s"] = float(m.group("secs"))
            return out
    return {}


def skip_reasons(text: str) -> list[str]:
    """pytest -rs lines: 'SKIPPED [2] tests/test_step.py:208: needs CUDA'."""
    return [line.strip() for line in text.splitlines() if line.startswith("SKIPPED [")]


def run_mode(mode: str, work: Path, shared: Path) -> dict:
    base = work / mode
    base.mkdir(parents=True)
    repo = base / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(repo)], check=True)
    env = dict(os.environ)
    env.pop("EMP_SSL_NO_SHARED", None)
    if mode == "with_shared":
        (base / "shared").symlink_to(shared.resolve())
    else:
        env["EMP_SSL_NO_SHARED"] = "1"
    print(f"test_suite: {mode}: bash .ci/run in {repo}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    text = proc.stdout
    (base / "ci.log").write_text(text)
    summary = parse_summary(text)
    row = {"rc": proc.returncode, **summary, "wall_min": round(wall / 60, 2),
           "pytest_min": round(summary.get("pytest_s", 0.0) / 60, 2),
           "skip_reasons": skip_reasons(text), "output_tail": text.splitlines()[-25:]}
    print(f"test_suite: {mode}: rc={proc.returncode} {summary} wall {wall / 60:.1f} min", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="the ../shared to put beside the clone (default: the one beside this checkout)")
    p.add_argument("--keep", type=Path, default=None, help="keep the clones and logs here")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/)")
    args = p.parse_args(argv)
    if "with_shared" in args.modes and not (args.shared / "datasets").is_dir():
        print(f"test_suite: error: {args.shared}/datasets not found; pass --shared or "
              "--modes without_shared", file=sys.stderr)
        return 2
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    work = args.keep or Path(tempfile.mkdtemp(prefix="emp_ssl_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {**environment(), "what": "bash .ci/run on a fresh clone of HEAD",
              "uncommitted_changes_not_measured": bool(dirty)}
    try:
        for mode in args.modes:
            result[mode] = run_mode(mode, work, args.shared)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out = write_json(args.out or results_path("test_suite"), portable(result, {work: "<clone>"}))
    print(f"wrote {out}")
    return 0 if all(result[m]["rc"] == 0 for m in args.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
