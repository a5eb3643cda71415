"""FFCV ``.beton`` files for the ffcv source: ``image`` (RGBImageField) + ``label`` (IntField).

``write_beton`` goes through ffcv's own ``DatasetWriter`` (so FFCV's Loader reads it), into a
temp file beside the target that is renamed when complete. ``read_beton`` decodes a file
sequentially in pure numpy/PIL (no FFCV Loader, no JIT), to verify what was written.

ffcv is imported lazily: importing this module never requires it.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import UserError
from .formats import atomic_path

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


def read_beton(path: Path | str) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
    """Decode every sample of a .beton in order: (images, labels int64 (N,)).

    ``images`` is one uint8 (N, H, W, 3) array when all images share a shape, else a list.
    JPEG-encoded images are decoded with PIL (FFCV's own turbojpeg decode may differ by a level).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such .beton; convert with --formats ffcv")
    import_ffcv(str(path))
    from ffcv.reader import Reader
    from PIL import Image

    reader = Reader(str(path))
    if reader.field_names[:2] != [IMAGE_FIELD, LABEL_FIELD]:
        raise UserError(f"{path}: fields {reader.field_names}, expected "
                        f"[{IMAGE_FIELD!r}, {LABEL_FIELD!r}]; re-convert with --overwrite")
    meta = reader.metadata
    image_meta, labels = meta["f0"], meta["f1"].astype(np.int64)
    table = reader.alloc_table
    size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    images = []
    for m in image_meta:
        ptr, h, w = int(m["data_ptr"]), int(m["height"]), int(m["width"])
        blob = data[ptr:ptr + size_of[ptr]]
        if m["mode"] == _MODE_RAW:
            images.append(np.array(blob[:h * w * 3]).reshape(h, w, 3))
        else:
            with Image.open(io.BytesIO(blob.tobytes())) as im:
                images.append(np.asarray(im.convert("RGB")))
    del data
    if len({im.shape for im in images}) == 1:
        return np.stack(images), labels
    return images, labels
