"""Resumable conversions: the work directory, the settings a resume must match, the checkpoints.

A conversion writes into ``OUT/.NAME.tmp-<pid>-<hex>/``, which is renamed to ``OUT/NAME`` only
once complete (manifest.json written last), and records its progress there, in ``.resume/``:

    .resume/state.json                   settings (what --resume must match) + ffcv encoding chosen
    .resume/<split>/chunk-NNNNNN.json    one per finished chunk of the split (ChunkRecord)
    .resume/<split>/done                 the split's files are complete

A split is converted in chunks of ``samples_per_shard`` kept images (chunk k = DALI shard k);
a chunk's record is written, atomically, only once every byte of the chunk is on disk
(fsynced): its shard, its rows of the .npy, its metadata rows and pages of the .beton. So a
run killed at any moment (a signal, a crash, the machine going down) leaves a directory from
which ``--resume`` continues at the first unfinished chunk; whatever was written past the last
record is overwritten, and the result is byte for byte the one of an uninterrupted run.

Not resumable: a directory whose process is alive (another conversion), or whose settings
differ (another SOURCE, --formats, --resize, ...): the user is told which. A run without
--resume removes the directories of dead runs, as before.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from array import array
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..formats import write_json_atomic

STATE_DIR = ".resume"
STATE_NAME = "state.json"
DONE_NAME = "done"
FLAGS = {"source": "SOURCE", "plan": "SOURCE's files", "source_format": "SOURCE's layout",
         "classes": "--classes", "formats": "--formats", "resize": "--resize",
         "jpeg_quality": "--jpeg-quality", "ffcv_encoding": "--ffcv-encoding",
         "samples_per_shard": "--samples-per-shard", "skip_bad": "--skip-bad (it may be added, "
         "not dropped)", "tool_version": "the converter's version"}


def temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _pid_of(d: Path, name: str) -> int | None:
    pid = d.name[len(temp_prefix(name)):].split("-")[0]
    return int(pid) if pid.isdigit() else None


def _in_use(pid: int) -> bool:
    """A live process other than this one (an earlier convert() of this process is over)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def dead_temp_dirs(out: Path, name: str) -> list[Path]:
    """OUT/.NAME.tmp-<pid>-* directories whose process is gone, newest first."""
    found = []
    for d in out.glob(f"{temp_prefix(name)}*-*"):
        pid = _pid_of(d, name)
        if pid is not None and d.is_dir() and not _in_use(pid):
            found.append(d)
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def differences(old: dict, new: dict) -> list[str]:
    """Settings keys that keep a partial conversion made with ``old`` from being resumed with
    ``new``; --skip-bad may be added on resume (the chunks so far skipped nothing), not dropped."""
    keys = sorted((set(old) | set(new)) - {"skip_bad"})
    diffs = [k for k in keys if old.get(k) != new.get(k)]
    if old.get("skip_bad") and not new.get("skip_bad"):
        diffs.append("skip_bad")
    return diffs


@dataclass
class SplitProgress:
    """A split's finished chunks, folded: where to continue and what they hold."""

    chunks: int = 0  # finished chunks
    next_index: int = 0  # the first source index (SplitPlan order) not consumed yet
    labels: list[np.ndarray] = field(default_factory=list)  # int64 per chunk, of kept images
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    shapes: set = field(default_factory=set)  # (H, W, 3) of kept images
    stats: np.ndarray = field(default_factory=lambda: np.zeros(7, np.int64))  # pixel_sums, summed
    passthrough: int = 0  # JPEGs stored untouched in the shards
    first: int | None = None  # source index of the first kept image
    ffcv: dict | None = None  # BetonWriter state after the last chunk, allocations left out
    done: bool = False

    @property
    def kept(self) -> int:
        return sum(len(l) for l in self.labels)

    def label_array(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)

    def absorb(self, rec: dict) -> None:
        """Add one chunk record (ChunkRecord.to_json) to the progress."""
        if rec["chunk"] != self.chunks:
            raise ValueError(f"chunk {rec['chunk']} after {self.chunks} chunks")
        self.chunks += 1
        self.next_index = rec["next_index"]
        self.labels.append(np.asarray(rec["labels"], np.int64))
        self.skipped += rec["skipped"]
        self.shapes |= {tuple(s) for s in rec["shapes"]}
        self.stats = self.stats + np.asarray(rec["stats"], np.int64)
        self.passthrough += rec["passthrough"]
        if self.first is None:
            self.first = rec["first"]
        if rec["ffcv"] is not None:
            self.ffcv = {k: v for k, v in rec["ffcv"].items() if k not in ("ptrs", "sizes")}


@dataclass
class ChunkRecord:
    """What one chunk adds, accumulated while it is written."""

    chunk: int
    next_index: int
    labels: list[int] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    shapes: set = field(default_factory=set)
    stats: np.ndarray = field(default_factory=lambda: np.zeros(7, np.int64))
    passthrough: int = 0
    first: int | None = None

    def empty(self) -> bool:
        return not self.labels and not self.skipped

    def to_json(self, ffcv: dict | None) -> dict:
        return {"chunk": self.chunk, "next_index": self.next_index, "labels": self.labels,
                "skipped": self.skipped, "shapes": sorted(list(s) for s in self.shapes),
                "stats": [int(x) for x in self.stats], "passthrough": self.passthrough,
                "first": self.first, "ffcv": ffcv}


class WorkDir:
    """OUT/.NAME.tmp-<pid>-<hex>/ with its .resume/ state."""

    def __init__(self, path: Path, state: dict):
        self.path = path
        self.state = state

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @classmethod
    def create(cls, out: Path, name: str, settings: dict) -> "WorkDir":
        path = out / f"{temp_prefix(name)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        work = cls(path, {"settings": settings, "ffcv_encoding": None})
        work.save_state()
        return work

    @classmethod
    def load(cls, path: Path) -> "WorkDir | None":
        try:
            state = json.loads((path / STATE_DIR / STATE_NAME).read_text())
        except (OSError, ValueError):
            return None
        return cls(path, state) if isinstance(state, dict) and "settings" in state else None

    def save_state(self) -> None:
        write_json_atomic(self.state_dir / STATE_NAME, self.state)

    def _split_dir(self, split: str) -> Path:
        return self.state_dir / split

    def save_record(self, split: str, rec: dict) -> None:
        write_json_atomic(self._split_dir(split) / f"chunk-{rec['chunk']:06d}.json", rec)

    def mark_done(self, split: str) -> None:
        write_json_atomic(self._split_dir(split) / DONE_NAME, {})

    def progress(self, split: str) -> tuple[SplitProgress, dict | None]:
        """The split's finished chunks (0, 1, ... without a gap), folded, and the state its
        .beton continues from (``BetonWriter(resume=...)``; None without ffcv chunks)."""
        prog = SplitProgress()
        ptrs, sizes = array("q"), array("q")  # 8 bytes an image
        d = self._split_dir(split)
        while (p := d / f"chunk-{prog.chunks:06d}.json").is_file():
            rec = json.loads(p.read_text())
            prog.absorb(rec)
            if rec["ffcv"] is not None:
                ptrs.extend(rec["ffcv"]["ptrs"])
                sizes.extend(rec["ffcv"]["sizes"])
        prog.done = (d / DONE_NAME).is_file()
        beton = None if prog.ffcv is None else {**prog.ffcv, "ptrs": ptrs, "sizes": sizes}
        return prog, beton

    def finished_chunks(self) -> int:
        return sum(1 for _ in self.state_dir.glob("*/chunk-*.json"))

    def remove_temp_files(self) -> None:
        """Half-written files of an atomic write that was interrupted (``.<name>.<hex>.tmp``)."""
        for p in self.path.rglob(".*.tmp"):
            if p.is_file():
                p.unlink()

    def drop_state(self) -> None:
        shutil.rmtree(self.state_dir)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def prepare_work_dir(out: Path, name: str, settings: dict, resume: bool) -> tuple[WorkDir, list[str]]:
    """A fresh work directory, or with ``resume`` the partial one of a dead run with the same
    settings (renamed to this process' pid); notes for the user."""
    dead = dead_temp_dirs(out, name)
    if not resume:
        for d in dead:
            shutil.rmtree(d, ignore_errors=True)
        return WorkDir.create(out, name, settings), []
    candidates = [(d, WorkDir.load(d)) for d in dead]
    usable = [(d, w) for d, w in candidates if w is not None]
    match = next((w for d, w in usable if not differences(w.state["settings"], settings)), None)
    if match is None and usable:
        d, w = usable[0]
        diffs = ", ".join(FLAGS.get(k, k) for k in differences(w.state["settings"], settings))
        raise UserError(f"--resume: {d} holds a conversion of {name} with other settings "
                        f"({diffs}); rerun with the same ones, or without --resume to start over")
    for d, w in candidates:
        if w is None:  # died before its first state: nothing to resume
            shutil.rmtree(d, ignore_errors=True)
    if match is None:
        return WorkDir.create(out, name, settings), [
            f"--resume: no partial conversion of {name} in {out}; started from the beginning"]
    new = out / f"{temp_prefix(name)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(match.path, new)  # now marked as this process'
    match.path = new
    match.state["settings"] = settings
    match.save_state()
    match.remove_temp_files()
    return match, [f"--resume: continuing the partial conversion in {new}"]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_held():
    """Stop signals (SIGINT, SIGTERM, SIGHUP) arriving inside the block reach their handlers
    only after it (when in the main thread, the only one Python runs handlers in)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    old = {s: h for s, h in old.items() if h is not None}  # None: set outside Python, left as is
    for s in old:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending:
            signal.raise_signal(s)
