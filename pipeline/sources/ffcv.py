"""The ffcv source: a ``.beton`` read and decoded by FFCV's JIT-compiled threads.

    ffcv.Loader(<split>.beton, order=<ours>, num_workers, batches_ahead)
      image: SimpleRGBImageDecoder (fixed size)  or  CenterCropRGBImageDecoder((S, S), ratio=1)
             (variable size, with image_size) -> ToTensor     # (B, H, W, 3) uint8, pinned host
      label: IntDecoder -> ToTensor                          # (B, 1) int64
      -> .to(device, non_blocking=True)                       # fresh tensors on the device

Order: the Loader is given our own traversal order (``_make_order``), not FFCV's
RANDOM/SEQUENTIAL, because FFCV's distributed mode needs an initialized process group and pads
the order with repeated samples, and its orders cannot start mid-epoch. Ours, ``epoch_order``:
epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(N)`` (the identity without
shuffle), the same on every rank; rank ``r`` of ``W`` takes ``perm[r*(N//W):(r+1)*(N//W)]``,
cut to whole batches under drop_last, from batch ``start_batch`` on. So an epoch's order is a
pure function of (seed, epoch, rank, world), and ``set_epoch(e, k)`` resumes exactly.

FFCV reuses ``batches_ahead + 2`` output buffers; every batch is copied out of them (to the
device, or cloned on a CPU device), so callers may keep batches.

ffcv is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..beton import IMAGE_FIELD, LABEL_FIELD, import_ffcv
from ..errors import UserError
from ..formats import default_workers, ffcv_path
from .base import Source, SourceOptions, epoch_order  # noqa: F401 (epoch_order re-exported)


class FfcvSource(Source):
    name = "ffcv"

    def __init__(self, root, split: str, opts: SourceOptions, os_cache: bool = True,
                 batches_ahead: int = 3, image_size: int | None = None):
        super().__init__(root, split, opts)
        import_ffcv("--source ffcv")
        info = self._open_split("ffcv")
        self.path = ffcv_path(root, split)
        if not self.path.is_file():
            raise UserError(f"{self.path}: missing; re-convert with --formats ffcv --overwrite")
        if image_size is None and info.shape is None:
            raise UserError(f"--image-size: {root} split '{split}' has images of different sizes; "
                            f"give --image-size S (center crop + resize) or re-convert with "
                            f"--resize")
        self.image_size = image_size
        self.device = torch.device(opts.device)
        self.os_cache, self.batches_ahead = os_cache, batches_ahead
        self.num_workers = opts.num_workers or min(8, default_workers())
        self._order = _make_order(self)
        self._loader = None

    def _make_loader(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        if self.image_size is None:
            decoder = SimpleRGBImageDecoder()
        else:
            decoder = CenterCropRGBImageDecoder((self.image_size, self.image_size), ratio=1.0)
        loader = Loader(str(self.path), batch_size=self.opts.batch_size,
                        num_workers=self.num_workers, os_cache=self.os_cache,
                        order=self._order, seed=self.opts.seed, drop_last=False,
                        batches_ahead=self.batches_ahead,
                        pipelines={IMAGE_FIELD: [decoder, ToTensor()],
                                   LABEL_FIELD: [IntDecoder(), ToTensor()]})
        if loader.reader.num_samples != self.num_images:
            raise UserError(f"{self.path}: holds {loader.reader.num_samples} samples, the "
                            f"manifest says {self.num_images}; re-convert with --overwrite")
        return loader

    def _iter(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._order.start_batch = 0
            self._loader = self._make_loader()  # JIT-compiles the decoders once
        self._order.start_batch = start_batch
        self._loader.next_epoch = epoch  # the Loader asks our order for this epoch
        cuda = self.device.type == "cuda"
        for images, labels in self._loader:  # (b, H, W, 3) uint8, (b, 1) int64, pinned
            if cuda:
                x = images.to(self.device, non_blocking=True)
                y = labels.reshape(-1).to(self.device, non_blocking=True)
            else:
                x, y = images.clone(), labels.reshape(-1).clone()
            yield x, y  # (b, H, W, 3), (b,)

    def close(self) -> None:
        self._loader = None


def _make_order(source: FfcvSource):
    """Our order as the Loader's ``order``: FFCV wants a TraversalOrder instance it can call
    with the loader (``order(loader)``), so the instance returns itself."""
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        def __init__(self):  # no loader yet; TraversalOrder.__init__ runs in __call__
            self.start_batch = 0

        def __call__(self, loader):
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            o = source.opts
            return epoch_order(source.num_images, o.batch_size, epoch, self.start_batch, o.seed,
                               o.shuffle, o.rank, o.world_size, o.drop_last)

    return EpochOrder()
