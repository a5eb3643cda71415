"""Bag-of-features embeddings: per image, the mean of an encoder's features over n patches.

    images uint8 (B, H, W, 3) -> make_patches -> (n, B, 3, S, S) -> encoder.features(x, kind)
      -> (n*B, d) -> mean over the n patches -> (B, d) float32

The paper's evaluation feature (Sec. 4), shared by ``probe.py`` (every image of a split) and
``train.py``'s monitor (a fixed seeded subset, every K steps). The encoder comes in as an
argument and is only called as ``encoder.features(x, kind)``, so this module knows no network
(pipeline/ never imports model/).

Which images and which patches: ``split_rows`` gives the rows, in order (all of a split, or the
first M of the memory source's seeded epoch order: ``probe.py --max-images M``); the patches come from one generator seeded by
the caller and drawn batch by batch (``images_per_call`` images per encoder call), so the same
rows, batch size and seed give the same patches, whichever script asks.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .patches import AugmentParams, flatten_patches, make_patches
from .sources.base import epoch_order


def images_per_call(extract_batch: int, num_patches: int, out_size: int,
                    device: torch.device, amp: str = "bf16") -> int:
    """Images per encoder call: the flag, or a budget of ~16k (GPU; 8k in fp32, twice the bytes
    per activation) / 1k (CPU) 32px patches."""
    if extract_batch:
        return extract_batch
    per_32px = (16384 if amp == "bf16" else 8192) if device.type == "cuda" else 1024
    budget = per_32px * 32 * 32 // (out_size * out_size)
    return max(1, budget // num_patches)


def class_positions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Each row's position within its class: k for the k-th image of that class in the split's
    order (int64 (N,)). With ``labels`` [2, 0, 2, 1, 0] this is [0, 0, 1, 0, 1]."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # rows grouped by class, split order kept
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
    pos = np.empty(len(labels), dtype=np.int64)
    pos[order] = np.arange(len(labels)) - starts[labels[order]]
    return pos


def split_rows(labels: np.ndarray, *, num_classes: int, batch_size: int, seed: int,
               max_images: int | None, per_class: list[int] | None) -> np.ndarray:
    """The dataset rows one split is embedded from, in extraction order (int64).

    All rows in split order; with ``max_images`` the first ``max_images`` of a seeded
    permutation (a class-sorted split stays balanced); with ``per_class`` only the rows whose
    position within their class (:func:`class_positions`) is below ``per_class[class]``. The
    order is the memory source's (``epoch_order``), so the batches, and with them the patches
    drawn, are the ones probe.py has always used."""
    order = epoch_order(len(labels), batch_size, 0, 0, seed, max_images is not None, 0, 1,
                        False).astype(np.int64)
    if per_class is not None:
        keep = class_positions(labels, num_classes) < np.asarray(per_class)[labels]
        order = order[keep[order]]
    return order[:max_images] if max_images is not None else order


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def row_batches(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int,
                device: torch.device, chunk_bytes: int = 256 << 20):
    """(uint8 (B, H, W, 3), int64 (B,)) on ``device`` for consecutive ``batch_size`` rows.

    When the selected rows take at most a quarter of the device's free memory they are copied
    there once, in extraction order (in ~256 MB pieces), and every batch is a slice of that:
    no host work or transfer per batch. Otherwise each batch is gathered and copied alone."""
    labels_dev = torch.from_numpy(labels[rows]).to(device)  # (N,)
    if len(rows) * images[0].nbytes <= _free_bytes(device) // 4:
        per = max(1, chunk_bytes // images[0].nbytes)
        resident = torch.empty((len(rows), *images.shape[1:]), dtype=torch.uint8, device=device)
        for i in range(0, len(rows), per):  # (N, H, W, 3), in extraction order
            resident[i:i + per].copy_(torch.from_numpy(np.ascontiguousarray(images[rows[i:i + per]])))
        for i in range(0, len(rows), batch_size):
            yield resident[i:i + batch_size], labels_dev[i:i + batch_size]
        return
    for i in range(0, len(rows), batch_size):
        idx = rows[i:i + batch_size]
        yield (torch.from_numpy(np.ascontiguousarray(images[idx])).to(device),
               labels_dev[i:i + batch_size])


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, batches, *, num_patches: int, patch_size: int,
                     out_size: int, mean, std, augment: AugmentParams | None, kind: str,
                     generator: torch.Generator, device: torch.device,
                     max_images: int | None = None, progress: bool = True,
                     desc: str = "features", total: int | None = None, amp: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag-of-features: per image, the mean of ``kind`` features over ``num_patches`` patches.

    ``batches`` yields (uint8 (B, H, W, 3), int64 (B,)) on ``device``. Returns float32 (N, d)
    and int64 (N,) on ``device`` (they stay there for the probes), N = all images (or the first
    ``max_images``); ``total`` is the
    number of batches, for the progress bar. ``amp``: "bf16" runs the encoder under bf16
    autocast on bf16 patches, "fp32" in float32; the mean over patches is taken in float32.
    """
    bf16 = amp == "bf16"
    feats, labels, seen = [], [], 0
    bar = tqdm(batches, desc=desc, total=total, disable=not progress,
               leave=False, dynamic_ncols=True, unit="batch")
    for images, y in bar:
        if max_images is not None and seen + len(y) > max_images:
            images, y = images[:max_images - seen], y[:max_images - seen]
        B = images.shape[0]
        patches = make_patches(images, num_patches=num_patches, patch_size=patch_size,
                               out_size=out_size, mean=mean, std=std, generator=generator,
                               augment=augment,
                               dtype=torch.bfloat16 if bf16 else torch.float32)  # (n, B, 3, S, S)
        x = flatten_patches(patches)  # (n*B, 3, S, S), patch-major
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = encoder.features(x, kind)  # (n*B, d)
        feats.append(f.float().reshape(num_patches, B, -1).mean(0))  # (B, d)
        labels.append(y.to(torch.int64))
        seen += B
        if max_images is not None and seen >= max_images:
            break
    bar.close()
    if not feats:
        raise UserError(f"{desc}: the split has no images")
    return torch.cat(feats), torch.cat(labels)
