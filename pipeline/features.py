"""Bag-of-features embeddings: per image, the mean of an encoder's features over n patches.

    images uint8 (B, H, W, 3) -> make_patches -> (n, B, 3, S, S) -> encoder.features(x, kind)
      -> (n*B, d) -> mean over the n patches -> (B, d) float32

The paper's evaluation feature (Sec. 4), shared by ``probe.py`` (every image of a split) and
``train.py``'s monitor (a fixed seeded subset, every K steps). The encoder comes in as an
argument and is only called as ``encoder.features(x, kind)``, so this module knows no network
(pipeline/ never imports model/).

Which images and which patches: ``subset_rows`` is the first M rows of the memory source's
seeded epoch order (``probe.py --max-images M``); the patches come from one generator seeded by
the caller and drawn batch by batch (``images_per_call`` images per encoder call), so the same
rows, batch size and seed give the same patches, whichever script asks.
"""
from __future__ import annotations

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


def subset_rows(num_images: int, max_images: int, seed: int) -> np.ndarray:
    """The rows ``probe.py --max-images`` embeds, in its order: the first ``max_images`` of
    the memory source's seeded permutation of the split (epoch 0; a class-sorted split stays
    balanced). int64 (min(max_images, num_images),)."""
    order = epoch_order(num_images, 1, 0, 0, seed, True, 0, 1, False)  # (N,)
    return order[:max_images].astype(np.int64)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, batches, *, num_patches: int, patch_size: int,
                     out_size: int, mean, std, augment: AugmentParams | None, kind: str,
                     generator: torch.Generator, device: torch.device,
                     max_images: int | None = None, progress: bool = True,
                     desc: str = "features", total: int | None = None, amp: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag-of-features: per image, the mean of ``kind`` features over ``num_patches`` patches.

    ``batches`` yields (uint8 (B, H, W, 3), int64 (B,)) on ``device``. Returns float32 (N, d)
    and int64 (N,) on the CPU, N = all images (or the first ``max_images``); ``total`` is the
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
    return torch.cat(feats).cpu(), torch.cat(labels).cpu()
