"""benchmarks/accuracy_runs.py, the one driver of the accuracy runs, at its smoke scale on the
CPU: conftest.py's lossless real pictures (CIFAR-10 or sample images) and their JPEG twin (the same pictures re-encoded at
quality 75, 4:2:0, as the shared JPEG copy is), trained, probed, compared paired, summarised;
a second invocation skips what is done; bad steps are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

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
    twin = out / f"{cifar_subset_data.name}_jpeg"  # cifar10-subset_jpeg or sample-images_jpeg
    run_tool("tools/reencode_jpeg.py", str(cifar_subset_data), str(out / "q75.tar"), "--quality", "75",
             "--convert-to", str(twin))
    return twin


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
    assert json.loads((out / "probe_jpeg_s0.json").read_text())["dataset"]["name"] == jpeg_twin.name
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


def _tiny_imagenet_tree(src: Path, root: Path, official: int = 10, extra: int = 2) -> list[str]:
    """A Tiny ImageNet layout (wnids.txt, train/<wnid>/images, val/images + val_annotations.txt)
    of ``official`` classes of real JPEGs (CIFAR, or the sample-image crops) upscaled to 64 px,
    20 train and 5 val each, with ``extra`` classes appended to wnids.txt and to the validation
    images, as the public copy has; returns the official class list."""
    from PIL import Image

    classes = sorted(p.name for p in (src / "train").iterdir())
    wnids = [f"n{i:08d}" for i in range(official + extra)]
    (root / "val" / "images").mkdir(parents=True)
    lines, k = [], 0
    for i, wnid in enumerate(wnids):  # source classes reused in turn, other pictures each time
        cls, turn = classes[i % len(classes)], i // len(classes)
        (root / "train" / wnid / "images").mkdir(parents=True)
        for j, f in enumerate(sorted((src / "train" / cls).iterdir())[20 * turn:20 * turn + 20]):
            Image.open(f).resize((64, 64)).save(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG")
        for f in sorted((src / "test" / cls).iterdir())[5 * turn:5 * turn + 5]:
            Image.open(f).resize((64, 64)).save(root / "val" / "images" / f"val_{k}.JPEG")
            lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
            k += 1
    (root / "wnids.txt").write_text("\n".join(wnids))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    return wnids[:official]


def test_tiny_steps_split_archive_converted_trained_and_probed_against_random_init(
        cifar_jpeg_subset_dir, tmp_path):
    """The GPU recipe at smoke scale: the raw Tiny ImageNet tree as a .tar.gz in parts
    (`split -b`), reassembled (`cat`), converted by the driver with the official classes (the
    two extra ones dropped), trained, probed beside a random-init encoder; not paired."""
    import shutil
    import subprocess

    if not (shutil.which("split") and shutil.which("tar")):
        pytest.skip("needs split and tar")
    raw = tmp_path / "raw" / "tiny-imagenet-200"
    official = _tiny_imagenet_tree(cifar_jpeg_subset_dir, raw)
    classes = tmp_path / "wnids10.txt"
    classes.write_text("\n".join(official) + "\n")
    dev = tmp_path / "device"
    dev.mkdir()
    subprocess.run(["tar", "-czf", str(dev / "tiny.tar.gz"), "-C", str(raw.parent),
                    "tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/train", "tiny-imagenet-200/val"],
                   check=True)
    whole = (dev / "tiny.tar.gz").read_bytes()
    part = len(whole) // 3 + 1  # three parts, whatever the pictures compress to (CIFAR or sample crops)
    subprocess.run(["split", "-b", str(part), str(dev / "tiny.tar.gz"), str(dev / "tiny.part.")], check=True)
    (dev / "tiny.tar.gz").unlink()
    parts = sorted(dev.glob("tiny.part.*"))
    assert len(parts) == 3 and all(p.stat().st_size <= part for p in parts)
    (dev / "tiny.tar.gz").write_bytes(b"".join(p.read_bytes() for p in parts))  # = cat parts
    assert (dev / "tiny.tar.gz").read_bytes() == whole

    out, data_dir = tmp_path / "results", tmp_path / "data"
    proc = run_tool("benchmarks/accuracy_runs.py", "--smoke", "--steps", "tiny_s0", "--tiny",
                    str(dev / "tiny.tar.gz"), "--tiny-classes", str(classes), "--data-dir",
                    str(data_dir), "--out", str(out), "--runs", str(tmp_path / "runs"),
                    "--threads", "1")
    assert "0 failed" in proc.stdout
    manifest = json.loads((data_dir / "tinyimagenet" / "manifest.json").read_text())
    assert manifest["classes"] == official
    trained = json.loads((out / "probe_tiny_s0.json").read_text())
    rand = json.loads((out / "probe_tiny_s0.random_init.json").read_text())
    assert trained["num_test"] == rand["num_test"] == 50  # 10 classes x 5 val images, extras gone
    assert trained["dataset"]["name"] == "tinyimagenet" and not trained["dataset"]["source"].startswith("/")
    t = json.loads((out / "train_tiny_s0.json").read_text())
    assert t["config"] == "configs/tinyimagenet.yaml" and t["train_summary"]["steps"] == 2
    assert t["train_command"].startswith("python train.py") and "--random-init" in t["random_init_probe_command"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparisons"] == {} and "tiny" in summary["dataset_scales"]
    assert {r["step"] for r in summary["accuracies"]} == {"tiny_s0", "tiny_s0.random_init"}
    assert [p.name for p in out.glob("compare_*")] == ["compare_tiny_s0_vs_random_init.json"]
    pair = json.loads((out / "compare_tiny_s0_vs_random_init.json").read_text())["pairs"][0]["linear"]
    assert pair["pairs"] == 50 and pair["acc_a"] == trained["linear_top1"] and pair["acc_b"] == rand["linear_top1"]


def test_dataset_steps_need_their_data(tmp_path):
    for step, flag in (("tiny_s0", "--tiny"), ("in100_e10_s0", "--in100")):
        proc = run_tool("benchmarks/accuracy_runs.py", "--smoke", "--steps", step, "--out",
                        str(tmp_path / "o"), check=False)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and flag in proc.stderr
