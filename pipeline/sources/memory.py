"""The memory source: a whole split as one uint8 tensor on the device, batches by indexing.

    <split>.u8.npy (N, H, W, 3) uint8, <split>.labels.npy (N,) int64
      -> torch tensors on opts.device, once (CIFAR-10 train: 150 MB)
      -> per epoch: the order (below), copied to the device once
      -> per step: images.index_select(order[k*B:(k+1)*B])        # (B, H, W, 3) uint8

Order: ``pipeline.sources.base.epoch_order`` (shared with ffcv and reference): ``numpy.random.default_rng([seed,
epoch]).permutation(N)`` drawn on the CPU (N int64s, one host-to-device copy per epoch, no
per-step transfer or sync), rank r of W takes the contiguous slice perm[r*(N//W):(r+1)*(N//W)],
cut to whole batches under drop_last, from batch ``start_batch`` on. A pure function of
(seed, epoch, rank, world), so a resumed run sees the same batches, and switching between
the memory and ffcv sources does not change what a run trains on.

``fits_in_memory`` is what ``--source auto`` asks before choosing this source.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..formats import (load_manifest, memory_images_path, memory_labels_path, require_format,
                       require_split)
from .base import Source, SourceOptions, epoch_order

# share of the free device memory (or available host RAM) the split may take
FIT_FRACTION = 0.5
_COPY_CHUNK_BYTES = 256 << 20


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_in_memory(root, split: str, device: torch.device | str) -> bool:
    """True when ``split``'s memory-format arrays exist and take at most FIT_FRACTION of the
    free memory of ``device`` (free GPU memory for cuda, MemAvailable host RAM for cpu)."""
    images, labels = memory_images_path(root, split), memory_labels_path(root, split)
    if not (images.is_file() and labels.is_file()):
        return False
    need = images.stat().st_size + labels.stat().st_size
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_host_bytes()
    return need <= FIT_FRACTION * free


def load_memory_arrays(root, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's (images (N, H, W, 3) uint8 memory-mapped, labels (N,) int64), validated."""
    manifest = load_manifest(root)
    require_split(manifest, root, split)
    require_format(manifest, root, "memory")
    ipath, lpath = memory_images_path(root, split), memory_labels_path(root, split)
    for p in (ipath, lpath):
        if not Path(p).is_file():
            raise UserError(f"{p}: missing; re-convert with --formats memory --overwrite")
    try:
        images = np.load(ipath, mmap_mode="r")
        labels = np.load(lpath)
    except (ValueError, OSError) as e:
        raise UserError(f"{ipath}: unreadable ({e}); re-convert with --overwrite")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"{ipath}: expected uint8 (N, H, W, 3), found {images.dtype} "
                        f"{images.shape}; re-convert with --overwrite")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{lpath}: {labels.shape} labels for {len(images)} images; re-convert "
                        f"with --overwrite")
    return images, labels.astype(np.int64, copy=False)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (memory-mapped) array as a tensor on ``device``, copied in chunks of ~256 MB so the
    host never holds a second full copy."""
    out = torch.empty(array.shape, dtype=torch.uint8, device=device)
    rows = max(1, _COPY_CHUNK_BYTES // max(1, array[0].nbytes))
    for i in range(0, len(array), rows):
        out[i:i + rows].copy_(torch.from_numpy(np.array(array[i:i + rows])))  # a writable copy
    return out


class MemorySource(Source):
    """Yields (images uint8 (B, H, W, 3), labels int64 (B,)), both on opts.device."""

    name = "memory"

    def __init__(self, root, split: str, opts: SourceOptions):
        super().__init__(root, split, opts)
        images, labels = load_memory_arrays(root, split)
        self._set_num_images(len(images))
        self.device = torch.device(opts.device)
        self.images = _to_device(images, self.device)  # (N, H, W, 3) uint8
        self.labels = torch.from_numpy(labels).to(self.device)  # (N,) int64

    def _iter(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.opts
        order = epoch_order(self.num_images, o.batch_size, epoch, start_batch, o.seed, o.shuffle,
                            o.rank, o.world_size, o.drop_last)
        order = torch.from_numpy(order.astype(np.int64)).to(self.device)  # one copy per epoch
        for i in range(0, len(order), o.batch_size):
            idx = order[i:i + o.batch_size]  # (B,)
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)
