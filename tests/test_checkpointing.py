"""Periodic checkpoints (--run.save_every): the flag, the time-based trigger, a run killed with
SIGKILL at random moments and resumed each time ending bit-identical to an uninterrupted one,
and a failed checkpoint write (a full disk) that leaves the previous checkpoint loadable."""
from __future__ import annotations

import errno
import json
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

import emp_ssl.checkpoints as checkpoints
import train
from conftest import ROOT
from emp_ssl.checkpoints import CheckpointSaver
from emp_ssl.config import parse_save_every
from model.checkpoint import load_checkpoint
from pipeline.errors import UserError

SMALL = ["--config", "configs/demo.yaml", "--num-patches", "4", "--data.batch_size", "50",
         "--data.max_images", "0", "--model.width", "8", "--model.projector", "64,16",
         "--run.log_every", "1", "--run.tensorboard", "false", "--device", "cpu"]


def small_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL, "--data", str(data), "--out", str(out), *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints' model and optimizer states are bit-identical."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid, st in oa["state"].items():
        assert st.keys() == ob["state"][pid].keys(), pid
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, ob["state"][pid][k]), (pid, k)
            else:
                assert v == ob["state"][pid][k], (pid, k)


# -- the flag

@pytest.mark.parametrize("value,expected", [
    ("500", (500, 0.0)), ("1", (1, 0.0)), ("0", (0, 0.0)), ("10m", (0, 600.0)), ("90s", (0, 90.0)),
    ("1h", (0, 3600.0)), ("1.5m", (0, 90.0)), (" 3 ", (3, 0.0))])
def test_parse_save_every(value, expected):
    assert parse_save_every(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "10x", "m", "1.5", "-3", "10 m s", "5d"])
def test_parse_save_every_rejects(value):
    with pytest.raises(UserError) as e:
        parse_save_every(value)
    msg = str(e.value)
    assert msg.startswith("--run.save_every") and "\n" not in msg and repr(value) in msg


def test_save_every_flag_reaches_config_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/demo.yaml", "--print-config"])
    assert e.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["save_every"] == "10m"  # the default
    for flag in ("--save-every", "--run.save_every"):
        with pytest.raises(SystemExit):
            train.main(["--config", "configs/demo.yaml", flag, "90s", "--print-config"])
        assert yaml.safe_load(capsys.readouterr().out)["run"]["save_every"] == "90s"
    assert train.main(["--config", "configs/demo.yaml", "--save-every", "10x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: error: --run.save_every '10x'"), err


def test_time_based_saver(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(checkpoints, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    s = CheckpointSaver(*parse_save_every("90s"))
    assert not s.due(1)
    now[0] += 89.9
    assert not s.due(2)
    now[0] += 0.2
    assert s.due(3) and s.due(4)  # due until a checkpoint is written
    s.saved()
    assert not s.due(5)
    now[0] += 90
    assert s.due(6)
    # by steps: the step count decides, never the clock
    s = CheckpointSaver(*parse_save_every("3"))
    now[0] += 1e6
    assert [st for st in range(1, 10) if s.due(st)] == [3, 6, 9]
    # 0: only at epoch ends (the loop's own rule), never periodically
    s = CheckpointSaver(*parse_save_every("0"))
    now[0] += 1e6
    assert not any(s.due(st) for st in range(1, 100))


# -- SIGKILL at random moments, resumed each time

def _start(args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    try:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)
    finally:
        f.close()


def _logged_since(out: Path, t0: float) -> int:
    """The last step logged (metrics.jsonl) by a process started at ``t0``; 0 if none yet.
    Records of an earlier, killed invocation are older than ``t0``."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    last = 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec and rec.get("time", 0) >= t0:
            last = max(last, rec["step"])
    return last


@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_then_resume_is_bit_exact(cifar_subset_data, tmp_path):
    steps, kills = 24, 4  # 500 images / 25 per step = 20 steps an epoch; 1.2 epochs
    full, part, log = tmp_path / "full", tmp_path / "part", tmp_path / "train.log"
    t_test = time.time()
    extra = ("--epochs", "1.2", "--save-every", "3", "--data.batch_size", "25", "--num-patches", "2")
    ref = _start(small_args(cifar_subset_data, full, *extra), log)
    assert ref.wait(timeout=300) == 0, log.read_text()[-3000:]

    rng = random.Random(22)
    killed_at, resumed_from = [], []
    while True:
        resume = (part / "ckpt.pt").exists()
        base = load_checkpoint(part / "ckpt.pt")["step"] if resume else 0
        resumed_from.append(base)
        t0 = time.time()
        proc = _start(small_args(cifar_subset_data, part, *extra, *(["--resume"] if resume else [])), log)
        if len(killed_at) == kills:
            break
        # a random number of new steps (1 to 7: before, at or after the next checkpoint), then a
        # random moment within the next steps
        target, deadline = base + rng.randint(1, 7), time.time() + 200
        while proc.poll() is None and _logged_since(part, t0) < target and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # it finished first: fine, nothing left to kill
            break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        killed_at.append(_logged_since(part, t0))
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert len(killed_at) == kills, (killed_at, resumed_from)

    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(part / "ckpt.pt")
    assert a["step"] == b["step"] == steps
    assert_same_state(a, b)
    # metrics.jsonl reads as one run: each step's record once, none lost
    logged = [r["step"] for r in records(part) if "loss" in r]
    assert sorted(logged) == list(range(1, steps + 1)), (logged, killed_at, resumed_from)
    assert sum("summary" in r for r in records(part)) == 1
    print(f"killed after steps {killed_at}; resumed from {resumed_from}; "
          f"{time.time() - t_test:.0f}s")


# -- a failed checkpoint write (a full disk)

def _failing_saves(monkeypatch, fail_on: int):
    """Make the ``fail_on``-th call of train.save_checkpoint fail as a full disk would: midway
    through torch.save's write, inside the real (atomic) save_checkpoint. Before failing, the
    checkpoint already there must load. Returns the list of steps save_checkpoint was called at."""
    real, calls = train.save_checkpoint, []

    def save(path, payload):
        calls.append(payload["step"])
        if len(calls) != fail_on:
            return real(path, payload)
        assert load_checkpoint(path)["step"] == calls[-2]  # the previous one is there

        def torch_save(obj, f, *a, **k):
            f.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(torch, "save", torch_save)
            real(path, payload)

    monkeypatch.setattr(train, "save_checkpoint", save)
    return calls


def _warnings(err: str) -> list[str]:
    return [l for l in err.splitlines() if "warning" in l]


def test_failed_periodic_save_keeps_previous_and_run_continues(cifar_subset_data, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    calls = _failing_saves(monkeypatch, fail_on=2)
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "1", "--save-every", "3")) == 0
    assert calls == [3, 6, 9, 10]  # periodic at 3, 6 (fails), 9; the final one at 10
    warn = _warnings(capsys.readouterr().err)
    assert len(warn) == 1, warn
    assert warn[0].startswith("train: warning: checkpoint at step 6 not written (No space left on device)")
    assert f"{out / 'ckpt.pt'} is intact" in warn[0] and warn[0].endswith("(training continues)")
    failed = [r for r in records(out) if r.get("checkpoint_failed")]
    assert len(failed) == 1 and failed[0]["step"] == 6 and "No space left" in failed[0]["error"]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 10
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]  # the partial file is gone
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 11))


def test_failed_final_save_exits_1_and_keeps_previous(cifar_subset_data, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "run"
    calls = _failing_saves(monkeypatch, fail_on=4)
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "1", "--save-every", "3")) == 1
    assert calls == [3, 6, 9, 10]
    warn = _warnings(capsys.readouterr().err)
    assert len(warn) == 1 and "checkpoint at step 10 not written" in warn[0], warn
    assert f"{out / 'ckpt.pt'} is intact" in warn[0]
    assert "--resume" in warn[0] and "training continues" not in warn[0]  # it does not
    assert load_checkpoint(out / "ckpt.pt")["step"] == 9
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    # and the run resumes from there to the end
    monkeypatch.undo()
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "1", "--save-every", "3",
                                 "--resume")) == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == 10


def test_a_write_killed_half_way_leaves_no_temp_file_behind(cifar_subset_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    half = out / ".ckpt.pt.0123456789ab.tmp"  # what atomic_path leaves when SIGKILLed mid-write
    half.write_bytes(b"\0" * 4096)
    other = out / "notes.tmp"  # not ours: left alone
    other.write_text("x")
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "1")) == 0
    assert not half.exists() and other.exists()
    assert sorted(f.name for f in out.iterdir() if f.name.endswith(".tmp")) == ["notes.tmp"]
