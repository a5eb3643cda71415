"""benchmarks/downstream_check.py (export -> torchvision / torch.hub -> embed -> scikit-learn)
and benchmarks/ci_suite.py's parsing of pytest's summary."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, run_tool
from test_probe import make_checkpoint

sys.path.insert(0, str(ROOT / "benchmarks"))
import ci_suite  # noqa: E402


@pytest.mark.timeout(300)
def test_downstream_check_features_equal_probe_cache(cifar_subset_data, tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "ckpt.pt", cifar_subset_data, seed=1)
    out = tmp_path / "downstream.json"
    res = run_tool("benchmarks/downstream_check.py", "--run", str(run), "--data", str(cifar_subset_data),
                   "--num-patches", "2", "--probe-epochs", "2", "--max-train-images", "60",
                   "--out", str(out), check=False)
    # an untrained "trained" encoder need not beat random init (exit 1); features must agree
    assert res.returncode in (0, 1), res.stderr
    d = json.loads(out.read_text())
    assert d["passed"]["features_equal"] is True
    for feature, loader in (("backbone", "torchvision"), ("pre_projector", "load_backbone")):
        s = d["features"][feature]
        eq = s["feature_equality"]
        assert s["loaded_through"] == loader
        assert eq["train"]["pictures"] == s["train_images"] == 60
        assert eq["test"]["pictures"] == s["test_images"] > 0
        assert eq["test"][f"{loader}_vs_probe_cache_max_abs"] <= eq["tolerance_abs"]
        assert eq["test"]["hub_vs_probe_cache_max_abs"] <= eq["tolerance_abs"]
        assert eq["train"]["feature_scale_max_abs"] > 0
        sk = s["sklearn_logistic_regression"]
        assert 0 <= sk["random_init_top1"] <= 1 and 0 <= sk["trained_top1"] <= 1
        lo, hi = sk["trained_top1_wilson95"]
        assert lo <= sk["trained_top1"] <= hi
        assert sk["paired"]["pairs"] == s["test_images"]
    assert d["features"]["backbone"]["dim"] != d["features"]["pre_projector"]["dim"]
    assert (run / "downstream" / "export" / "export.json").is_file()


def test_downstream_check_without_checkpoint_says_what_to_do(tmp_path):
    res = run_tool("benchmarks/downstream_check.py", "--run", str(tmp_path / "nothing"), check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "ckpt.pt not found" in lines[0] and "make demo" in lines[0]


def test_suite_summary_parsing():
    ok = ci_suite.parse_summary("....\n===== 270 passed, 12 skipped in 868.07s (0:14:28) =====\n")
    assert ok == {"passed": 270, "skipped": 12, "failed": 0, "errors": 0, "pytest_s": 868.07}
    bad = ci_suite.parse_summary("2 failed, 280 passed, 12 skipped, 1 error in 708.15s (0:11:48)")
    assert (bad["failed"], bad["passed"], bad["errors"]) == (2, 280, 1)
    assert ci_suite.parse_summary("make: *** [Makefile:13: test] Error 1") == {}
    assert ci_suite.skip_reasons("SKIPPED [2] tests/test_step.py:208: needs CUDA\nx") == [
        "SKIPPED [2] tests/test_step.py:208: needs CUDA"]


def test_portable_writes_machine_folders_relative():
    from benchmarks.runner import portable

    d = portable({"a": str(ROOT / "data" / "x"), "b": [f"cd {ROOT.parent}/shared && ls", 3],
                  "c": "/clone/repo/tests", "n": None}, {"/clone": "<clone>"})
    assert d == {"a": "./data/x", "b": ["cd ../shared && ls", 3], "c": "<clone>/repo/tests", "n": None}
