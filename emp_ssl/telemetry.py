"""What a training run reports: metrics.jsonl, TensorBoard, the progress bar, the throughput
windows, the start-up breakdown and the end-of-run summary (MFU, data wait, monitor cost).

The loop only calls :meth:`RunLog.step_done` / :meth:`RunLog.data_wait` and reads nothing back
except every ``log_every`` steps, where one ``torch.stack(...).tolist()`` is the only host sync.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from model.flops import achieved_tflops

T_START = time.perf_counter()  # set when this module is first imported (train.py imports it first)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), interpreter start-up included; None
    where /proc is missing."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))


class Spans(dict):
    """Named wall-clock seconds of a run's start and end: ``with spans("data"): ...`` adds the
    time the block took to ``spans["data"]``."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t


def startup_breakdown(spans: Spans, import_s: float, t_imports: float) -> dict:
    """Seconds before the first step (and at the end) by phase: interpreter start-up, imports
    (torch's included), setup, data (load + transfer), model (build, optimizer, restore,
    compile wrapper), flop_count, run_dir (git, config, TensorBoard), first_step (the first
    batch, patches and step: compilation, cuDNN autotuning, graph capture), checkpoints."""
    out = dict(spans)
    age = process_age_s()
    if age is not None:
        out["interpreter"] = age - (time.perf_counter() - t_imports)
    out["imports"] = import_s
    return {k: round(v, 3) for k, v in out.items()}


class NonFiniteLoss(RuntimeError):
    pass


def truncate_metrics(path: Path, step: int) -> None:
    """On --resume: drop the records of steps after the checkpoint's (written before a kill),
    so metrics.jsonl reads as one run. Atomic (temp file + rename)."""
    from pipeline.formats import write_bytes_atomic

    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            continue
        keep.append(line)
    write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


class RunLog:
    """Rank 0's record of the loop: one JSON line per ``log_every`` steps (and per monitor
    evaluation), TensorBoard scalars, a tqdm bar, and the training-time clock (the loop's time
    without the monitor's). On other ranks every method is a no-op apart from the clock."""

    def __init__(self, out: Path, *, is_main: bool, tensorboard: bool, total_steps: int, start: int,
                 batch_size: int, num_patches: int, device: torch.device, world: int,
                 flops_per_patch: float, peak, train_s_before: float):
        from tqdm import tqdm

        self.out, self.is_main, self.device, self.world = out, is_main, device, world
        self.batch_size, self.num_patches = batch_size, num_patches
        self.flops_per_patch, self.peak = flops_per_patch, peak
        self.train_s_before = train_s_before
        self.metrics = open(out / "metrics.jsonl", "a") if is_main else None
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        self.bar = tqdm(total=total_steps, initial=start, disable=not is_main, unit="step",
                        dynamic_ncols=True, mininterval=1.0, desc="train")
        self.postfix: dict = {}
        self.t_loop = self.win_t = time.perf_counter()
        self.win_steps, self.win_data, self.total_data = 0, 0.0, 0.0
        self.monitor_s, self.monitor_evals = 0.0, 0

    # -- the clock
    def train_seconds(self) -> float:
        """Training wall-clock of the run so far, over all its invocations: the loop's time
        without the monitor's (what time-to-accuracy reports)."""
        return self.train_s_before + time.perf_counter() - self.t_loop - self.monitor_s

    @contextlib.contextmanager
    def paused(self):
        """A block that is not training (a monitor evaluation): out of the clock and the window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued training work counts as training
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.monitor_s += took
            self.win_t += took

    def data_wait(self, seconds: float) -> None:
        self.win_data += seconds
        self.total_data += seconds

    # -- records
    def write(self, rec: dict, scalars: tuple[str, ...] = (), prefix: str = "train") -> None:
        if not self.is_main:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k in scalars:
                if k in rec and rec[k] is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", rec[k], rec["step"])

    def flops_fields(self, patches_per_s: float) -> dict:
        """Achieved TFLOP/s at a (global) patches/s and, where the peak is known, the MFU."""
        out = {"tflops": achieved_tflops(patches_per_s, self.flops_per_patch)}
        if self.peak is not None:
            out["mfu"] = out["tflops"] / (self.peak.tflops * self.world)
        return out

    def step_done(self, step: int, epoch: int, values, lr: float, log_now: bool) -> dict | None:
        """After ``step`` steps (``values``: the last step's (loss, tcr, inv) tensors): advance the
        bar; every ``log_every`` steps read the values back once and write the record."""
        self.win_steps += 1
        self.bar.update(1)
        if not log_now:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self.win_t
        loss, tcr, inv = torch.stack(list(values)).tolist()  # the one host sync
        imgs = self.win_steps * self.batch_size
        patches_per_s = imgs * self.num_patches / elapsed
        rec = {"step": step, "epoch": epoch, "loss": loss, "tcr": tcr, "inv": inv, "lr": lr,
               "images_per_s": imgs / elapsed, "patches_per_s": patches_per_s,
               **self.flops_fields(patches_per_s), "data_frac": self.win_data / elapsed,
               "time": time.time()}
        self.win_t, self.win_steps, self.win_data = now, 0, 0.0
        if not all(map(_finite, (loss, tcr, inv))):
            raise NonFiniteLoss(rec)
        self.write(rec, ("loss", "tcr", "inv", "lr", "images_per_s", "patches_per_s", "tflops", "mfu"))
        self.show(loss=f"{loss:.2f}", lr=f"{lr:.3g}", img_s=f"{rec['images_per_s']:.0f}",
                  p_s=f"{patches_per_s:.0f}", data=f"{100 * rec['data_frac']:.0f}%")
        return rec

    def show(self, **fields) -> None:
        self.postfix.update(fields)
        self.bar.set_postfix(self.postfix)

    def note(self, text: str) -> None:
        """One line on stderr (rank 0), above the progress bar."""
        if self.is_main:
            self.bar.clear()
            print(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()

    # -- the end
    def summary(self, *, steps: int, wall: float, first_step_s: float, extra: dict) -> dict:
        """The run's closing record: rates over the training time (the first step's compile and
        autotune excluded from the steady rate), FLOPs/MFU, data wait; appended to metrics.jsonl."""
        imgs, n = steps * self.batch_size, self.num_patches
        train_wall = wall - self.monitor_s  # the monitor's evaluations are not training
        steady = ((imgs - self.batch_size) * n / (train_wall - first_step_s)
                  if steps > 1 and train_wall > first_step_s else imgs * n / train_wall)
        flops = self.flops_fields(steady)
        summary = {"summary": True, "steps": steps, "wall_s": round(wall, 2),
                   "train_s": round(self.train_seconds(), 2),
                   "images_per_s": imgs / train_wall, "patches_per_s": imgs * n / train_wall,
                   "patches_per_s_after_first_step": steady, "flops_per_patch": self.flops_per_patch,
                   **flops, "peak_tflops": self.peak.tflops if self.peak else None,
                   "peak": self.peak.source if self.peak else None,
                   "data_wait_frac": self.total_data / train_wall, **extra}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        return summary


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def summary_line(s: dict, *, out: Path, peak) -> str:
    """The one-line summary train.py prints at the end."""
    util = f", {100 * s['mfu']:.1f}% MFU of {peak.tflops:.0f} ({peak.source})" if "mfu" in s else ""
    st = s.get("startup_s") or {}
    phases = ", ".join(f"{k} {st[k]:.1f}" for k in ("imports", "data", "model", "first_step") if k in st)
    ttfs = (f"; time to first step {s['time_to_first_step_s']:.1f}s ({phases})"
            if s.get("time_to_first_step_s") is not None else "")
    mon = ""
    if "monitor_cost" in s:
        m = s["monitor_cost"]
        mon = (f"; monitor {m['evals']} evals, {m['monitor_s']:.1f}s "
               f"({100 * m['share_of_wall']:.1f}% of the wall time)")
    return (f"train: {s['steps']} steps in {s['wall_s']:.1f}s: {s['images_per_s']:.0f} images/s, "
            f"{s['patches_per_s']:.0f} patches/s ({s['patches_per_s_after_first_step']:.0f} after the "
            f"first step: {s['tflops']:.3g} TFLOP/s{util}), data wait {100 * s['data_wait_frac']:.1f}% "
            f"({s['source']}, {s['device']}, {s['amp']}){ttfs}{mon}; checkpoint {out / 'ckpt.pt'}")
