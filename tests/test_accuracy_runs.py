"""benchmarks/accuracy_runs.py, the one driver of the accuracy runs, at its smoke scale on the
CPU: a lossless subset of the real CIFAR-10 and its JPEG twin (the same pictures re-encoded at
quality 75, 4:2:0, as the shared JPEG copy is), trained, probed, compared paired, summarised;
a second invocation skips what is done; bad steps are one-line errors."""
from __future__ import annotations

import json

import pytest

from benchmarks.accuracy_runs import Step, parse_steps
from conftest import run_tool
from pipeline.errors import UserError


def test_parse_steps():
    steps = parse_steps("lossless_s0-2,jpeg_e10_s1,cuda_tests")
    assert [s if isinstance(s, str) else s.name for s in steps] == [
        "lossless_s0", "lossless_s1", "lossless_s2", "jpeg_e10_s1", "cuda_tests"]
    assert steps[3] == Step("jpeg_e10_s1", "jpeg", 1, 10.0) and steps[3].base == "lossless_e10_s1"
    for bad in ("lossy_s0", "lossless", "lossless_s3-1", "ref_e0_s0", ""):
        with pytest.raises(UserError):
            parse_steps(bad)


@pytest.fixture(scope="module")
def jpeg_twin(cifar_subset_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("twin")
    run_tool("benchmarks/reencode_jpeg.py", str(cifar_subset_data), str(out / "q75.tar"), "--quality", "75",
             "--convert-to", str(out / "cifar10_jpeg"))
    return out / "cifar10_jpeg"


# time limit: 145 s + 48 s of fixtures measured on a busy 2-core CPU
@pytest.mark.timeout(600)
def test_driver_smoke_trains_probes_and_pairs(cifar_subset_data, jpeg_twin, tmp_path):
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["benchmarks/accuracy_runs.py", "--smoke", "--lossless", str(cifar_subset_data), "--jpeg",
            str(jpeg_twin), "--out", str(out), "--runs", str(runs), "--threads", "1"]
    proc = run_tool(*args, "--steps", "lossless_s0-1,jpeg_s0-1,ref_s0", "--jobs", "2")
    assert "0 failed" in proc.stdout
    for step in ("lossless_s0", "lossless_s1", "jpeg_s0", "jpeg_s1", "ref_s0"):
        p = json.loads((out / f"probe_{step}.json").read_text())
        assert 0 <= p["linear_top1"] <= 1 and p["num_test"] == 100  # every test picture has a twin
        assert len(p["test_predictions"]["linear"]) == 100
        t = json.loads((out / f"train_{step}.json").read_text())
        assert t["train_summary"]["steps"] == 2 and t["seed"] == int(step[-1]) and t["scale"] == "smoke"
    assert json.loads((out / "train_ref_s0.json").read_text())["train_summary"]["source"] == "reference"
    assert json.loads((out / "probe_jpeg_s0.json").read_text())["dataset"]["name"] == "cifar10_jpeg"
    for name in ("compare_jpeg_s0", "compare_jpeg_s1", "compare_ref_s0"):
        c = json.loads((out / f"{name}.json").read_text())["pairs"][0]["linear"]
        assert c["pairs"] == 100 and c["a_only"] + c["both_right"] == round(100 * c["acc_a"])
    summary = json.loads((out / "summary.json").read_text())
    jpeg = summary["comparisons"]["jpeg"]
    assert jpeg["seeds"] == 2 and summary["scale"] == "smoke"
    lo, hi = jpeg["summary"]["linear"]["ci95_t_over_seeds"]
    assert lo <= jpeg["summary"]["linear"]["mean_diff"] <= hi
    assert summary["comparisons"]["ref"]["seeds"] == 1 and summary["comparisons"]["ref"]["summary"] is None
    assert len(summary["accuracies"]) == 5 and "hardware" in summary

    # Same seed, same threads: lossless_s0 again gives the same predictions; done steps are skipped.
    again = run_tool(*args, "--steps", "lossless_s0,jpeg_s0")
    assert again.stdout.count("skipped") == 2
    first = json.loads((out / "probe_lossless_s0.json").read_text())
    run_tool(*args, "--steps", "lossless_s0", "--force", "--out", str(tmp_path / "again"))
    redo = json.loads((tmp_path / "again" / "probe_lossless_s0.json").read_text())
    assert redo["test_predictions"]["linear"] == first["test_predictions"]["linear"]

    run_tool("benchmarks/report.py", "--results", str(out))
    report = (out / "REPORT.md").read_text()
    assert "Paired accuracy differences over seeds" in report and "| smoke | jpeg | linear | 2 |" in report
    assert "Paired comparisons" in report and "Unrecognised" not in report


def test_driver_bad_input_is_one_line(tmp_path):
    for extra, why in ((["--steps", "lossy_s0"], "lossy_s0"),
                       (["--lossless", str(tmp_path / "none.tar.xz")], "none.tar.xz"),
                       ([], "--out")):
        args = ["benchmarks/accuracy_runs.py", "--smoke", *extra]
        if extra:
            args += ["--out", str(tmp_path / "o")]
        proc = run_tool(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and why in proc.stderr
