"""Shared helpers of the benchmark scripts: what ran where, timing, and the JSON they write.

    env = environment()                    # {"hardware", "versions", "command", "git_commit", "date"}
    t, times = median_time(step, repeats=5, warmup=2, device=dev)   # seconds, median + all
    write_json(results_path("pipeline"), {**env, "rows": rows})
                                           # -> benchmarks/results/pipeline_<hostkind>_<date>.json

Timing: wall clock (time.perf_counter) with torch.cuda.synchronize() before and after on a
CUDA device, so host work (data loading) and queued GPU work both count. Library versions come
from the installed distributions' metadata: nothing heavy (DALI, FFCV) is imported.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from emp_ssl.runtime import git_commit  # noqa: E402
from pipeline.formats import default_workers, write_json_atomic  # noqa: E402

DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pillow", "nvidia-dali-cuda130", "ffcv", "numba")


def command() -> str:
    """This process's command line, as typed from the repo root."""
    return " ".join(["python", *(shlex.quote(a) for a in sys.argv)])


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def hardware() -> dict:
    hw = {"platform": platform.platform(), "nproc": os.cpu_count(),
          "cpus_usable": default_workers(), "torch_threads": torch.get_num_threads(),
          "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as f:
            hw["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        with open("/proc/meminfo") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
        hw["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw["gpu"] = props.name
        hw["gpu_count"] = torch.cuda.device_count()
        hw["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return hw


def environment() -> dict:
    """Everything a result needs beside its numbers: hardware, versions, command, commit, date."""
    return {"hardware": hardware(), "versions": versions(), "command": command(),
            "git_commit": git_commit(), "date": _dt.datetime.now().isoformat(timespec="seconds")}


def host_kind() -> str:
    """A short name of this machine for result file names: the GPU model ('h100') or 'cpu<N>'."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"\b([a-z]+\d{2,4}[a-z]*)\b", name.replace("nvidia", ""))
        return re.sub(r"[^a-z0-9]+", "", m.group(1) if m else name)[:16]
    return f"cpu{default_workers()}"


def results_path(stem: str) -> Path:
    """benchmarks/results/<stem>_<hostkind>_<YYYYMMDD>.json"""
    return RESULTS_DIR / f"{stem}_{host_kind()}_{_dt.date.today():%Y%m%d}.json"


def write_json(path: Path | str, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename); returns the path."""
    path = Path(path)
    write_json_atomic(path, obj)
    return path


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of fn takes, its queued GPU work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> tuple[float, list[float]]:
    """(median seconds, all seconds) of ``repeats`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [time_call(fn, device) for _ in range(repeats)]
    return statistics.median(times), times


def endless(source):
    """A data source's batches across epochs, forever (``set_epoch`` before each pass)."""
    epoch = 0
    while True:
        source.set_epoch(epoch)
        yield from source
        epoch += 1


def renamed(argv, mapping: dict[str, str], prog: str) -> list[str]:
    """argv (default sys.argv[1:]) with deprecated flag spellings mapped to the shared
    vocabulary (emp_ssl/cli.py), one note per old flag."""
    import sys

    from emp_ssl.cli import rename_flags

    return rename_flags(sys.argv[1:] if argv is None else list(argv), mapping, prog)
