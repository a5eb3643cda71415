"""Writing checkpoints (atomic, through pipeline.formats.atomic_path) and when to write them.

Reading lives in model/checkpoint.py (``load_checkpoint``, ``load_encoder``), which knows no
data pipeline; writing needs the atomic-file helper of pipeline/, so it lives here.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from model.checkpoint import FORMAT
from pipeline.formats import atomic_path


def save_checkpoint(path: Path | str, payload: dict) -> None:
    """Write ``payload`` (plain data: tensors, numbers, strings, lists, dicts) to a temp file
    beside ``path``, fsync, then rename over it: an interrupted or failed save (a kill, a full
    disk) leaves the previous checkpoint intact and loadable."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)


def convert_reference_checkpoint(src: Path | str, dst: Path | str, **kwargs) -> Path:
    """The authors' checkpoint ``src`` written as one of this project at ``dst`` (atomic); the
    keyword arguments are :func:`model.reference_ckpt.reference_payload`'s."""
    from model.reference_ckpt import reference_payload

    save_checkpoint(dst, reference_payload(src, **kwargs))
    return Path(dst)


class CheckpointSaver:
    """When to write a periodic checkpoint: every ``steps`` steps, or every ``seconds`` of wall
    time (checked after each step; no host sync), besides the epoch ends."""

    def __init__(self, steps: int, seconds: float):
        self.steps, self.seconds = steps, seconds
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.steps:
            return step % self.steps == 0
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()
