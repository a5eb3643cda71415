"""Bag-of-features embeddings: per image, the mean of an encoder's features over n patches.

    images uint8 (B, H, W, 3) -> make_patches -> (n, B, 3, S, S) -> encoder.features(x, kind)
      -> (n*B, d) -> mean over the n patches -> (B, d) float32

The paper's evaluation feature (Sec. 4). :func:`embed` is the one implementation: probe.py
(every image of a split), the training monitor (a fixed seeded subset, every K steps) and users
(``from emp_ssl import embed``) all call it, so the three cannot drift. The encoder is called as
``encoder.features(x, kind)`` (our EMPEncoder, or an exported backbone loaded by
:func:`emp_ssl.export.load_backbone`), or as a plain ``encoder(x)`` for the backbone feature of
any other module (a torchvision ResNet with ``fc = Identity``).

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

from pipeline.errors import UserError
from pipeline.patches import AugmentParams, flatten_patches, make_patches
from pipeline.sources.base import epoch_order

from .protocol import PROBE, patch_seed, row_seed

META_ATTR = "emp_ssl_meta"  # an encoder's input geometry, set by load_backbone / probe.py


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


def split_rows(labels: np.ndarray, split: str, *, num_classes: int, batch_size: int, seed: int,
               max_images: int | None = None, per_class: list[int] | None = None) -> np.ndarray:
    """The dataset rows one split is embedded from, in extraction order (int64).

    All rows in split order; with ``max_images`` the first ``max_images`` of a seeded
    permutation (a class-sorted split stays balanced); with ``per_class`` only the rows whose
    position within their class (:func:`class_positions`) is below ``per_class[class]``. The
    order is the memory source's (``epoch_order``), so the batches, and with them the patches
    drawn, are the ones probe.py has always used. ``seed`` is the protocol's seed; the shuffle
    is seeded per split (:func:`emp_ssl.protocol.row_seed`)."""
    order = epoch_order(len(labels), batch_size, 0, 0, row_seed(seed, split), max_images is not None, 0, 1,
                        False).astype(np.int64)
    if per_class is not None:
        keep = class_positions(labels, num_classes) < np.asarray(per_class)[labels]
        order = order[keep[order]]
    return order[:max_images] if max_images is not None else order


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def row_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device,
                chunk_bytes: int = 256 << 20):
    """uint8 (B, H, W, 3) on ``device`` for consecutive ``batch_size`` rows of ``images``
    (a numpy array or a tensor, on any device).

    When the selected rows take at most a quarter of the device's free memory they are copied
    there once, in extraction order (in ~256 MB pieces), and every batch is a slice of that:
    no host work or transfer per batch. Otherwise each batch is gathered and copied alone."""
    if isinstance(images, torch.Tensor):  # already a tensor: gather on its device, then move
        idx = torch.as_tensor(rows, device=images.device)
        for i in range(0, len(rows), batch_size):
            yield images[idx[i:i + batch_size]].to(device)
        return
    if len(rows) * images[0].nbytes <= _free_bytes(device) // 4:
        per = max(1, chunk_bytes // images[0].nbytes)
        resident = torch.empty((len(rows), *images.shape[1:]), dtype=torch.uint8, device=device)
        for i in range(0, len(rows), per):  # (N, H, W, 3), in extraction order
            resident[i:i + per].copy_(torch.from_numpy(np.ascontiguousarray(images[rows[i:i + per]])))
        for i in range(0, len(rows), batch_size):
            yield resident[i:i + batch_size]
        return
    for i in range(0, len(rows), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[rows[i:i + batch_size]])).to(device)


def encoder_features(encoder: torch.nn.Module, x: torch.Tensor, feature: str) -> torch.Tensor:
    """(N, d) features of patches ``x`` (N, 3, S, S): ``encoder.features(x, feature)`` where the
    encoder has it, else ``encoder(x)`` (the backbone feature of a plain module)."""
    if hasattr(encoder, "features"):
        return encoder.features(x, feature)
    if feature != "backbone":
        raise UserError(f"feature {feature!r}: this encoder ({type(encoder).__name__}) only gives "
                        f"its forward output; use feature='backbone' or load it with "
                        f"emp_ssl.load_backbone (which keeps the projector's first block)")
    return encoder(x)


def _meta(encoder) -> dict:
    return getattr(encoder, META_ATTR, None) or {}


def _default_feature(encoder) -> str:
    kinds = _meta(encoder).get("features")
    if kinds is not None:
        return PROBE.feature if PROBE.feature in kinds else "backbone"
    return PROBE.feature if hasattr(encoder, "features") else "backbone"


@torch.no_grad()
def embed(images, encoder: torch.nn.Module, *, num_patches: int = PROBE.num_patches,
          feature: str | None = None, eval_mode: str = PROBE.eval_mode,
          augment: AugmentParams | None = None, patch_size: int | None = None,
          out_size: int | None = None, mean=None, std=None, rows=None, seed: int = PROBE.seed,
          split: str = "test", generator: torch.Generator | None = None, batch_size: int = 0,
          amp: str = "auto", device: torch.device | str | None = None, progress: bool = False,
          desc: str = "embed") -> torch.Tensor:
    """The paper's bag-of-features embedding of uint8 images: float32 (N, d) on ``device``.

    images   : uint8 (N, H, W, 3), a numpy array (memory-mapped is fine) or a tensor.
    encoder  : our encoder or an exported backbone (``emp_ssl.load_backbone``); its metadata
               gives the defaults of ``patch_size``, ``out_size``, ``mean``/``std`` (the training
               data's) and ``augment`` (the training recipe). It is used as given (call
               ``.eval()`` first for BatchNorm's running statistics, as the probe does).
    feature  : "pre_projector" (the probe's default where the encoder has the projector's first
               block) or "backbone" (the pooled ResNet feature).
    eval_mode: "augmented" (the training augmentations, the paper's) or "crops" (crops only).
    rows     : which images, in order (default: all). ``seed`` and ``split`` seed the patch
               generator as probe.py does (``generator`` overrides it); ``batch_size`` images per
               encoder call (0 = probe.py's default for the device), since the batches decide
               which patches are drawn. With probe.py's arguments the result equals its cached
               features for the same pictures.
    amp      : "auto" (bf16 autocast on CUDA, fp32 on the CPU), "bf16" or "fp32".
    """
    from .runtime import resolve_amp

    meta = _meta(encoder)
    if device is None:
        try:
            device = next(encoder.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    amp = resolve_amp(amp, device, flag="amp")
    feature = feature or _default_feature(encoder)
    patch_size = patch_size or meta.get("patch_size")
    out_size = out_size or meta.get("out_size")
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    missing = [k for k, v in (("patch_size", patch_size), ("out_size", out_size), ("mean", mean),
                              ("std", std)) if v is None]
    if missing:
        raise UserError(f"embed: {', '.join(missing)} not given and the encoder carries no "
                        f"metadata; load it with emp_ssl.load_backbone or pass them")
    if eval_mode not in ("augmented", "crops"):
        raise UserError(f"embed: eval_mode {eval_mode!r}: choose augmented or crops")
    if eval_mode == "augmented" and augment is None:
        augment = meta.get("augment") or AugmentParams()
    if eval_mode == "crops":
        augment = None
    if isinstance(augment, dict):
        augment = AugmentParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()})
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.uint8, torch.uint8):
        raise UserError(f"embed: images must be uint8 (N, H, W, 3), got {images.dtype} "
                        f"{tuple(images.shape)}")
    if min(images.shape[1:3]) < patch_size:
        raise UserError(f"embed: {images.shape[1]}x{images.shape[2]} images are smaller than the "
                        f"encoder's {patch_size}px patches")
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise UserError(f"{desc}: no images to embed")
    B = images_per_call(batch_size, num_patches, out_size, device, amp)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(patch_seed(seed, split))
    bf16 = amp == "bf16"
    feats = []
    batches = row_batches(images, rows, B, device)
    bar = tqdm(batches, desc=desc, total=-(-len(rows) // B), disable=not progress, leave=False,
               dynamic_ncols=True, unit="batch")
    for x_img in bar:  # (B, H, W, 3) uint8 on the device
        b = x_img.shape[0]
        patches = make_patches(x_img, num_patches=num_patches, patch_size=patch_size,
                               out_size=out_size, mean=mean, std=std, generator=generator,
                               augment=augment,
                               dtype=torch.bfloat16 if bf16 else torch.float32)  # (n, B, 3, S, S)
        x = flatten_patches(patches)  # (n*B, 3, S, S), patch-major
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = encoder_features(encoder, x, feature)  # (n*B, d)
        feats.append(f.float().reshape(num_patches, b, -1).mean(0))  # (B, d)
    bar.close()
    return torch.cat(feats)
