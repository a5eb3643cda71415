"""The benchmark scripts run end to end at demo scale on a CPU and report.py collects them."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_tool


# time limit: 191 s measured on a busy 2-core CPU, plus the shared data's conversion when first
@pytest.mark.timeout(600)
def test_benchmarks_smoke_and_report(cifar_subset_data, tmp_path):
    res = tmp_path / "results"
    d = str(cifar_subset_data)
    run_tool("benchmarks/pipeline_throughput.py", "--data", d, "--num-patches", "20", "--sources", "memory,reference",
             "--devices", "cpu", "--steps", "2", "--repeats", "1", "--warmup", "2",
             "--json", str(res / "pipeline_smoke.json"))
    run_tool("benchmarks/train_throughput.py", "--data", d, "--num-patches", "4", "--batch-size", "10", "--steps", "1",
             "--warmup", "1", "--repeats", "1", "--options", "eager", "--sources", "memory",
             "--json", str(res / "train_throughput_smoke.json"))
    run_tool("benchmarks/time_to_accuracy.py", "--smoke", "--data", d, "--points", "0.5,1",
             "--out", str(tmp_path / "tta"), "--json", str(res / "time_to_accuracy_smoke.json"))
    run_tool("benchmarks/loss_and_model.py", "--device", "cpu", "--quick", "--skip-step", "--ns", "4",
             "--threads", "1", "--json", str(res / "loss_and_model_smoke.json"))
    # a committed measurement with training-step rows (the smoke run above skips them)
    committed = ROOT / "benchmarks" / "results" / "loss_and_model_cpu2_20261122.json"
    (res / committed.name).write_bytes(committed.read_bytes())
    run_tool("benchmarks/report.py", "--results", str(res))

    pipe = json.loads((res / "pipeline_smoke.json").read_text())
    mem = [r for r in pipe["rows"] if r["source"] == "memory"]
    assert mem and mem[0]["patches_per_s"] > 0 and mem[0]["vs_reference"] > 0
    assert pipe["hardware"]["nproc"] >= 1 and "torch" in pipe["versions"]
    train = json.loads((res / "train_throughput_smoke.json").read_text())
    assert {r["source"] for r in train["rows"]} == {"synthetic", "memory"}
    assert all(r["patches_per_s"] > 0 for r in train["rows"])
    tta = json.loads((res / "time_to_accuracy_smoke.json").read_text())
    assert [round(p["epoch"], 2) for p in tta["points"]] == [0.6, 1.0]  # 5 steps/epoch: 3 and 5 steps
    assert all(0 <= p["linear_top1"] <= 1 and p["train_minutes"] > 0 for p in tta["points"])
    # the monitor's curve from the same run: every half epoch of 5 steps = every 2 steps, and the end
    mon = tta["monitor"]
    n_test = json.loads((cifar_subset_data / "manifest.json").read_text())["splits"]["test"]["count"]
    assert [m["step"] for m in mon] == [2, 4, 5] and all(m["test_images"] == n_test for m in mon)
    assert all(0 <= m["knn_top1"] <= 1 and 0 <= m["linear_top1"] <= 1 for m in mon)
    assert [m["train_s"] for m in mon] == sorted(m["train_s"] for m in mon)
    assert tta["points"][-1]["train_minutes"] * 60 >= mon[-1]["train_s"]
    assert (res / "time_to_accuracy_smoke.png").read_bytes()[:4] == b"\x89PNG"
    report = (res / "REPORT.md").read_text()
    for section in ("Input pipeline", "Training step", "Time to accuracy", "## Loss",
                    "## Training step, model only"):
        assert section in report
    for png in ("pipeline", "train", "loss"):
        assert (res / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    # loss rows: n, b, d first, the speed-up as measured, and the two loss values' agreement
    loss = json.loads((res / "loss_and_model_smoke.json").read_text())["rows"][0]
    row = next(r for r in report.splitlines() if r.endswith("| loss_and_model_smoke.json |"))
    assert row.startswith("| 4 | 100 | 1024 | ") and f"| {loss['naive_over_fused']:,.1f}x |" in row
    assert float(row.split(" | ")[7]) < 1e-3
    steps = [r for r in report.splitlines() if r.endswith(f"| {committed.name} |") and " x 4 | " in r]
    n_steps = sum(r["part"] == "train_step" for r in json.loads(committed.read_text())["rows"])
    assert n_steps and len(steps) == n_steps and steps[0].startswith("| 64 | 20 x 4 | float32 | contiguous | eager | ")
    # one table row per probed point, with the schedule length and the extra train.py arguments
    assert tta["train_args"].startswith("--num-patches 4")
    rows = [r for r in report.splitlines() if r.endswith("| time_to_accuracy_smoke.json |")]
    assert len(rows) == 2 and all(r.startswith(f"| demo.yaml | {cifar_subset_data.name} | 1 | --num-patches 4 ")
                                  for r in rows)


def test_report_reads_train_args_of_older_time_to_accuracy_files():
    from benchmarks.report import _train_args

    old = {"command": "python benchmarks/time_to_accuracy.py --config c.yaml "
                      "--train-args '--run.amp fp32' --points 1"}
    assert _train_args(old) == "--run.amp fp32"
    assert _train_args({"command": "python benchmarks/time_to_accuracy.py --points 1"}) == ""
    assert _train_args({"train_args": "--epochs 2", "command": "x --train-args y"}) == "--epochs 2"


def test_reencode_jpeg_roundtrips_through_the_converter(cifar_subset_data, tmp_path):
    """The re-encoded tar converts back to the same images (labels, order within a class), with
    pixel errors that grow as the quality falls; q100 4:4:4 stays within a few levels. q100 goes
    through tools/convert_datasets.py, the others through --convert-to (which removes the tar)."""
    import numpy as np

    from pipeline.formats import load_manifest
    from pipeline.sources.memory import load_memory_arrays

    src, res = cifar_subset_data, tmp_path / "results"
    n_classes = len(load_manifest(src).classes)
    errors = {}
    for q, sub in ((100, "444"), (50, "420"), (20, "420")):
        tar = tmp_path / f"q{q}.tar"
        args = ("tools/reencode_jpeg.py", str(src), str(tar), "--quality", str(q), "--subsampling",
                sub, "--max-per-class", "5", "--stats", str(res / f"reencode_q{q}.json"))
        if q == 100:
            run_tool(*args)
            run_tool("tools/convert_datasets.py", str(tar), "--name", f"q{q}", "--out", str(tmp_path),
                     "--formats", "memory", "--no-progress")
        else:
            run_tool(*args, "--convert-to", str(tmp_path / f"q{q}"))
            assert not tar.exists() and load_manifest(tmp_path / f"q{q}").formats == ["memory"]
        assert load_manifest(tmp_path / f"q{q}").classes == load_manifest(src).classes
        for split in ("train", "test"):
            orig, olab = load_memory_arrays(src, split)
            new, nlab = load_memory_arrays(tmp_path / f"q{q}", split)
            keep = np.concatenate([np.flatnonzero(olab == c)[:5] for c in range(n_classes)])
            assert new.shape == (5 * n_classes, 32, 32, 3)
            assert np.array_equal(np.sort(nlab), np.sort(olab[keep]))
            # the converter lists files by name: class by class, indices ascending = keep's order
            diff = np.abs(new.astype(np.int16) - orig[keep].astype(np.int16))
            errors.setdefault(q, []).append(diff.mean())
        stats = json.loads((res / f"reencode_q{q}.json").read_text())
        assert stats["splits"]["train"]["images"] == 5 * n_classes
        assert abs(stats["splits"]["train"]["mae"] - errors[q][0]) < 1e-6
    assert max(errors[100]) < 1.0 < min(errors[50]) and max(errors[50]) < min(errors[20])
    run_tool("benchmarks/report.py", "--results", str(res))
    report = (res / "REPORT.md").read_text()
    rows = [r for r in report.splitlines() if r.endswith(".json |") and "reencode_q" in r]
    assert "## JPEG re-encodings" in report and len(rows) == 6 and rows[0].startswith("| 100 | 444 | ")

    bad = run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "q100.tar"), "--quality", "50",
                   check=False)
    assert bad.returncode == 2 and "exists; pass --overwrite" in bad.stderr
    bad = run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "y.tar"), "--quality", "50",
                   "--convert-to", str(tmp_path / "q50"), check=False)
    assert bad.returncode == 2 and f"--convert-to {tmp_path / 'q50'}: exists" in bad.stderr
    assert not (tmp_path / "y.tar").exists()
    for dest, says in ((tmp_path / ".hidden", "plain directory name"), (tmp_path / "y.tar", "OUT"),
                       (tmp_path, "OUT"), (src, "SRC")):
        bad = run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "y.tar"), "--quality", "50",
                       "--convert-to", str(dest), "--overwrite", check=False)
        assert bad.returncode == 2 and f"--convert-to {dest}: " in bad.stderr and says in bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "y.tar").exists()
    # a conversion that fails after the re-encode (DIR's parent is a file) keeps the tar, one line
    (tmp_path / "afile").write_text("x")
    bad = run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "y.tar"), "--quality", "50",
                   "--max-per-class", "1", "--convert-to", str(tmp_path / "afile" / "q"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert f"tar is kept at {tmp_path / 'y.tar'}" in bad.stderr and (tmp_path / "y.tar").is_file()
    # --overwrite replaces an existing DIR; the manifest says where the data came from
    run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "y.tar"), "--quality", "20",
             "--max-per-class", "2", "--convert-to", str(tmp_path / "q50"), "--overwrite")
    m = load_manifest(tmp_path / "q50")
    assert m.splits["train"].count == 2 * n_classes and "re-encoded at JPEG quality 20 420" in m.source
    bad = run_tool("tools/reencode_jpeg.py", str(src), str(tmp_path / "x.tar"), "--quality", "0",
                   check=False)
    assert bad.returncode == 2 and "--quality 0" in bad.stderr and not (tmp_path / "x.tar").exists()


def test_report_plot_labels_stay_apart():
    """Bars with equal labels from different result files get the file appended (matplotlib
    would draw them on top of each other); unique labels are left alone."""
    from benchmarks.report import unique_labels

    rows = [("memory cpu n=20", 1.0, "a.json"), ("memory cpu n=20", 2.0, "b.json"), ("dali", 3.0, "a.json")]
    assert unique_labels(rows) == [("memory cpu n=20 [a.json]", 1.0), ("memory cpu n=20 [b.json]", 2.0),
                                   ("dali", 3.0)]
    assert unique_labels([("x", 1.0, "a"), ("x", 2.0, "a")]) == [("x [a]", 1.0), ("x [a] #2", 2.0)]


def test_report_sections_only_with_rows(tmp_path):
    """A loss file without step rows gives the loss table and plot but no empty step table; a
    speed-up at or below the plot's base still plots; nothing positive plots nothing."""
    import json as _json

    from benchmarks.report import main as report_main, plot_bars

    res = tmp_path / "res"
    res.mkdir()
    rows = [{"part": "loss", "n": n, "b": 100, "d": 1024, "fused_ms": 1.0, "naive_ms": s,
             "batched_autograd_ms": 1.0, "naive_over_fused": s, "loss_fused": -1.0, "loss_fp64_naive": -1.0}
            for n, s in ((20, 0.5), (200, 1.0))]
    (res / "loss_and_model_x.json").write_text(_json.dumps({"rows": rows, "date": "2026-01-01"}))
    report_main(["--results", str(res)])
    report = (res / "REPORT.md").read_text()
    assert "## Loss" in report and "model only" not in report and "## Input pipeline" not in report
    assert "| 0.5x |" in report and "![loss](loss.png)" in report
    assert (res / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_bars([("a", 0.0, "f")], "t", tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def _lars_baseline_missing() -> str:
    """Why benchmarks/lars_update.py's default baseline cannot be read here ('' when it can)."""
    from benchmarks.lars_update import DEFAULT_BASELINE, BaselineUnavailable, resolve_baseline

    try:
        resolve_baseline(DEFAULT_BASELINE)
    except BaselineUnavailable as e:
        return f"baseline {DEFAULT_BASELINE} not in this clone's history ({e})"
    return ""


def test_lars_update_benchmark_agrees_with_the_previous_update(tmp_path):
    """The default baseline, model/lars.py of 5cb8833 loaded from git history, steps the
    parameters as today's LARS does (to float rounding)."""
    if why := _lars_baseline_missing():
        pytest.skip(why)  # a shallow clone
    out = tmp_path / "lars.json"
    run_tool("benchmarks/lars_update.py", "--device", "cpu", "--widths", "4", "--projector", "16,8",
             "--repeats", "1", "--updates", "1", "--threads", "1", "--json", str(out))
    doc = json.loads(out.read_text())
    assert doc["baseline"]["rev"] == "5cb8833" and doc["baseline"]["commit"].startswith("5cb8833")
    rows = doc["rows"]
    assert [r["kind"] for r in rows] == ["previous", "foreach", "tensor_lr"]
    assert all(r["ms_per_update"] > 0 and r["ops_per_update"] > 0 for r in rows)
    assert all(r["max_param_diff_vs_previous"] < 1e-5 for r in rows)  # the same update
    # the old update is the old code: a Python loop per parameter, more operators than today's
    assert rows[0]["ops_per_update"] > rows[1]["ops_per_update"]


def test_lars_update_unknown_baseline_is_one_line(tmp_path):
    proc = run_tool("benchmarks/lars_update.py", "--baseline", "no-such-rev", "--device", "cpu",
                    "--json", str(tmp_path / "lars.json"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--baseline no-such-rev" in lines[0] and "--baseline REV" in lines[0]
    assert not (tmp_path / "lars.json").exists()


def test_lars_update_baseline_imports_its_own_project_modules(tmp_path):
    """A baseline model/lars.py that imports other project modules gets them from its own tree,
    under its own module name; today's ``model`` and sys.path are untouched afterwards."""
    import sys

    import torch

    import model
    import model.lars
    from benchmarks.lars_update import BaselineUnavailable, import_baseline

    tree = tmp_path / "tree"
    (tree / "model").mkdir(parents=True)
    (tree / "model" / "__init__.py").write_text("")
    (tree / "model" / "helper.py").write_text("SCALE = 2.0\n")
    (tree / "model" / "lars.py").write_text(
        "import torch\nfrom model.helper import SCALE\n\n"
        "class LARS(torch.optim.SGD):\n    scale = SCALE\n")
    before_path, before_model = list(sys.path), sys.modules["model"]
    mod = import_baseline("f" * 40, tree)
    assert mod.__name__ == "lars_baseline_" + "f" * 12 and mod.LARS.scale == 2.0
    assert issubclass(mod.LARS, torch.optim.Optimizer) and mod.LARS is not model.lars.LARS
    assert sys.path == before_path and sys.modules["model"] is before_model is model
    assert "model.helper" not in sys.modules and sys.modules["model.lars"] is model.lars

    (tree / "model" / "lars.py").write_text("from model.gone import LARS\n")
    with pytest.raises(BaselineUnavailable, match="fails to import"):
        import_baseline("e" * 40, tree)
    assert sys.path == before_path and sys.modules["model"] is model


def test_startup_benchmark_reports_the_breakdown(cifar_subset_data, tmp_path):
    out = tmp_path / "startup.json"
    run_tool("benchmarks/startup.py", "--data", str(cifar_subset_data), "--baseline", "none",
             "--repeats", "1", "--train-args", "--num-patches 2 --data.batch_size 10 --run.max_steps 1 "
             "--model.projector 32,16 --run.tensorboard false --device cpu", "--probe-args",
             "--max-images 20 --num-patches 2 --probe-epochs 2 --no-plots --quiet --device cpu",
             "--json", str(out))
    med = json.loads(out.read_text())["median"]["current"]
    assert med["train_process_s"] > med["train_loop_s"] > 0
    assert med["time_to_first_step_s"] > 0 and med["startup_s"]["first_step"] > 0
    assert {"imports", "data", "model", "flop_count"} <= set(med["startup_s"])
    assert med["probe_process_s"] > med["probe_timings_s"]["total"] > 0


def test_pipeline_throughput_model_step_share(cifar_subset_data, tmp_path):
    """--model-step: a model_step row on the same patch batch, and each source's share of a
    serial step computed from the two rates."""
    out = tmp_path / "pipe.json"
    run_tool("benchmarks/pipeline_throughput.py", "--data", str(cifar_subset_data), "--n", "2",
             "--batch-size", "4", "--sources", "memory", "--devices", "cpu", "--steps", "1",
             "--repeats", "1", "--warmup", "1", "--threads", "1", "--model-step", "--model-width", "8",
             "--model-steps", "1", "--json", str(out))
    rows = {r["source"]: r for r in json.loads(out.read_text())["rows"]}
    model, mem = rows["model_step"], rows["memory"]
    assert model["stem"] == "cifar" and model["width"] == 8 and model["patches_per_s"] > 0
    tp, tm = 1 / mem["patches_per_s"], 1 / model["patches_per_s"]
    assert abs(mem["share_of_step"] - tp / (tp + tm)) < 1e-3 and 0 < mem["share_of_step"] < 1
    assert "vs_reference" not in model
