"""The interface every source implements: batches of decoded uint8 images on the device.

A source is built for one split of one converted dataset and yields, per step,
``(images, labels)`` already on ``device``: ``images`` uint8 (B, H, W, 3) (or (B, 3, H, W)),
``labels`` int64 (B,). It never augments: augmentation is pipeline.patches' job.

Epoch order is a pure function of (seed, epoch), so a run resumed at (epoch, batch) sees the
same batches as an uninterrupted one. Under DDP each rank reads a disjoint 1/world shard of
every epoch's order (the global batch is ``batch_size * world``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..formats import SplitInfo, load_manifest, require_format, require_split


def epoch_order(num_images: int, batch_size: int, epoch: int, start_batch: int, seed: int,
                shuffle: bool, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """The epoch order every index-addressed source (memory, ffcv, reference) shares:
    the sample indices rank ``rank`` reads in ``epoch`` from batch ``start_batch`` on."""
    perm = (np.random.default_rng([seed, epoch]).permutation(num_images) if shuffle
            else np.arange(num_images))
    per_rank = num_images // world_size
    mine = perm[rank * per_rank:(rank + 1) * per_rank]  # (N // W,)
    if drop_last:
        mine = mine[:len(mine) // batch_size * batch_size]
    return mine[start_batch * batch_size:].astype(np.uint64)


@dataclass
class SourceOptions:
    batch_size: int  # images per rank per step
    device: torch.device | str = "cpu"
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # decode threads/processes; 0 = the source's own default


class Source:
    """Base class. Subclasses set ``num_images`` and implement ``_iter(epoch, start_batch)``."""

    name = "base"
    yields_patches = False  # True for a source that builds the patches itself (reference)

    def __init__(self, root, split: str, opts: SourceOptions):
        self.root, self.split, self.opts = root, split, opts
        self.epoch = 0
        self.start_batch = 0
        self.num_images = 0

    def _open_split(self, fmt: str) -> SplitInfo:
        """The split's manifest entry, after the checks every source makes: the manifest lists
        the split and ``fmt``. Sets ``num_images`` and checks every rank gets an image."""
        manifest = load_manifest(self.root)
        info = require_split(manifest, self.root, self.split)
        require_format(manifest, self.root, fmt)
        self._set_num_images(info.count)
        return info

    def _set_num_images(self, count: int) -> None:
        self.num_images = count
        if count // self.opts.world_size == 0:
            raise UserError(f"{self.root}: split '{self.split}' has {count} images, fewer than "
                            f"the {self.opts.world_size} ranks")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; the next iteration starts at batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self.num_images // self.opts.world_size
        if self.opts.drop_last:
            return per_rank // self.opts.batch_size
        return -(-per_rank // self.opts.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._iter(self.epoch, self.start_batch)

    def _iter(self, epoch: int, start_batch: int):
        raise NotImplementedError

    def close(self) -> None:
        pass
