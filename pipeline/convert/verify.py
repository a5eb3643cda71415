"""Verifying a converted dataset: re-read every output, one image at a time.

    checksums of every file in the manifest, and no file it does not list
    per split: counts, labels and class counts against the manifest and across formats;
    pixels: the .beton equal to the .npy (raw) or within JPEG tolerance (jpg), the shards'
    JPEGs (decoded in a Pool) within JPEG tolerance of the reference (the .npy, else the .beton)

Memory: the .npy is memory-mapped, the .beton read by offset, the shards streamed; nothing
holds a split's images.
"""
from __future__ import annotations

import io
from array import array
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UserError, one_line
from ..formats import (MANIFEST_NAME, Manifest, SplitInfo, dali_dir, default_workers, ffcv_path,
                       load_manifest, memory_images_path, memory_labels_path, sha256_file)
from .parallel import close_pool, make_pool, parallel_map

# --verify: a JPEG-stored image matches its raw pixels when, in 0..255 levels, the mean
# absolute difference is at most MEAN and the largest one at most MAX, at --jpeg-quality >= 90
# (scaled up for lower qualities by jpeg_tolerance()). Measured on 3000 real CIFAR-10 images
# at q95: mean <= 1.6 / max <= 18 for our 4:4:4 PIL JPEGs, mean <= 3.3 / max <= 36 for
# OpenCV's 4:2:0 ones (FFCV jpg); an unrelated image differs by ~50 on average.
JPEG_MEAN_TOL = 4.0
JPEG_MAX_TOL = 64.0


def jpeg_tolerance(quality: int) -> tuple[float, float]:
    """(mean, max) absolute difference in 0..255 levels allowed between raw pixels and their
    JPEG at ``quality``."""
    scale = max(1.0, (100 - quality) / 10.0)  # 1 at q>=90, 2.5 at q75, 5 at q50
    return JPEG_MEAN_TOL * scale, min(255.0, JPEG_MAX_TOL * scale)


class _Compare:
    """Counts images of one format that differ from the reference beyond a tolerance."""

    def __init__(self, what: str, ref_what: str, mean_tol: float | None, max_tol: float | None):
        self.what, self.ref_what = what, ref_what
        self.mean_tol, self.max_tol = mean_tol, max_tol  # None: must be equal
        self.bad, self.first, self.exact, self.n = 0, None, 0, 0

    def add(self, i: int, ref: np.ndarray, img: np.ndarray) -> None:
        self.n += 1
        if ref.shape != img.shape:
            self._bad(i, f"shape {img.shape} vs {ref.shape}")
            return
        d = np.abs(ref.astype(np.int16) - img.astype(np.int16))
        mean, mx = float(d.mean()), int(d.max(initial=0))
        if mx == 0:
            self.exact += 1
        elif self.mean_tol is None:
            self._bad(i, f"{np.count_nonzero(d)} values differ, max {mx}/255")
        elif mean > self.mean_tol or mx > self.max_tol:
            self._bad(i, f"mean abs diff {mean:.2f}/255, max {mx}/255")

    def _bad(self, i: int, why: str) -> None:
        self.bad += 1
        if self.first is None:
            self.first = f"image {i}: {why}"

    def problem(self) -> str | None:
        if not self.bad:
            return None
        tol = ("must be equal" if self.mean_tol is None else
               f"JPEG tolerance mean {self.mean_tol:.1f}/255, max {self.max_tol:.0f}/255")
        return (f"{self.what}: {self.bad} of {self.n} images differ from {self.ref_what} "
                f"({tol}; first {self.first})")


def _check_labels(what: str, labels: np.ndarray, info: SplitInfo, num_classes: int,
                  ref: tuple[str, np.ndarray] | None) -> list[str]:
    if len(labels) != info.count:
        return [f"{what}: {len(labels)} images, manifest says {info.count}"]
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        return [f"{what}: labels outside 0..{num_classes - 1}"]
    problems = []
    counts = np.bincount(labels, minlength=num_classes).tolist()
    if counts != list(info.class_counts):
        problems.append(f"{what}: class counts {counts} differ from the manifest's "
                        f"{info.class_counts}")
    if ref is not None and not np.array_equal(labels, ref[1]):
        n = int(np.count_nonzero(labels != ref[1]))
        problems.append(f"{what}: {n} labels differ from {ref[0]}")
    return problems


def _verify_files(root: Path, m: Manifest, progress: bool) -> list[str]:
    from tqdm import tqdm

    problems = []
    for rel, digest in tqdm(sorted(m.files.items()), desc="checksums", unit="file",
                            disable=not progress, mininterval=0.5):
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: listed in the manifest but missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: sha256 differs from the manifest (changed since conversion)")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and rel not in m.files:
            problems.append(f"{p}: not listed in the manifest (a stray file; remove it)")
    return problems


def _pil_decode(sample: tuple[bytes, int]) -> tuple[np.ndarray | str, int]:
    """(jpeg, label) -> (uint8 (H, W, 3) RGB, or why it does not decode; label)."""
    jpeg, label = sample
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            return np.asarray(im.convert("RGB")), label
    except Exception as e:
        return one_line(e), label


# A reference: (format name, image(i) -> uint8 (H, W, 3), labels int64 (N,), stored exactly)
Ref = tuple[str, Callable[[int], np.ndarray], np.ndarray, bool]


def _verify_memory(root: Path, split: str, info: SplitInfo, k: int,
                   problems: list[str]) -> Ref | None:
    ip, lp = memory_images_path(root, split), memory_labels_path(root, split)
    try:
        images = np.load(ip, mmap_mode="r", allow_pickle=False)
        labels = np.load(lp, allow_pickle=False)
    except (OSError, ValueError) as e:
        problems.append(f"{ip}: unreadable ({one_line(e)})")
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        problems.append(f"{ip}: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    elif info.shape is not None and list(images.shape[1:]) != list(info.shape):
        problems.append(f"{ip}: images are {list(images.shape[1:])}, manifest says {info.shape}")
    elif len(images) != len(labels):
        problems.append(f"{ip}: {len(images)} images but {lp.name} has {len(labels)} labels")
    elif labels.dtype != np.int64 or labels.ndim != 1:
        problems.append(f"{lp}: expected int64 (N,), got {labels.dtype} {labels.shape}")
    else:
        problems += _check_labels(lp.name, labels, info, k, None)
        return "memory", lambda i: np.asarray(images[i]), labels, True
    return None


def _verify_ffcv(root: Path, m: Manifest, split: str, info: SplitInfo, ref: Ref | None,
                 progress: bool, problems: list[str], opened: list) -> Ref | None:
    from tqdm import tqdm

    path = ffcv_path(root, split)
    try:
        from ..beton import BetonFile
        beton = BetonFile(path)
    except Exception as e:  # a broken file surfaces as any exception from the reader
        problems.append(f"{path}: unreadable ({one_line(e)})")
        return None
    opened.append(beton)
    labels = beton.labels
    problems += _check_labels(path.name, labels, info, m.num_classes,
                              (ref[0], ref[2]) if ref else None)
    raw = m.ffcv_encoding == "raw"
    if ref is not None and len(beton) == len(ref[2]):
        mean_tol, max_tol = jpeg_tolerance(m.jpeg_quality)
        both_jpeg = not raw and not ref[3]
        cmp = _Compare(path.name, ref[0], None if raw and ref[3] else
                       mean_tol * (2 if both_jpeg else 1), max_tol * (2 if both_jpeg else 1))
        for i in tqdm(range(len(beton)), desc=f"compare {split} .beton", unit="img",
                      disable=not progress, mininterval=0.5):
            try:
                img = beton.image(i)
            except Exception as e:
                problems.append(f"{path}: unreadable ({one_line(e)})")
                return None
            cmp.add(i, ref[1](i), img)
        if cmp.problem():
            problems.append(cmp.problem())
    if ref is None and len(labels) == info.count:
        return "ffcv", beton.image, labels, raw
    return None


def _verify_dali(root: Path, m: Manifest, split: str, info: SplitInfo, ref: Ref | None,
                 workers: int, pool: Pool | None, progress: bool, problems: list[str]) -> None:
    from tqdm import tqdm

    from ..shards import read_shards

    d = dali_dir(root, split)
    mean_tol, max_tol = jpeg_tolerance(m.jpeg_quality)
    cmp = None
    if ref is not None:
        scale = 1 if ref[3] else 2
        cmp = _Compare(f"{split}/ shards", ref[0], mean_tol * scale, max_tol * scale)
    labels = array("q")
    undecodable, first = 0, None
    try:
        it = parallel_map(_pil_decode, read_shards(d), workers, pool, chunksize=64)
        for i, (img, label) in enumerate(tqdm(it, total=info.count, desc=f"decode {split} shards",
                                              unit="img", disable=not progress, mininterval=0.5)):
            labels.append(label)
            if isinstance(img, str):
                undecodable += 1
                first = first or f"image {i}: {img}"
            elif cmp is not None and i < len(ref[2]):
                cmp.add(i, ref[1](i), img)
    except Exception as e:
        problems.append(f"{d}: unreadable shards ({one_line(e)})")
        return
    labels = np.frombuffer(labels, np.int64)
    problems += _check_labels(f"{split}/ shards", labels, info, m.num_classes,
                              (ref[0], ref[2]) if ref else None)
    if undecodable:
        problems.append(f"{d}: {undecodable} JPEGs do not decode (first {first})")
    if cmp is not None and len(labels) == len(ref[2]) and cmp.problem():
        problems.append(cmp.problem())


def _verify_split(root: Path, m: Manifest, split: str, info: SplitInfo, workers: int,
                  pool: Pool | None, progress: bool) -> list[str]:
    problems: list[str] = []
    ref: Ref | None = None
    opened: list = []
    try:
        if "memory" in m.formats:
            ref = _verify_memory(root, split, info, m.num_classes, problems)
        if "ffcv" in m.formats:
            ref = _verify_ffcv(root, m, split, info, ref, progress, problems, opened) or ref
        if "dali" in m.formats:
            _verify_dali(root, m, split, info, ref, workers, pool, progress, problems)
    finally:
        for f in opened:
            f.close()
    return problems


def verify(root: Path | str, workers: int | None = None, progress: bool = True) -> list[str]:
    """Re-read every output of ``root``; a one-line description of each problem found."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such dataset directory")
    m = load_manifest(root)
    workers = workers or default_workers()
    problems = _verify_files(root, m, progress)
    pool = make_pool(workers) if "dali" in m.formats else None
    try:
        for split, info in m.splits.items():
            problems += _verify_split(root, m, split, info, workers, pool, progress)
    finally:
        close_pool(pool)
    return problems
