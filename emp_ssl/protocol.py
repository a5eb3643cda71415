"""The evaluation protocol's defaults and seeds, in one place.

probe.py, the training monitor and :func:`emp_ssl.embedding.embed` all read these, so a
probe, a monitor evaluation and a user's ``embed`` call on the same pictures draw the same
rows and the same patches.
"""
from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val", "test")  # a split's index in this tuple enters its seeds


@dataclass(frozen=True)
class ProbeProtocol:
    """The paper's linear-evaluation recipe (Sec. 4) and the reference code's kNN."""

    num_patches: int = 128  # patches per image; feature(image) = mean over them
    eval_mode: str = "augmented"  # augmented = the training augmentations | crops
    feature: str = "pre_projector"  # first projector block (what the reference code averages)
    probe_epochs: int = 100  # linear classifier epochs
    probe_batch_size: int = 100
    probe_lr: float = 0.03
    probe_momentum: float = 0.9
    probe_weight_decay: float = 5e-5
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0


PROBE = ProbeProtocol()


def split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def row_seed(seed: int, split: str) -> int:
    """Seed of the shuffle that picks a split's rows (a subset: ``--max-images``)."""
    return seed + split_index(split)


def patch_seed(seed: int, split: str) -> int:
    """Seed of the generator that draws a split's evaluation patches."""
    return seed * 1_000_003 + split_index(split)


def training_augment(ckpt: dict):
    """The augmentation recipe a checkpoint was trained with (its saved config's "augment"
    section), else the paper's defaults: ``(AugmentParams, where it came from)``. The
    "augmented" evaluation mode draws its patches with it (probe.py, exports, ``embed``)."""
    from dataclasses import fields

    from pipeline.patches import AugmentParams

    saved = (ckpt.get("config") or {}).get("augment")
    if isinstance(saved, dict):
        known = {f.name for f in fields(AugmentParams)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
        try:
            return AugmentParams(**d), "checkpoint config"
        except (TypeError, ValueError):
            pass
    return AugmentParams(), "paper defaults (the checkpoint saves no augment config)"
