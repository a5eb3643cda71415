"""Where and how a run computes: device, precision, torchrun ranks, the git commit."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
AMP_CHOICES = ("auto", "bf16", "fp32")


def resolve_device(name: str, local_rank: int = 0, flag: str = "--device") -> torch.device:
    """auto -> this rank's GPU when CUDA is available, else the CPU; cpu; cuda; cuda:K."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: no CUDA GPU here; use {flag} cpu (or auto)")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if name.startswith("cuda:") and name[5:].isdigit():
        return torch.device(name)
    raise UserError(f"{flag} {name}: choose auto, cpu, cuda or cuda:K")


def resolve_amp(amp: str, device: torch.device, flag: str = "--amp") -> str:
    """auto -> bf16 autocast on CUDA, fp32 on the CPU."""
    if amp not in AMP_CHOICES:
        raise UserError(f"{flag} {amp}: choose {', '.join(AMP_CHOICES)}")
    return amp if amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def git_commit() -> str:
    """HEAD of this repository (``-dirty`` with uncommitted changes to tracked files), or
    "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
