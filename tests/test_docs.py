"""The documents stay true: the README's status table is what benchmarks/status.py generates
from the committed result files; result files name paths relative to the repository; files
written before the emp_ssl/ split (a run's config.yaml, the result files) still load."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import status  # noqa: E402

from conftest import run_tool  # noqa: E402


def test_readme_status_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    assert status.readme_block(readme) == status.table(), (
        "README.md's status table is stale: run `python benchmarks/status.py --write`")


def test_status_rows_name_existing_result_files():
    for what, _, ours, _, rel in status.ROWS:
        if rel != "-":
            assert (status.RESULTS / rel).exists(), f"{what}: {rel} is not committed"
        assert "missing result file" not in ours(), what


def test_readme_is_a_short_guide_with_status_first():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Status" and "## Set-up" in headings[:3]
    assert "GPU_QUEUE" not in text and "DESIGN.md" not in text  # nothing a public reader cannot open


ABSOLUTE = re.compile(r"(?<![\w.$])/(work|tmp|root|home|Users)/")


def test_result_files_hold_no_absolute_machine_paths():
    bad = []
    for path in (ROOT / "benchmarks" / "results").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".md", ".csv", ".log"):
            if ABSOLUTE.search(path.read_text(errors="replace")):
                bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"absolute paths in {bad[:5]} (write paths relative to the repository)"


def test_config_written_before_the_split_still_loads(capsys):
    from emp_ssl.config import as_plain, parse_args

    old = ROOT / "tests" / "data" / "config_0cb8bcf.yaml"
    cfg, _ = parse_args(["--config", str(old)])
    fresh, _ = parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "--out", "runs/old"])
    mine, theirs = as_plain(cfg), as_plain(fresh)
    assert mine == theirs  # the same run, key for key (save_every: its default in both)


@pytest.mark.timeout(600)
def test_report_regenerates_from_the_committed_results(tmp_path):
    out = tmp_path / "REPORT.md"
    run_tool("benchmarks/report.py", "--out", str(out))
    text = out.read_text()
    assert "|" in text and len(text.splitlines()) > 50


RESULT_NAME = re.compile(r"^[a-z0-9_]+_(cpu\d+|h100|h200|a100)_(\d{8})(\.json)?$")
REPORT_OUTPUTS = {"REPORT.md"}  # and the *.png plots benchmarks/report.py writes beside it


def test_result_entries_follow_the_naming_convention():
    """Every file or folder directly under benchmarks/results/ is `<what>_<device>_<YYYYMMDD>`
    (+ .json for a file; benchmarks/README.md, Result files), with a real date."""
    from datetime import datetime

    bad = []
    for path in sorted((ROOT / "benchmarks" / "results").iterdir()):
        if path.name in REPORT_OUTPUTS or (path.is_file() and path.suffix == ".png"):
            continue
        m = RESULT_NAME.match(path.name)
        if m is None or (path.is_dir() and path.name.endswith(".json")) or (
                path.is_file() and not path.name.endswith(".json")):
            bad.append(path.name)
            continue
        try:
            datetime.strptime(m.group(2), "%Y%m%d")
        except ValueError:
            bad.append(path.name)
    assert not bad, f"result entries not named <what>_<device>_<YYYYMMDD>[.json]: {bad}"
