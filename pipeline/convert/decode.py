"""Decoding one image (the work a conversion's worker processes do) and its pixel sums.

    bytes / path / CIFAR pixels ──decode_job──▶ Decoded: uint8 (H, W, 3) RGB (any PIL mode, alpha
        dropped, 16-bit scaled, optionally resized: shorter side -> SIDE, then center crop),
        the JPEG the dali shards store (the source file itself when it is a baseline RGB JPEG
        that was not resized, else encoded at --jpeg-quality), the .beton's JPEG field when
        the ffcv format stores JPEGs (FFCV's own encoder), and the pixel sums for mean/std.

A bad file is a Decoded with ``error`` set, never an exception: the caller stops or skips.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import one_line

_LEVELS = np.arange(256, dtype=np.int64)  # (256,) 0..255
_SQUARES = _LEVELS * _LEVELS  # (256,)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16-bit and float greyscale are scaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        if img.mode != "I" or a.max(initial=0) > 255:
            a = a >> 8  # 16-bit levels -> 8-bit
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to ``side`` (bilinear, antialiased), then center crop side x side."""
    w, h = img.size
    if (w, h) == (side, side):
        return img
    if w <= h:
        nw, nh = side, max(side, int(round(h * side / w)))
    else:
        nw, nh = max(side, int(round(w * side / h))), side
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = int(round((nw - side) / 2.0)), int(round((nh - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def decode_image(data: bytes, resize: int | None = None) -> tuple[np.ndarray, bool]:
    """Image file bytes -> (uint8 (H, W, 3) RGB, whether the bytes may be stored untouched as a
    DALI JPEG: a baseline RGB JPEG without EXIF rotation whose pixels were not resized)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated / corrupt data
        passthrough = (img.format == "JPEG" and img.mode == "RGB"
                       and not img.info.get("progressive") and not img.info.get("progression")
                       and img.getexif().get(0x0112, 1) == 1)  # 0x0112: EXIF orientation
        rgb = to_rgb(img)
        if resize and rgb.size != (resize, resize):
            rgb = resize_center_crop(rgb, resize)
            passthrough = False
        return np.asarray(rgb, dtype=np.uint8).copy(), passthrough


def encode_jpeg(arr: np.ndarray, quality: int, subsampling: int = 0) -> bytes:
    """uint8 (H, W, 3) -> baseline JPEG bytes. subsampling: PIL's chroma code, 0 = 4:4:4 (the
    default: small images keep colour edges), 1 = 4:2:2, 2 = 4:2:0."""
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


@dataclass(frozen=True)
class DecodeSettings:
    resize: int | None
    keep_pixels: bool  # return the pixels (memory format, ffcv raw)
    want_jpeg: bool  # return JPEG bytes for the dali shards
    jpeg_quality: int
    ffcv_jpg: bool = False  # return the .beton's JPEG field (ffcv format, jpg encoding)


class _Bad(NamedTuple):
    reason: str


class Decoded(NamedTuple):
    index: int
    pixels: np.ndarray | None  # uint8 (H, W, 3) when keep_pixels
    jpeg: bytes | None  # when want_jpeg
    passthrough: bool  # jpeg is the source file's bytes
    shape: tuple[int, int, int] | None
    stats: np.ndarray | None  # pixel_sums() of the image, int64 (7,)
    error: str | None
    ffcv: tuple[bytes, bytes] | None = None  # ffcv_jpg: (field metadata, JPEG) from beton.encode_image


def _failed(index: int, reason: str) -> Decoded:
    return Decoded(index, None, None, False, None, None, reason)


def decode_job(job: tuple[int, object], settings: DecodeSettings) -> Decoded:
    """Decode sample ``index`` from its payload: bytes, a file path, CIFAR pixels, or _Bad."""
    index, payload = job
    if isinstance(payload, _Bad):
        return _failed(index, payload.reason)
    try:
        if isinstance(payload, np.ndarray):  # CIFAR pickle pixels
            data, arr, passthrough = None, payload, False
            if settings.resize:
                arr = np.asarray(resize_center_crop(Image.fromarray(arr), settings.resize))
        else:
            data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            arr, passthrough = decode_image(data, settings.resize)
    except UnidentifiedImageError:
        return _failed(index, "not an image PIL can read")
    except Image.DecompressionBombError as e:
        return _failed(index, one_line(e))
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's corrupt-file errors
        return _failed(index, f"corrupt or truncated image ({one_line(e)})")
    jpeg = None
    if settings.want_jpeg:
        jpeg = data if passthrough else encode_jpeg(arr, settings.jpeg_quality)
    ffcv = None
    if settings.ffcv_jpg:
        from ..beton import encode_image
        ffcv = encode_image(arr, "jpg", settings.jpeg_quality)
    return Decoded(index, arr if settings.keep_pixels else None, jpeg,
                   passthrough and settings.want_jpeg, arr.shape, pixel_sums(arr), None, ffcv)


def image_side(payload: object) -> int | None:
    """The longer side of an image file (from its header, nothing decoded); None if unreadable."""
    try:
        if isinstance(payload, np.ndarray):
            return max(payload.shape[:2])
        src = io.BytesIO(payload) if isinstance(payload, bytes) else payload
        with Image.open(src) as img:
            return max(img.size)
    except Exception:  # a bad file is reported by the decode pass, not here
        return None


def pixel_sums(img: np.ndarray) -> np.ndarray:
    """int64 (7,) of a uint8 (H, W, 3) image: per-channel sum, per-channel sum of squares, number
    of pixels. Integers, so summing them over images is exact in any order."""
    flat = img.reshape(-1, 3)  # (pixels, 3)
    out = np.empty(7, np.int64)
    for c in range(3):
        hist = np.bincount(flat[:, c], minlength=256)  # (256,) pixels at each level
        out[c], out[3 + c] = hist @ _LEVELS, hist @ _SQUARES
    out[6] = len(flat)
    return out


def pixel_stats(images: np.ndarray | list[np.ndarray], chunk: int = 4096) -> np.ndarray:
    """float64 (7,): per-channel sum, per-channel sum of squares, number of pixels."""
    out = np.zeros(7)
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        flats = [part.reshape(-1, 3)] if isinstance(part, np.ndarray) else [
            im.reshape(-1, 3) for im in part]
        for flat in flats:  # (pixels, 3) uint8
            f = flat.astype(np.float64)
            out[0:3] += f.sum(0)
            out[3:6] += np.einsum("ij,ij->j", f, f)
            out[6] += len(f)
    return out
