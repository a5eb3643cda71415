"""Checkpoints: plain tensors, numbers, strings, lists, tuples and dicts (written atomically by
emp_ssl/checkpoints.py; read here).

Layout of ``ckpt.pt`` (every key is plain data, so ``torch.load(weights_only=True)`` opens it):

    {"format": "emp-ssl-ckpt/1",
     "model": encoder state_dict (the unwrapped, uncompiled EMPEncoder),
     "encoder": EncoderConfig.to_dict(),
     "patch": {"patch_size": P, "out_size": S},
     "data": {"name", "classes", "mean", "std", "image_shape"},
     "optimizer": optimizer state_dict, "step": int (steps done), "epoch": int,
     "steps_per_epoch": int, "total_steps": int (the schedule's length),
     "rng": {...}, "config": resolved run config (dict), "git_commit": str}

The probe rebuilds the encoder from "encoder" + "model" through :func:`load_encoder`.
"""
from __future__ import annotations

from pathlib import Path

import torch

FORMAT = "emp-ssl-ckpt/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not ours: the message says which and why."""


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Load with ``weights_only=True`` (cannot run code); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; pass the ckpt.pt a training run wrote")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an EMP-SSL checkpoint of this project (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    return ckpt


def load_encoder(ckpt: dict, path: Path | str = "checkpoint"):
    """Rebuild the EMPEncoder a checkpoint holds (strict key check). Returns the module (eval mode)."""
    from .encoder import EncoderConfig, build_encoder

    try:
        cfg = EncoderConfig.from_dict(ckpt["encoder"])
        enc = build_encoder(cfg)
        enc.load_state_dict(ckpt["model"], strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: encoder does not match its saved config ({first[:200]})") from None
    return enc.eval()
