"""benchmarks/runner.py: the train.py / probe.py command lines the accuracy drivers share, the
one-line failure naming the log, probe results with repository-relative dataset paths."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from benchmarks import runner
from benchmarks.runner import (ROOT, RunFailed, probe_command, read_probe, run_logged, shown,
                               train_command)


def test_commands():
    assert train_command("configs/demo.yaml", Path("data/c"), Path("runs/x"), "--seed", "1") == [
        sys.executable, "train.py", "--config", "configs/demo.yaml", "--data", "data/c",
        "--out", "runs/x", "--seed", "1"]
    probe = probe_command(Path("runs/x/ckpt.pt"), "data/c", Path("runs/x/probe"), "--quiet")
    assert probe == [sys.executable, "probe.py", "--checkpoint", "runs/x/ckpt.pt", "--data", "data/c",
                     "--out", "runs/x/probe", "--quiet"]
    rand = probe_command("runs/x/ckpt.pt", "data/c", "runs/x/probe-random-init", "--quiet",
                         random_init=True)
    assert rand == [*probe[:7], "runs/x/probe-random-init", "--random-init", "--quiet"]
    assert shown(probe).startswith("python probe.py --checkpoint runs/x/ckpt.pt")


def test_run_logged_appends_command_and_output(tmp_path):
    log = tmp_path / "logs" / "step.log"
    cmd = [sys.executable, "-c", "print('hello')"]
    assert run_logged(cmd, log) >= 0
    run_logged(cmd, log)
    lines = log.read_text().splitlines()
    assert lines[0] == "+ " + shlex.join(cmd) == lines[2]
    assert lines.count("hello") == 2 and len(lines) == 4


def test_failure_is_one_line_naming_the_log(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('loading')\nprint('error: no such split', file=sys.stderr)\n"
                      "sys.exit(3)\n")
    log = tmp_path / "run.log"
    with pytest.raises(RunFailed) as info:
        run_logged([sys.executable, str(script), "--flag"], log)
    msg = str(info.value)
    assert "\n" not in msg and info.value.code == 3
    assert msg.startswith(f"{script} exited 3 (log: {log}): ")
    assert msg.endswith("loading | error: no such split")
    assert isinstance(info.value, RuntimeError)  # the drivers' `except RuntimeError` still catch it
    with pytest.raises(RunFailed) as info:  # no log: the output went to the console
        run_logged([sys.executable, str(script)])
    assert str(info.value) == f"{script} exited 3"


def test_read_probe_makes_dataset_source_relative(tmp_path):
    src = str(ROOT.parent / "shared" / "datasets" / "cifar10-png.tar.xz")
    (tmp_path / "results.json").write_text(json.dumps(
        {"linear_top1": 0.5, "dataset": {"name": "cifar10", "source": src}}))
    r = read_probe(tmp_path)
    assert r["dataset"]["source"] == str(Path("..") / "shared" / "datasets" / "cifar10-png.tar.xz")
    assert r["linear_top1"] == 0.5
    assert read_probe(tmp_path, relative_source=False)["dataset"]["source"] == src
    (tmp_path / "results.json").write_text(json.dumps({"linear_top1": 0.5, "dataset": "cifar10"}))
    assert read_probe(tmp_path)["dataset"] == "cifar10"


def test_demo_builds_its_commands_through_the_runner(tmp_path, monkeypatch, capsys):
    """tools/demo.py: train, probe, random-init probe, each from the runner's command lines."""
    from tools import demo

    data, out = tmp_path / "data" / "c10", tmp_path / "out"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"source": "x.tar.xz"}))
    ran = []

    def fake(cmd, log=None, env=None):
        ran.append(cmd)
        if cmd[1] == "probe.py":
            dest = Path(cmd[cmd.index("--out") + 1])
            dest.mkdir(parents=True)
            (dest / "results.json").write_text(json.dumps(
                {"linear_top1": 0.4, "knn_top1": 0.3, "num_train": 10, "num_test": 5}))
        return 0.0

    monkeypatch.setattr(demo, "run_logged", fake)
    assert demo.main(["--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    train, probe, rand = ran
    assert train == train_command("configs/demo.yaml", data, out, "--device", "cpu")
    extra = ["--num-patches", "8", "--probe-epochs", "30", "--device", "cpu", "--max-train-images", "4000"]
    assert probe == probe_command(out / "ckpt.pt", data, out / "probe", *extra)
    assert rand == probe_command(out / "ckpt.pt", data, out / "probe-random-init", *extra, "--no-plots",
                                 random_init=True)
    assert "40.00%" in capsys.readouterr().out

    def failing(cmd, log=None, env=None):
        raise RunFailed(cmd, 2)

    monkeypatch.setattr(demo, "run_logged", failing)
    with pytest.raises(SystemExit) as info:
        demo.main(["--data", str(data), "--out", str(out), "--device", "cpu"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "demo: error: train.py exited 2"
    assert runner.ROOT == ROOT
