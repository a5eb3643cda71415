"""Writing a split as its images arrive: the memory .npy in place, the .beton page by page.

    NpyWriter      <split>.u8.npy: numpy's header first (sized for the planned N rows), then
                   each row at its final offset (buffered, os.pwrite); finish() rewrites the
                   header for the rows kept and cuts the file there
    SplitWriters   the memory and ffcv writers of one split, fed image by image and
                   checkpointed together (the dali shards are written by pipeline.shards)

Memory: a buffer of FLUSH_BYTES for the .npy and one page for the .beton, both touched when
allocated, however many images a split has. The .npy is written by offset rather than through a memory map on purpose: the
dirty pages of a map count as the writer's resident memory until the kernel writes them back,
so a map of a 19 GB file grows the process towards 19 GB.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np

from ..formats import ffcv_path, memory_images_path, memory_labels_path, pwrite_all
from .decode import Decoded

FLUSH_BYTES = 8 << 20  # .npy rows buffered before a write
_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0
_NPY_ALIGN = 64  # numpy pads its header to a multiple of this


def npy_header(shape: tuple[int, ...], dtype=np.uint8, length: int | None = None) -> bytes:
    """The .npy (version 1.0) header of a C-order array of ``shape``, padded with spaces to
    ``length`` bytes (default: the next multiple of 64, as numpy pads), so a header for fewer
    rows can replace one written for more without moving the data."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(x) for x in shape)})
    bare = len(_NPY_MAGIC) + 2 + len(text) + 1  # magic + version, uint16 length, dict, "\n"
    length = length or -(-bare // _NPY_ALIGN) * _NPY_ALIGN
    if not bare <= length <= 0xFFFF:
        raise ValueError(f"npy header of {bare} bytes does not fit in {length}")
    pad = length - bare
    return _NPY_MAGIC + struct.pack("<H", length - 10) + (text + " " * pad + "\n").encode("latin1")


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save + fsync (inside a work directory, which is itself renamed when complete)."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class NpyWriter:
    """uint8 (N, H, W, 3) written row by row into ``path``; ``rows`` > 0 continues a file whose
    first ``rows`` rows are on disk (a checkpoint)."""

    def __init__(self, path: Path, capacity: int, shape: tuple[int, int, int], rows: int = 0):
        self.path, self.capacity, self.shape = Path(path), capacity, tuple(shape)
        self.row_bytes = int(np.prod(self.shape))
        header = npy_header((capacity, *self.shape))
        self.header_len = len(header)
        self.rows = rows  # rows written to the file
        if rows == 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            pwrite_all(self.fd, header, 0)
        else:
            self.fd = os.open(self.path, os.O_RDWR)
        self.buf = np.empty((max(1, FLUSH_BYTES // self.row_bytes), *self.shape), np.uint8)
        self.buf.fill(0)  # resident from the start: memory does not creep up with a run
        self.buffered = 0

    def add(self, image: np.ndarray) -> None:
        if self.rows + self.buffered >= self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows reserved")
        self.buf[self.buffered] = image  # (H, W, 3)
        self.buffered += 1
        if self.buffered == len(self.buf):
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            pwrite_all(self.fd, self.buf[:self.buffered],
                       self.header_len + self.rows * self.row_bytes)
            self.rows += self.buffered
            self.buffered = 0

    def checkpoint(self) -> None:
        self._flush()
        os.fsync(self.fd)

    def finish(self) -> None:
        """The header for the rows written, the file cut after them: a plain .npy."""
        self._flush()
        pwrite_all(self.fd, npy_header((self.rows, *self.shape), length=self.header_len), 0)
        os.ftruncate(self.fd, self.header_len + self.rows * self.row_bytes)
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SplitWriters:
    """The memory (.npy) and ffcv (.beton) outputs of one split, fed a Decoded at a time.

    ``capacity``: the split's planned images. ``kept``/``shape``/``beton_state`` describe the
    checkpoint to continue from (0 / None / None for a fresh split). ``seconds`` accumulates
    each writer's own time.
    """

    def __init__(self, root: Path, split: str, capacity: int, formats: tuple[str, ...],
                 ffcv_encoding: str, jpeg_quality: int, kept: int = 0,
                 shape: tuple | None = None, beton_state: dict | None = None):
        self.root, self.split, self.capacity = Path(root), split, capacity
        self.want_memory = "memory" in formats
        self.memory: NpyWriter | None = None
        if self.want_memory and kept:
            self.memory = NpyWriter(memory_images_path(root, split), capacity, shape, rows=kept)
        self.beton = None
        if "ffcv" in formats:
            from ..beton import BetonWriter
            self.beton = BetonWriter(ffcv_path(root, split), capacity, ffcv_encoding,
                                     jpeg_quality, resume=beton_state)
        self.seconds = {"memory": 0.0, "ffcv": 0.0}

    def add(self, r: Decoded, label: int) -> None:
        if self.want_memory:
            t = time.perf_counter()
            if self.memory is None:  # the first image gives the shape
                self.memory = NpyWriter(memory_images_path(self.root, self.split), self.capacity,
                                        r.shape)
            self.memory.add(r.pixels)
            self.seconds["memory"] += time.perf_counter() - t
        if self.beton is not None:
            t = time.perf_counter()
            self.beton.add(label, image=r.pixels if r.ffcv is None else None, encoded=r.ffcv)
            self.seconds["ffcv"] += time.perf_counter() - t

    def checkpoint(self) -> dict | None:
        """Everything added so far on disk (fsynced); the .beton's state to resume from."""
        t = time.perf_counter()
        if self.memory is not None:
            self.memory.checkpoint()
        self.seconds["memory"] += time.perf_counter() - t
        if self.beton is None:
            return None
        t = time.perf_counter()
        state = self.beton.checkpoint()
        self.seconds["ffcv"] += time.perf_counter() - t
        return state

    def finish(self, labels: np.ndarray) -> None:
        """Complete files: the .npy's header and length, the labels, the .beton's table."""
        if self.want_memory:
            t = time.perf_counter()
            self.memory.finish()
            save_npy(memory_labels_path(self.root, self.split), labels)  # (N,) int64
            self.seconds["memory"] += time.perf_counter() - t
        if self.beton is not None:
            t = time.perf_counter()
            self.beton.finish()
            self.seconds["ffcv"] += time.perf_counter() - t

    def close(self) -> None:
        for w in (self.memory, self.beton):
            if w is not None:
                w.close()
