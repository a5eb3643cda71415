"""FFCV ``.beton`` files for the ffcv source: ``image`` (RGBImageField) + ``label`` (IntField).

``BetonWriter`` streams samples into a file one at a time, in order, in one process: the
converter's writer. It lays the file out exactly as FFCV's own ``DatasetWriter`` does with
one worker (the same bytes; tested), holds one data page in memory however many samples it
writes, and can continue a file from a checkpoint after an interruption. ``encode_image``
is the per-image half (FFCV's field encoder), run in the converter's decode workers.

``write_beton`` writes arrays in one call through ffcv's ``DatasetWriter`` (worker processes),
into a temp file beside the target that is renamed when complete. ``BetonFile`` reads samples
one at a time in pure numpy/PIL (no FFCV Loader, no JIT), to verify what was written;
``read_beton`` reads them all.

The file (FFCV's layout, ffcv/writer.py + ffcv/memory_allocator.py):

    header (HeaderType: version, num_fields, page_size, num_samples, alloc_table_ptr)
    field descriptors (FieldDescType per field)
    metadata: one row per sample (get_metadata_type of the fields)
    zeros up to a page boundary
    data pages of page_size bytes: each sample's bytes lie inside one page, in sample order
    allocation table: (sample_id, ptr, size) per allocation        <- alloc_table_ptr

ffcv is imported lazily: importing this module never requires it.
"""
from __future__ import annotations

import functools
import io
import os
from array import array
from pathlib import Path

import numpy as np

from .errors import UserError
from .formats import atomic_path, pwrite_all

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
ENCODINGS = ("raw", "jpg")

# Constants of the FFCV file format (ffcv/types.py, ffcv/fields/rgb_image.py), used by
# read_beton so that reading back does not depend on the writer's code.
_MODE_JPG, _MODE_RAW = 0, 1


def import_ffcv(flag: str = "--source ffcv", instead: str = "use --source memory"):
    """``import ffcv`` or a one-line UserError naming ``flag`` (and the ImportError's cause)."""
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as e:
        raise UserError(f"{flag}: ffcv is not installed; pip install -e '.[ffcv]' "
                        f"or {instead} ({e})") from None
    return ffcv


class _Arrays:
    """The indexable dataset DatasetWriter workers read: (image, label) per index."""

    def __init__(self, images, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


def _check(images, labels: np.ndarray, encoding: str, path: Path) -> None:
    if encoding not in ENCODINGS:
        raise UserError(f"--ffcv-encoding {encoding!r}: must be one of {', '.join(ENCODINGS)}")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise UserError(f"{path}: no images to write")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 (N, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
    else:
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"images[{i}]: expected uint8 (H, W, 3), "
                                 f"got {im.dtype} {im.shape}")
            if max(im.shape[:2]) > 65535:
                raise UserError(f"{path}: image {i} is {im.shape[1]}x{im.shape[0]}, beyond FFCV's "
                                f"65535-pixel side; convert with --resize")


def write_beton(path: Path | str, images, labels: np.ndarray, encoding: str = "raw",
                jpeg_quality: int = 90, num_workers: int = 1) -> None:
    """Write ``images`` (uint8 (N, H, W, 3), or a list of (H_i, W_i, 3)) + int labels to ``path``.

    ``encoding="raw"`` stores the pixels as is (decoded bit-exactly); ``"jpg"`` re-encodes each
    image with OpenCV at ``jpeg_quality`` (smaller file, lossy, decoded by FFCV's turbojpeg).
    ``num_workers`` writer processes (FFCV's DatasetWriter forks them).
    """
    path = Path(path)
    labels = np.asarray(labels)
    _check(images, labels, encoding, path)
    import_ffcv("--formats ffcv", instead="leave ffcv out of --formats")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    with atomic_path(path) as tmp:  # FFCV writes the temp file; renamed only once complete
        fields = {IMAGE_FIELD: RGBImageField(write_mode=encoding, jpeg_quality=jpeg_quality),
                  LABEL_FIELD: IntField()}
        writer = DatasetWriter(tmp, fields, num_workers=max(1, num_workers))
        writer.from_indexed_dataset(_Arrays(images, labels.astype(np.int64)))


class BetonFile:
    """A .beton's samples, one at a time: ``labels`` int64 (N,), ``image(i)`` uint8 (H, W, 3).

    Raw images are copied out of the file, JPEG ones decoded with PIL (FFCV's own turbojpeg
    decode may differ by a level). Reads by offset (no memory map), so reading every image
    keeps the resident memory at one image.
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such .beton; convert with --formats ffcv")
        import_ffcv(str(path))
        from ffcv.reader import Reader

        reader = Reader(str(path))
        if reader.field_names[:2] != [IMAGE_FIELD, LABEL_FIELD]:
            raise UserError(f"{path}: fields {reader.field_names}, expected "
                            f"[{IMAGE_FIELD!r}, {LABEL_FIELD!r}]; re-convert with --overwrite")
        self.path = path
        meta = reader.metadata
        self._images = meta["f0"]  # (N,) mode, width, height, data_ptr
        self.labels = meta["f1"].astype(np.int64)  # (N,)
        table = reader.alloc_table
        self._size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        from PIL import Image

        m = self._images[i]
        ptr, h, w = int(m["data_ptr"]), int(m["height"]), int(m["width"])
        blob = os.pread(self._fd, self._size_of[ptr], ptr)
        if m["mode"] == _MODE_RAW:
            return np.frombuffer(blob, np.uint8, h * w * 3).reshape(h, w, 3).copy()
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.convert("RGB"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "BetonFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_beton(path: Path | str) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
    """Decode every sample of a .beton in order: (images, labels int64 (N,)).

    ``images`` is one uint8 (N, H, W, 3) array when all images share a shape, else a list.
    JPEG-encoded images are decoded with PIL (FFCV's own turbojpeg decode may differ by a level).
    """
    with BetonFile(path) as f:
        images = [f.image(i) for i in range(len(f))]
        labels = f.labels
    if len({im.shape for im in images}) == 1:
        return np.stack(images), labels
    return images, labels


# --------------------------------------------------------------------------- streaming writer


def _fields(encoding: str, jpeg_quality: int) -> dict:
    from ffcv.fields import IntField, RGBImageField
    return {IMAGE_FIELD: RGBImageField(write_mode=encoding, jpeg_quality=jpeg_quality),
            LABEL_FIELD: IntField()}


@functools.lru_cache(maxsize=None)
def _image_codec():
    """(the image field's metadata dtype, FFCV's JPEG encoder): imported once per process."""
    from ffcv.fields.rgb_image import RGBImageField, encode_jpeg
    return RGBImageField().metadata_type, encode_jpeg


def _image_row(image: np.ndarray, encoding: str, jpeg_quality: int) -> tuple[np.ndarray, np.ndarray]:
    """(metadata row (1,), stored bytes uint8 (n,)) of one uint8 (H, W, 3) image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    meta_type, encode_jpeg = _image_codec()
    row = np.zeros(1, meta_type)
    row["mode"] = _MODE_JPG if encoding == "jpg" else _MODE_RAW
    row["height"], row["width"] = image.shape[:2]
    blob = encode_jpeg(image, jpeg_quality) if encoding == "jpg" else image
    return row, np.ascontiguousarray(blob).reshape(-1)


def encode_image(image: np.ndarray, encoding: str, jpeg_quality: int) -> tuple[bytes, bytes]:
    """uint8 (H, W, 3) -> (its image-field metadata row, the bytes stored), as FFCV's
    RGBImageField.encode makes them (without max_resolution): the raw pixels, or FFCV's own
    encode_jpeg (OpenCV). ``BetonWriter.add(encoded=...)`` places them in the file; the
    converter's workers call this so the writer only copies bytes.

    The row is filled here rather than by RGBImageField.encode, which looks its mode up in a
    numba typed dict at ~0.3 ms a call (the byte-identity test pins the result)."""
    row, blob = _image_row(image, encoding, jpeg_quality)
    return row.tobytes(), blob.tobytes()


class BetonWriter:
    """Writes samples to ``path`` in order, as FFCV's DatasetWriter(num_workers=1) would.

    ``capacity``: metadata rows reserved (the most samples this file will get; fewer is fine,
    the header says how many). ``add`` one sample at a time; ``checkpoint()`` makes everything
    added so far durable and returns what ``BetonWriter(..., resume=...)`` needs to continue
    from there; ``finish()`` writes the allocation table and the header. Memory: one page
    (``page_size``) plus the rows and allocations since the last checkpoint.
    """

    def __init__(self, path: Path | str, capacity: int, encoding: str, jpeg_quality: int,
                 resume: dict | None = None, page_size: int | None = None):
        import_ffcv("--formats ffcv", instead="leave ffcv out of --formats")
        from ffcv.types import (CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                                get_metadata_type)
        from ffcv.utils import align_to_page
        from ffcv.writer import MIN_PAGE_SIZE

        if encoding not in ENCODINGS:
            raise UserError(f"--ffcv-encoding {encoding!r}: must be one of {', '.join(ENCODINGS)}")
        self.path = Path(path)
        self.encoding, self.jpeg_quality = encoding, jpeg_quality
        self.fields = _fields(encoding, jpeg_quality)
        self.meta_type = get_metadata_type(list(self.fields.values()))
        self.page_size = page_size or 4 * MIN_PAGE_SIZE  # DatasetWriter's default
        self.header = np.zeros(1, dtype=HeaderType)[0]
        self.header["version"] = CURRENT_VERSION
        self.header["num_fields"] = len(self.fields)
        self.header["page_size"] = self.page_size
        self.header["num_samples"] = capacity
        descs = np.zeros(len(self.fields), dtype=FieldDescType)
        type_id = {v: k for k, v in TYPE_ID_HANDLER.items()}
        for i, (name, field) in enumerate(self.fields.items()):
            descs[i]["type_id"] = type_id.get(type(field), 255)
            encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
            n = min(descs[0]["name"].shape[0], len(encoded))
            descs[i]["name"][:n] = encoded[:n]
            descs[i]["arguments"][:] = field.to_binary()[0]
        self.meta_start = HeaderType.itemsize + descs.nbytes
        self.capacity = capacity
        self.data_start = align_to_page(self.meta_start + capacity * self.meta_type.itemsize,
                                        self.page_size)
        self.page_data = np.empty(self.page_size, np.uint8)
        self.page_data.fill(0)  # resident from the start: memory does not creep up with a run
        self.rows = np.zeros(0, self.meta_type)  # metadata rows since the last checkpoint
        self.ptrs = array("q")  # allocation table: (sample i, ptrs[i], sizes[i])
        self.sizes = array("q")
        if resume is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            pwrite_all(self.fd, self.header.tobytes() + descs.tobytes(), 0)
            self.samples, self.checkpointed, self.page, self.offset = 0, 0, -1, 0
        else:
            self.fd = os.open(self.path, os.O_RDWR)
            self.samples = self.checkpointed = int(resume["samples"])
            self.page, self.offset = int(resume["page"]), int(resume["offset"])
            self.ptrs.extend(resume["ptrs"])
            self.sizes.extend(resume["sizes"])
            if len(self.ptrs) != self.samples:
                raise ValueError(f"{path}: resume state has {len(self.ptrs)} allocations for "
                                 f"{self.samples} samples")
            if self.page >= 0:  # the page being filled, as written at the checkpoint
                at = self.data_start + self.page * self.page_size
                got = os.pread(self.fd, self.offset, at)
                self.page_data[:len(got)] = np.frombuffer(got, np.uint8)  # zeros after it
            os.ftruncate(self.fd, self.data_start + (self.page + 1) * self.page_size)

    def _malloc(self, size: int) -> tuple[int, np.ndarray]:
        """Room for ``size`` bytes in the current page, or at the start of a fresh one."""
        if size > self.page_size:
            raise UserError(f"{self.path}: image {self.samples} takes {size} bytes, more than a "
                            f".beton page ({self.page_size}); convert with --resize")
        if self.page < 0 or size > self.page_size - self.offset:
            self._write_page()
            self.page, self.offset = self.page + 1, 0
            self.page_data.fill(0)
        start = self.offset
        self.offset += size
        self.ptrs.append(self.data_start + self.page * self.page_size + start)
        self.sizes.append(size)
        return self.ptrs[-1], self.page_data[start:self.offset]

    def _write_page(self) -> None:
        if self.page >= 0:
            pwrite_all(self.fd, self.page_data, self.data_start + self.page * self.page_size)

    def add(self, label: int, image: np.ndarray | None = None,
            encoded: tuple[bytes, bytes] | None = None) -> None:
        """One sample: the uint8 (H, W, 3) ``image``, or its ``encode_image`` output."""
        if self.samples >= self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} samples reserved")
        if len(self.rows) <= self.samples - self.checkpointed:
            grown = np.zeros(max(64, 2 * len(self.rows)), self.meta_type)
            grown[:len(self.rows)] = self.rows
            self.rows = grown
        j = self.samples - self.checkpointed
        if encoded is None:
            meta, blob = _image_row(image, self.encoding, self.jpeg_quality)
        else:
            meta = np.frombuffer(encoded[0], self.rows.dtype["f0"])
            blob = np.frombuffer(encoded[1], np.uint8)
        ptr, storage = self._malloc(len(blob))
        storage[:] = blob
        self.rows["f0"][j] = meta[0]
        self.rows["f0"]["data_ptr"][j] = ptr
        self.rows["f1"][j] = int(label)  # IntField.encode: the value itself
        self.samples += 1

    def checkpoint(self) -> dict:
        """Write the rows and the page in progress, fsync; the state to resume from."""
        n = self.samples - self.checkpointed
        pwrite_all(self.fd, self.rows[:n].tobytes(),
                   self.meta_start + self.checkpointed * self.meta_type.itemsize)
        self._write_page()
        os.fsync(self.fd)
        state = {"samples": self.samples, "page": self.page, "offset": self.offset,
                 "ptrs": self.ptrs[self.checkpointed:].tolist(),
                 "sizes": self.sizes[self.checkpointed:].tolist()}
        self.checkpointed = self.samples
        self.rows = np.zeros(0, self.meta_type)
        return state

    def finish(self) -> None:
        """Checkpoint, then append the allocation table and write the header: a complete file."""
        from ffcv.types import ALLOC_TABLE_TYPE

        if self.samples == 0:
            raise UserError(f"{self.path}: no images to write")
        self.checkpoint()
        end = self.data_start + (self.page + 1) * self.page_size
        os.ftruncate(self.fd, end)  # anything an interrupted run wrote beyond the last page
        table = np.zeros(self.samples, ALLOC_TABLE_TYPE)
        table["sample_id"] = np.arange(self.samples)
        table["ptr"] = np.frombuffer(self.ptrs, np.int64)
        table["size"] = np.frombuffer(self.sizes, np.int64)
        pwrite_all(self.fd, table.tobytes(), end)
        self.header["num_samples"] = self.samples
        self.header["alloc_table_ptr"] = end
        pwrite_all(self.fd, self.header.tobytes(), 0)
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
