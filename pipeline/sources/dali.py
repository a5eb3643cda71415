"""The dali source: WebDataset shards read by DALI, JPEGs decoded by nvJPEG on the GPU.

Per epoch, one DALI pipeline:

    fn.readers.webdataset(<split>/shard-*.tar + .idx, ext=[jpg, cls], shard_id=rank,
                          num_shards=world)
      -> fn.decoders.image(device="mixed" on CUDA, "cpu" otherwise, RGB)      # (H, W, 3) uint8 each
      -> [fn.resize(resize_shorter=S) -> fn.crop(S, S)]    only with image_size (variable-size data)
      -> copied into fresh torch tensors on the device                         # (B, H, W, 3) uint8

What holds about order (tested in tests/test_sources_dali_ffcv.py):
- Each epoch has its own pipeline, built from (seed, epoch): the tar files are visited in a
  permutation drawn from (seed, epoch) and DALI's reader shuffles within a buffer seeded from
  (seed, epoch). So an epoch's order is a pure function of (seed, epoch, rank, world, the
  shuffle buffer size, the shard files): a run resumed at an epoch sees the same order as an
  uninterrupted one (on the same DALI version; another version may shuffle differently).
- DALI's shuffle is buffer-based: ``shuffle_buffer`` samples are mixed at a time (default: as
  many as fit in ``shuffle_bytes`` = 256 MiB of shard bytes, at least 1024; that is all of a
  CIFAR split, a true permutation). Samples stored farther apart than the buffer rarely share
  a batch, so larger datasets must be stored in a shuffled order (the converter's job).
- Rank ``r`` of ``W`` reads DALI's contiguous slice ``[N*r//W, N*(r+1)//W)`` of the epoch's
  shard order and yields the first ``N//W`` samples that come out (the base class' per-rank
  count): the ranks are disjoint, and cover the split when ``W`` divides ``N``.
- ``set_epoch(epoch, start_batch)`` resumes exactly: the first ``start_batch`` batches are run
  and discarded (read and decoded, not copied), which costs that many batches' decode once.
- With ``drop_last=False`` each of the rank's samples comes out exactly once (the last batch is
  short); DALI's padding of its last batch is cut off.
- While epoch ``e`` runs, the pipeline of epoch ``e + 1`` (start batch 0) is already built and
  filling its shuffle buffer (``prefetch_epochs``), so epochs start without a fill stall
  (CIFAR-10 train on 2 CPU cores: first batch 0.5 s -> 0.06 s). A request for another epoch
  builds its own pipeline; the prebuilt one is the same as a fresh one would be (tested).

nvidia-dali is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..formats import DALI_EXTENSIONS, dali_dir, dali_shards, default_workers
from ..shards import index_count
from .base import Source, SourceOptions

DALI_MISSING = ("--source dali: nvidia-dali is not installed; pip install -e '.[dali]' "
                "or use --source memory")
READER_NAME = "reader"
DEFAULT_SHUFFLE_BYTES = 256 << 20  # JPEG bytes DALI's shuffle buffer may hold


def import_dali():
    """The DALI modules this source uses, or a one-line UserError."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise UserError(DALI_MISSING) from None
    return fn, types, pipeline_def, feed_ndarray


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed drawn from (seed, epoch): DALI takes a non-negative int."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def ascii_labels(cls: torch.Tensor) -> torch.Tensor:
    """ASCII decimal labels, right-padded with zeros, (B, L) uint8 -> int64 (B,)."""
    digits = cls.to(torch.int64) - ord("0")  # (B, L); padding becomes -48
    valid = cls != 0
    value = torch.zeros(cls.shape[0], dtype=torch.int64, device=cls.device)
    for j in range(cls.shape[1]):  # L <= a few digits
        value = torch.where(valid[:, j], value * 10 + digits[:, j], value)
    return value


class DaliSource(Source):
    name = "dali"

    def __init__(self, root, split: str, opts: SourceOptions, prefetch: int = 2,
                 image_size: int | None = None, shuffle_buffer: int | None = None,
                 shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES, prefetch_epochs: bool = True):
        super().__init__(root, split, opts)
        self._dali = import_dali()
        info = self._open_split("dali")
        shards = dali_shards(root, split)
        if not shards:
            raise UserError(f"{dali_dir(root, split)}: no shard-*.tar files; re-convert with "
                            f"--formats dali --overwrite")
        for tar, idx in shards:
            if not idx.is_file():
                raise UserError(f"{idx}: missing DALI index beside {tar.name}; re-convert with "
                                f"--formats dali --overwrite")
        self.shards = shards
        found = sum(index_count(idx) for _, idx in shards)
        if found != self.num_images:
            raise UserError(f"{dali_dir(root, split)}: shards hold {found} samples, the manifest "
                            f"says {self.num_images}; re-convert with --overwrite")
        if image_size is None and info.shape is None:
            raise UserError(f"--image-size: {root} split '{split}' has images of different sizes; "
                            f"give --image-size S (resize shorter side + center crop) or "
                            f"re-convert with --resize")
        self.image_size = image_size
        self.image_shape = ((image_size, image_size, 3) if image_size is not None
                            else tuple(info.shape))
        self.prefetch = prefetch
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_threads = opts.num_workers or min(4, default_workers())
        per_rank = self.num_images // opts.world_size
        total = sum(t.stat().st_size for t, _ in shards)
        self.mean_sample_bytes = max(1, total // max(1, self.num_images))  # tar bytes a sample
        if shuffle_buffer is None:
            shuffle_buffer = max(1024, shuffle_bytes // self.mean_sample_bytes)
        self.shuffle_buffer = int(min(shuffle_buffer, per_rank))
        self.prefetch_epochs = prefetch_epochs
        self._ahead = None  # (epoch key, started pipeline) of the epoch expected next

    # ------------------------------------------------------------------ pipeline

    def _paths(self, epoch: int) -> list[tuple[str, str]]:
        order = np.arange(len(self.shards))
        if self.opts.shuffle:
            order = np.random.default_rng([self.opts.seed, epoch]).permutation(len(self.shards))
        return [(str(self.shards[i][0]), str(self.shards[i][1])) for i in order]

    def _build(self, epoch: int):
        fn, types, pipeline_def, _ = self._dali
        paths = self._paths(epoch)
        seed = epoch_seed(self.opts.seed, epoch)
        cuda = self.device.type == "cuda"
        size, opts = self.image_size, self.opts

        @pipeline_def(batch_size=opts.batch_size, num_threads=self.num_threads,
                      device_id=self.device.index if cuda else None, seed=seed,
                      prefetch_queue_depth=self.prefetch)
        def epoch_pipeline():
            jpg, cls = fn.readers.webdataset(
                paths=[t for t, _ in paths], index_paths=[i for _, i in paths],
                ext=list(DALI_EXTENSIONS), random_shuffle=opts.shuffle,
                initial_fill=self.shuffle_buffer, shard_id=opts.rank, num_shards=opts.world_size,
                pad_last_batch=True, missing_component_behavior="error", seed=seed,
                tensor_init_bytes=2 * self.mean_sample_bytes, name=READER_NAME)
            images = fn.decoders.image(jpg, device="mixed" if cuda else "cpu",
                                       output_type=types.RGB)  # (H, W, 3) uint8 per sample
            if size is not None:
                images = fn.resize(images, resize_shorter=size, antialias=True)
                images = fn.crop(images, crop=(size, size))  # centered; (S, S, 3)
            return images, fn.pad(cls, fill_value=0)  # cls: (L,) ASCII digits

        pipe = epoch_pipeline()
        pipe.build()
        return pipe

    def _start(self, epoch: int):
        """Build the epoch's pipeline and start it: it fills its shuffle buffer meanwhile."""
        pipe = self._build(epoch)
        pipe.schedule_run()  # first call: runs `prefetch` iterations ahead
        return pipe

    def _iter(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        feed_ndarray = self._dali[3]
        B, per_rank = self.opts.batch_size, self.num_images // self.opts.world_size
        total = len(self) * B if self.opts.drop_last else per_rank  # samples this rank yields
        key = epoch if self.opts.shuffle else 0  # without shuffle every epoch is the same
        ahead, self._ahead = self._ahead, None
        pipe = ahead[1] if ahead is not None and ahead[0] == key else self._start(epoch)
        del ahead
        if self.prefetch_epochs:  # the next epoch fills its buffer while this one runs
            self._ahead = (epoch + 1 if self.opts.shuffle else 0, self._start(epoch + 1))
        cuda = self.device.type == "cuda"
        for b in range(math.ceil(total / B)):
            images, cls = pipe.outputs()  # valid until the next outputs()
            if b >= start_batch:
                shapes = {tuple(s) for s in images.shape()}
                if shapes != {self.image_shape}:
                    raise UserError(f"{dali_dir(self.root, self.split)}: decoded images of shapes "
                                    f"{sorted(shapes)[:3]}, the manifest says {self.image_shape}; "
                                    f"pass --image-size or re-convert with --overwrite")
                x = torch.empty((B, *self.image_shape), dtype=torch.uint8, device=self.device)
                stream = torch.cuda.current_stream(self.device) if cuda else None
                feed_ndarray(images.as_tensor(), x, cuda_stream=stream)  # (B, H, W, 3)
                cls = cls.as_tensor()
                c = torch.empty(cls.shape(), dtype=torch.uint8)
                feed_ndarray(cls, c)  # (B, L) ASCII on the host
                y = ascii_labels(c).to(self.device, non_blocking=True)  # (B,)
            pipe.schedule_run()  # keep `prefetch` iterations in flight
            if b >= start_batch:
                n = min(B, total - b * B)  # the rank's last batch may be short (drop_last=False)
                yield x[:n], y[:n]

    def close(self) -> None:
        self._ahead = None
