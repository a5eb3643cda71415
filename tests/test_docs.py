"""The documents stay true: the README's status table is what benchmarks/status.py generates
and every table of figures in docs/ is what benchmarks/report.py generates from the committed
result files; no measured figure is typed by hand outside those tables; result files name paths
relative to the repository; files written before the emp_ssl/ split (a run's config.yaml, the
result files) still load."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
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
    assert len(text.splitlines()) <= 200
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


RESULTS = ROOT / "benchmarks" / "results"


def test_docs_tables_are_what_report_generates():
    groups = report.collect(RESULTS)
    stale = report.refresh_docs(groups, RESULTS, write=False)
    assert not stale, f"generated tables are stale in {stale}: run `python benchmarks/report.py`"
    specs = []
    for name in ("performance.md", "reproduction.md", "datasets.md"):
        blocks = [m.group("spec") for m in report.BLOCK.finditer((ROOT / "docs" / name).read_text())]
        assert len(blocks) >= 2, name
        specs += blocks
    assert len(specs) == len(set(specs)), "a table is quoted twice: link to the one place instead"


def test_a_stale_or_unknown_doc_table_is_caught(tmp_path):
    groups = report.collect(RESULTS)
    doc = tmp_path / "page.md"
    doc.write_text("Intro.\n\n<!-- report:begin lars step_options_cpu2_20261130/lars_update_*.json -->\n"
                   "| width | ms/update |\n|---|---|\n| 16 | 1.0 |\n<!-- report:end -->\n\nAfter.\n")
    assert report.refresh_docs(groups, RESULTS, docs=(tmp_path,), write=False) == [str(doc)]
    assert "| 16 | 1.0 |" in doc.read_text()  # --check writes nothing
    report.refresh_docs(groups, RESULTS, docs=(tmp_path,))
    text = doc.read_text()
    assert "| 16 | 1.0 |" not in text and "lars_update_cpu2_w64.json" in text
    assert text.startswith("Intro.") and text.endswith("After.\n")
    assert report.refresh_docs(groups, RESULTS, docs=(tmp_path,), write=False) == []
    doc.write_text("<!-- report:begin nosuchtable x.json -->\n<!-- report:end -->\n")
    with pytest.raises(ValueError, match="unknown table 'nosuchtable'"):
        report.refresh_docs(groups, RESULTS, docs=(tmp_path,), write=False)
    doc.write_text("<!-- report:begin lars nosuchfile_*.json -->\n<!-- report:end -->\n")
    with pytest.raises(ValueError, match="no rows"):
        report.refresh_docs(groups, RESULTS, docs=(tmp_path,), write=False)


# A measured figure, as these documents write them: an accuracy or share with decimals, a
# speed-up ratio, a rate. Outside generated blocks only the figures below may appear: the
# paper's and the authors' README's published results, an independent port's, and this
# project's goals. None of them is a measurement of ours.
FIGURE = re.compile(r"\d+\.\d+ ?%|(?<![\w.])\d+(\.\d+)?x\b|\d[\d,.]*k? ?(patches|images|img)/s"
                    r"|\d+\.\d+ ?(s|ms|min|MiB|GiB|GB)\b|load average \d")
PUBLISHED = {"84.2%", "80.6%", "85.1%", "90.7%", "91.5%", "93.1%", "93.4%",  # CIFAR-10 (paper, ref README)
             "38.1%", "51.5%", "58.5%", "78.9%",  # Tiny ImageNet, ImageNet-100 (paper)
             "82.11%",  # github.com/bartoszzuk/emp-ssl, 1 epoch
             "100,000 patches/s"}  # the throughput goal (docs/performance.md)
GENERATED = re.compile(r"<!-- (report|status):begin.*?<!-- (report|status):end -->", re.S)


def test_no_measured_figure_is_typed_by_hand():
    """`git grep` finds each measured figure in one generated place: README.md, docs/*.md and
    benchmarks/README.md hold figures only inside generated blocks."""
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        text = GENERATED.sub("", page.read_text())
        for line_no, line in enumerate(text.splitlines(), 1):
            for m in FIGURE.finditer(line):
                if m.group(0) not in PUBLISHED:
                    bad.append(f"{page.relative_to(ROOT)}: {m.group(0)!r} in {line.strip()[:80]!r}")
    assert not bad, "figures typed by hand (generate them: benchmarks/report.py):\n" + "\n".join(bad)
