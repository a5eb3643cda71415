"""train.py's accuracy monitor on real CIFAR-10 images (CPU, narrow model): it leaves training
bit for bit unchanged, it gives probe.py's kNN accuracy at probe.py's settings, --stop-at ends
the run (also under DDP), and bad monitor flags are one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model.checkpoint import load_checkpoint

import probe
import train

SMALL = ["--config", "configs/demo.yaml", "--num-patches", "4", "--data.batch_size", "50",
         "--data.max_images", "0", "--model.projector", "128,32", "--run.log_every", "1",
         "--run.tensorboard", "false", "--device", "cpu"]
# a small monitor: 60 train / 60 test images, 2 patches each, 3 linear epochs
MON = ["--monitor.images", "60", "--monitor.patches", "2", "--monitor.epochs", "3"]


def args(data, out, *extra: str) -> list[str]:
    return [*SMALL, "--data", str(data), "--out", str(out), *extra]


def rows(out, kind: str) -> list[dict]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    if kind == "train":
        return [r for r in recs if "loss" in r]
    return [r for r in recs if r.get(kind) is True]


def test_monitor_leaves_training_bit_exact(cifar_subset_data, tmp_path):
    """6 steps without the monitor == 6 steps with it every 2 steps (the monitored run also
    interrupted at step 3 and resumed with other monitor settings, which RESUME_FREE allows):
    the same weights, BatchNorm statistics, optimizer state, global RNG state and losses."""
    plain, mon = tmp_path / "plain", tmp_path / "mon"
    assert train.main(args(cifar_subset_data, plain, "--epochs", "0.6")) == 0
    assert train.main(args(cifar_subset_data, mon, "--epochs", "0.6", "--monitor.every", "2",
                           *MON, "--run.max_steps", "3")) == 0
    assert train.main(args(cifar_subset_data, mon, "--epochs", "0.6", "--monitor.every", "0.4",
                           *MON, "--monitor.feature", "backbone", "--resume")) == 0
    a, b = load_checkpoint(plain / "ckpt.pt"), load_checkpoint(mon / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():  # running_mean/var and num_batches_tracked included
        assert torch.equal(v, b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["loss"] for r in rows(plain, "train")] == [r["loss"] for r in rows(mon, "train")]

    # the monitor ran: step 2 (every 2), then every 0.4 epoch = 4 steps after the resume: 4, and
    # at the end of the schedule: 6; accuracies are fractions, the training clock runs on
    m = rows(mon, "monitor")
    assert [r["step"] for r in m] == [2, 4, 6]
    assert [r["feature"] for r in m] == ["pre_projector", "backbone", "backbone"]
    assert all(0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1 for r in m)
    assert all(r["train_images"] == r["test_images"] == 60 and r["patches"] == 2 for r in m)
    assert 0 < m[0]["train_s"] < m[1]["train_s"] < m[2]["train_s"]
    assert m[1]["epoch"] == pytest.approx(0.4)
    assert b["train_s"] >= m[2]["train_s"]  # the checkpoint carries the clock across resumes
    summ = rows(mon, "summary")[-1]
    assert summ["monitor_cost"]["evals"] == 2 and summ["monitor_cost"]["every_steps"] == 4
    assert 0 < summ["monitor_cost"]["share_of_wall"] < 1


def test_monitor_evaluation_touches_nothing(cifar_subset_data, tmp_path):
    """One evaluation: the model comes back in train mode with the same state, the global RNG
    has not moved, and a second evaluation gives the same features (the same patches)."""
    cfg, _ = train.parse_args(args(cifar_subset_data, tmp_path / "r", "--monitor.every", "1", *MON))
    tr = train.Trainer(cfg, resume=False)
    tr.model.train()
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rng = torch.get_rng_state()
    gen = tr._patch_gen.get_state()
    seen = []
    hook = tr.model.backbone.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    first = tr.monitor.features(tr.model)
    acc = tr.monitor.evaluate(tr.model)
    hook.remove()
    assert seen and not any(seen)  # every monitor forward ran in eval mode
    assert tr.model.training
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(gen, tr._patch_gen.get_state())
    second = tr.monitor.features(tr.model)
    for split in first:
        assert torch.equal(first[split][0], second[split][0]) and first[split][0].shape == (60, 128)
    assert set(acc) == {"knn_top1", "linear_top1", "features_s", "heads_s"}


def test_monitor_matches_probe_at_probe_settings(cifar_subset_data, tmp_path):
    """The monitor with probe.py's images, patches, feature, k and seed gives probe.py's kNN
    accuracy on the checkpoint it evaluated (the end of the run), within 0.1 points."""
    out = tmp_path / "run"
    assert train.main(args(cifar_subset_data, out, "--epochs", "0.3", "--monitor.every", "3",
                           "--monitor.images", "100", "--monitor.patches", "4",
                           "--monitor.epochs", "5", "--monitor.seed", "1")) == 0
    mon = rows(out, "monitor")
    assert [r["step"] for r in mon] == [3]
    assert probe.main(["--checkpoint", str(out / "ckpt.pt"), "--data", str(cifar_subset_data),
                       "--max-images", "100", "--num-patches", "4", "--probe-epochs", "5", "--seed", "1",
                       "--feature", "pre_projector", "--knn-k", "20", "--device", "cpu", "--quiet",
                       "--no-plots"]) == 0
    r = json.loads((out / "probe" / "results.json").read_text())
    assert r["num_train"] == r["num_test"] == 100
    assert abs(r["knn_top1"] - mon[0]["knn_top1"]) <= 0.001, (r["knn_top1"], mon[0])
    # the linear classifier is probe.py's too (same seed and epochs, on the same features)
    assert abs(r["linear_top1"] - mon[0]["linear_top1"]) <= 0.02, (r["linear_top1"], mon[0])


def test_stop_at_ends_the_run_with_a_checkpoint(cifar_subset_data, tmp_path, capsys):
    out = tmp_path / "stop"
    # any encoder beats 1% on 60 test images: the first evaluation (step 2) stops the run
    assert train.main(args(cifar_subset_data, out, "--epochs", "1", "--monitor.every", "2", *MON,
                           "--stop-at", "0.01", "--stop-metric", "knn")) == 0
    printed = capsys.readouterr().out
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert len(rows(out, "train")) == 2
    stop = rows(out, "stop")
    assert len(stop) == 1 and stop[0]["step"] == 2 and stop[0]["epoch"] == pytest.approx(0.2)
    assert stop[0]["metric"] == "knn" and stop[0]["value"] >= 0.01 and stop[0]["train_s"] > 0
    assert stop[0]["value"] == rows(out, "monitor")[0]["knn_top1"]
    summ = rows(out, "summary")[-1]
    assert summ["steps"] == 2 and summ["stop"]["reached"] and summ["stop"]["step"] == 2
    assert "--stop-at 1.00% at step 2" in printed

    # out of reach: the run goes to its end and says so
    out2 = tmp_path / "never"
    assert train.main(args(cifar_subset_data, out2, "--epochs", "0.4", "--monitor.every", "2", *MON,
                           "--stop-at", "1")) == 0
    assert load_checkpoint(out2 / "ckpt.pt")["step"] == 4 and not rows(out2, "stop")
    assert rows(out2, "summary")[-1]["stop"] == {"stop_at": 1.0, "metric": "linear", "reached": False}
    assert "never reached --stop-at 100.00%" in capsys.readouterr().out


def test_stop_at_under_ddp(cifar_subset_data, tmp_path):
    """Rank 0 evaluates and tells rank 1: both stop at the same step, no hang."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29519", "train.py",
                           *args(cifar_subset_data, out, "--epochs", "1", "--monitor.every", "3", *MON,
                                 "--stop-at", "0.01")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3
    assert [r["step"] for r in rows(out, "monitor")] == [3] and rows(out, "stop")[0]["step"] == 3


@pytest.mark.parametrize("extra, needle", [
    (["--monitor.every", "-1"], "--monitor.every -1: give whole steps"),
    (["--monitor.every", "2.5"], "--monitor.every 2.5: give whole steps"),
    (["--monitor.every", "often"], "--monitor.every: cannot read 'often'"),
    (["--stop-at", "0.5"], "--stop-at 0.5: needs the monitor; add --monitor.every"),
    (["--monitor.every", "2", "--stop-at", "90"], "--stop-at 90: an accuracy as a fraction"),
    (["--monitor.every", "2", "--stop-at", "high"], "cannot read 'high' as float"),
    (["--monitor.every", "2", "--stop-at", "0.5", "--stop-metric", "top5"], "--stop-metric top5: choose"),
    (["--monitor.every", "2", "--monitor.images", "0"], "--monitor.images 0: must be >= 1"),
    (["--monitor.every", "2", "--monitor.patches", "0"], "--monitor.patches 0: must be >= 1"),
    (["--monitor.every", "2", "--monitor.feature", "z"], "--monitor.feature z: choose"),
    (["--monitor.every", "2", "--monitor.eval_mode", "x"], "--monitor.eval_mode x: choose"),
    (["--monitor.every", "2", "--model.projector", "32"], "no hidden block"),
    (["--monitor.every", "2", "--monitor.knn_temperature", "0"], "must be > 0"),
    (["--monitor.evrey", "2"], "unknown key 'monitor.evrey'"),
])
def test_bad_monitor_flags_are_one_line(cifar_subset_data, tmp_path, capsys, extra, needle):
    assert train.main(args(cifar_subset_data, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train: error: ") and needle in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_monitor_needs_the_memory_format(cifar_subset_data, tmp_path, capsys):
    """A dataset without the memory format (here: FFCV only) trains, but the monitor names what
    it needs."""
    man = json.loads((cifar_subset_data / "manifest.json").read_text())
    if "ffcv" not in man.get("formats", []):
        pytest.skip("the converted subset has no FFCV copy")
    d = tmp_path / "ffcv_only"
    d.mkdir()
    for f in cifar_subset_data.iterdir():
        if f.name.endswith(".beton"):
            (d / f.name).symlink_to(f)
    man["formats"] = ["ffcv"]
    (d / "manifest.json").write_text(json.dumps(man))
    assert train.main(args(d, tmp_path / "o", "--monitor.every", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--monitor.every: the monitor reads the memory format" in err, err


def test_monitor_cost_benchmark(cifar_subset_data, tmp_path):
    """benchmarks/monitor_cost.py times steps and evaluations and derives the share from them."""
    from benchmarks import monitor_cost

    out = tmp_path / "cost.json"
    assert monitor_cost.main(["--config", "configs/demo.yaml", "--data", str(cifar_subset_data),
                              "--train-args", " ".join(SMALL[2:] + MON), "--every", "0.2,0.5",
                              "--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["steps_per_epoch"] == 10 and r["step_s"] > 0 and r["eval_s"] >= r["features_s"] > 0
    assert r["monitor"]["images"] == {"train": 60, "test": 60} and r["monitor"]["patches"] == 2
    assert [x["every_steps"] for x in r["rows"]] == [2, 5]
    for x in r["rows"]:
        assert x["overhead"] == pytest.approx(r["eval_s"] / (x["every_steps"] * r["step_s"]))
    assert "git_commit" in r and "hardware" in r
