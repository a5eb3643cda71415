"""The reference source: the paper's CPU data path, kept as the baseline benchmarks compare to.

    DataLoader(num_workers) over the memory-format array (memory-mapped), per image:
      PIL image -> n times, each patch on its own:
        RandomCrop(P) -> Resize(S, bilinear) -> RandomHorizontalFlip(flip_p)
        -> RandomApply(ColorJitter(b, c, s, h), jitter_p) -> RandomGrayscale(gray_p)
        -> RandomApply(GaussianBlur(K, blur_sigma), blur_p) -> RandomSolarize(128, solarize_p)
        -> ToTensor -> Normalize(mean, std)                          # (3, S, S) float
      -> stacked (n, 3, S, S); the batch collated patch-major     # (n, B, 3, S, S)
      -> to opts.device

It yields the finished patches (``yields_patches = True``), in the same layout as
``pipeline.patches.make_patches``, with the same recipe (torchvision's transforms on PIL images:
ColorJitter's random op order, PIL's resize/rounding) and the same batch order as the memory
and ffcv sources. augment=None gives crops only. K = AugmentParams.blur_kernel_size (13).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..formats import default_workers, memory_images_path
from ..patches import AugmentParams
from .base import Source, SourceOptions, epoch_order
from .memory import load_memory_arrays


def reference_transform(patch_size: int, out_size: int, mean: Sequence[float], std: Sequence[float],
                        augment: AugmentParams | None):
    """The per-patch torchvision transform (a PIL image in, a normalized (3, S, S) tensor out)."""
    import torchvision.transforms as T

    ops = [T.RandomCrop(patch_size)]
    if out_size != patch_size:
        ops.append(T.Resize(out_size, interpolation=T.InterpolationMode.BILINEAR))
    if augment is not None:
        a = augment
        ops += [
            T.RandomHorizontalFlip(a.flip_p),
            T.RandomApply([T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)], p=a.jitter_p),
            T.RandomGrayscale(a.gray_p),
            T.RandomApply([T.GaussianBlur(min(a.blur_kernel_size, 2 * out_size - 1), a.blur_sigma)],
                          p=a.blur_p),
            T.RandomSolarize(round(a.solarize_threshold * 255), p=a.solarize_p),
        ]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class _PatchDataset(Dataset):
    """Item i: (n patches of image i (n, 3, S, S) float, label)."""

    def __init__(self, images_path, labels: np.ndarray, num_patches: int, transform):
        self.images_path, self.labels = images_path, labels
        self.num_patches, self.transform = num_patches, transform
        self._images = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        img = Image.fromarray(np.asarray(self._images[i]))
        patches = torch.stack([self.transform(img) for _ in range(self.num_patches)])  # (n, 3, S, S)
        return patches, int(self.labels[i])


def _collate(items):
    patches = torch.stack([p for p, _ in items], dim=1)  # (n, B, 3, S, S), patch-major
    return patches, torch.tensor([y for _, y in items], dtype=torch.int64)


class ReferenceSource(Source):
    """Yields (patches float (n, B, 3, S, S), labels int64 (B,)), both on opts.device."""

    name = "reference"
    yields_patches = True

    def __init__(self, root, split: str, opts: SourceOptions, *, num_patches: int, patch_size: int,
                 out_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: AugmentParams | None = AugmentParams()):
        super().__init__(root, split, opts)
        if augment is not None and augment.jitter_order != "random":
            raise UserError("--source reference: torchvision's ColorJitter draws the op order per "
                            f"patch; --augment.jitter_order {augment.jitter_order} is for the device "
                            "sources (memory, dali, ffcv)")
        images, labels = load_memory_arrays(root, split)
        if patch_size > min(images.shape[1:3]):
            raise ValueError(f"patch_size {patch_size} is larger than the images {images.shape[1:3]}")
        self._set_num_images(len(images))
        self.device = torch.device(opts.device)
        self.num_workers = opts.num_workers or min(8, default_workers())
        transform = reference_transform(patch_size, out_size, mean, std, augment)
        self.dataset = _PatchDataset(memory_images_path(root, split), labels, num_patches, transform)

    def _iter(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.opts
        order = epoch_order(self.num_images, o.batch_size, epoch, start_batch, o.seed, o.shuffle,
                            o.rank, o.world_size, o.drop_last).astype(np.int64).tolist()
        batches = [order[i:i + o.batch_size] for i in range(0, len(order), o.batch_size)]
        # worker seeds (torch's RNG, used by the transforms) derive from (seed, epoch, rank)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [o.seed, epoch, o.rank]).generate_state(1)[0]))
        cuda = self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_collate, pin_memory=cuda, generator=gen)
        for patches, labels in loader:
            yield (patches.to(self.device, non_blocking=cuda),
                   labels.to(self.device, non_blocking=cuda))
