"""The torchvision source: the dali source's WebDataset shards, decoded by torchvision.io.

For machines without DALI (its installation is its most common complaint): the same
``<split>/shard-*.tar`` + ``.idx`` files, read by offset and decoded by
``torchvision.io.decode_jpeg`` -- batched with nvJPEG on a CUDA device, libjpeg-turbo on the
CPU -- then fed to the same patch step as every other source.

    order: epoch_order(seed, epoch, rank, world), as the memory/ffcv/reference sources: a true
           permutation of the split (the .idx gives every sample's offset, so no shuffle buffer)
    read:  os.pread of each sample's .jpg and .cls bytes                 (threads, ahead)
    decode CPU:  decode_jpeg(list of B JPEGs)                             (in the same threads)
           CUDA: decode_jpeg(list of B JPEGs, device="cuda")              (this thread, nvJPEG)
    [resize shorter side -> S (bilinear, antialiased) + center crop S x S]  only with image_size
    -> (B, H, W, 3) uint8 on the device, labels int64 (B,)

The same (seed, epoch) gives the same batches as the memory source (the same images, in the
same order); the pixels are libjpeg-turbo's on the CPU -- equal to PIL's decode of the same
JPEG, which is what the converter stored in the .npy for a source JPEG kept untouched (tested)
-- and nvJPEG's on a GPU (its own IDCT: within a few levels). ``set_epoch(e, k)`` resumes
exactly at batch k.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError, one_line
from ..formats import dali_dir, dali_shards, default_workers
from ..shards import read_index
from .base import Source, SourceOptions, epoch_order

TORCHVISION_MISSING = ("--source torchvision: torchvision is not installed (or has no image "
                       "decoder); pip install torchvision, or use --source memory")


def import_decode_jpeg():
    """torchvision.io's (decode_jpeg, ImageReadMode), or a one-line UserError."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        raise UserError(TORCHVISION_MISSING) from None
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of "
                            "TorchVision are deprecated", category=DeprecationWarning)
    return decode_jpeg, ImageReadMode


def fit_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, S, S): shorter side to S (bilinear, antialiased), center crop;
    the converter's --resize geometry."""
    h, w = img.shape[1:]
    if (h, w) == (size, size):
        return img
    if w <= h:
        nh, nw = max(size, int(round(h * size / w))), size
    else:
        nh, nw = size, max(size, int(round(w * size / h)))
    x = torch.nn.functional.interpolate(img[None].float(), size=(nh, nw), mode="bilinear",
                                        antialias=True, align_corners=False)[0]
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[:, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)


class ShardReader:
    """Random access to the samples of a split's shards, through their .idx files."""

    def __init__(self, shards: list[tuple]):
        tables = [read_index(idx) for _, idx in shards]
        self.file = np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(tables)])
        self.table = np.concatenate(tables)  # (N,) shards.INDEX_DTYPE, dataset order
        self.fds = [os.open(tar, os.O_RDONLY) for tar, _ in shards]
        self.names = [str(tar) for tar, _ in shards]

    def __len__(self) -> int:
        return len(self.table)

    def read(self, i: int) -> tuple[bytearray, int]:
        """(JPEG bytes, label) of sample ``i``."""
        fd, row = self.fds[self.file[i]], self.table[i]
        jpeg = bytearray(int(row["jpg_size"]))
        cls = os.pread(fd, int(row["cls_size"]), int(row["cls_offset"]))
        if os.preadv(fd, [jpeg], int(row["jpg_offset"])) != len(jpeg) or \
                len(cls) != row["cls_size"]:
            raise UserError(f"{self.names[self.file[i]]}: ends inside sample {i}; re-convert "
                            f"with --overwrite")
        return jpeg, int(cls.decode("ascii"))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class TorchvisionSource(Source):
    """Yields (images uint8 (B, H, W, 3), labels int64 (B,)), both on opts.device."""

    name = "torchvision"

    def __init__(self, root, split: str, opts: SourceOptions, image_size: int | None = None,
                 prefetch: int = 2):
        super().__init__(root, split, opts)
        self._decode, self._mode = import_decode_jpeg()
        info = self._open_split("dali")
        shards = dali_shards(root, split)
        if not shards:
            raise UserError(f"{dali_dir(root, split)}: no shard-*.tar files; re-convert with "
                            f"--formats dali --overwrite")
        for tar, idx in shards:
            if not idx.is_file():
                raise UserError(f"{idx}: missing index beside {tar.name}; re-convert with "
                                f"--formats dali --overwrite")
        self.reader = ShardReader(shards)
        if len(self.reader) != self.num_images:
            raise UserError(f"{dali_dir(root, split)}: shards hold {len(self.reader)} samples, "
                            f"the manifest says {self.num_images}; re-convert with --overwrite")
        if image_size is None and info.shape is None:
            raise UserError(f"--image-size: {root} split '{split}' has images of different sizes; "
                            f"give --image-size S (resize shorter side + center crop) or "
                            f"re-convert with --resize")
        self.image_size = image_size
        self.image_shape = ((image_size, image_size, 3) if image_size is not None
                            else tuple(info.shape))
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_workers = opts.num_workers or min(4, default_workers())
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="tvjpeg")

    # ------------------------------------------------------------------ one batch

    def _read(self, idx: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        jpegs, labels = [], []
        for i in idx.tolist():
            jpeg, label = self.reader.read(i)
            jpegs.append(torch.frombuffer(jpeg, dtype=torch.uint8))  # (bytes,)
            labels.append(label)
        return jpegs, torch.tensor(labels, dtype=torch.int64)

    def _to_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, H_i, W_i) decoded images -> (B, H, W, 3)."""
        if self.image_size is not None:
            images = [fit_square(x, self.image_size) for x in images]
        shapes = {tuple(x.shape) for x in images}
        h, w, c = self.image_shape
        if shapes != {(c, h, w)}:
            raise UserError(f"{dali_dir(self.root, self.split)}: decoded images of shapes "
                            f"{sorted(shapes)[:3]} (C, H, W), the manifest says {self.image_shape}; "
                            f"pass --image-size or re-convert with --overwrite")
        return torch.stack([x.permute(1, 2, 0) for x in images])  # (B, H, W, 3)

    def _decode_batch(self, jpegs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        try:
            images = self._decode(jpegs, mode=self._mode.RGB, device=device)
        except RuntimeError as e:
            raise UserError(f"{dali_dir(self.root, self.split)}: a JPEG does not decode "
                            f"({one_line(e)}); check the dataset with convert_datasets.py "
                            f"--verify") from None
        return self._to_batch(images)

    def _cpu_batch(self, idx: np.ndarray):
        """Read (and on the CPU decode) one batch: runs in a worker thread."""
        jpegs, labels = self._read(idx)
        if self.device.type == "cuda":
            return jpegs, labels  # decoded by nvJPEG in the consuming thread
        return self._decode_batch(jpegs, self.device), labels

    def _iter(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.opts
        order = epoch_order(self.num_images, o.batch_size, epoch, start_batch, o.seed, o.shuffle,
                            o.rank, o.world_size, o.drop_last)
        batches = [order[i:i + o.batch_size] for i in range(0, len(order), o.batch_size)]
        ahead = deque()
        todo = iter(batches)
        try:
            for idx in todo:  # keep workers + prefetch batches in flight
                ahead.append(self._pool.submit(self._cpu_batch, idx))
                if len(ahead) >= self.num_workers + self.prefetch:
                    break
            while ahead:
                data, labels = ahead.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    ahead.append(self._pool.submit(self._cpu_batch, nxt))
                if self.device.type == "cuda":
                    data = self._decode_batch(data, self.device)  # (B, H, W, 3) on the GPU
                yield data, labels.to(self.device, non_blocking=True)
        finally:
            for f in ahead:
                f.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
