"""Convert a raw image dataset into the project's on-disk formats, and verify a converted one.

    SOURCE: a directory, or a .tar / .tar.gz / .tar.xz / .zip of one (read in place, never
            extracted), holding CIFAR-10/100 python pickles, Tiny ImageNet's own layout, or
            any ImageFolder tree <split>/<class>/<image>
      └─ open_tree ──▶ Tree            relative POSIX paths of regular files -> bytes
          └─ plan_dataset ──▶ DatasetPlan   classes + per split: image paths (or arrays), labels
              └─ convert ──▶ decode in a Pool (any PIL mode -> RGB uint8, optional --resize)
                             ──▶ writers (memory .npy, FFCV .beton, DALI shards)
                             ──▶ OUT/.NAME.tmp-*  ──rename──▶  OUT/NAME   (manifest.json last)
    verify(OUT/NAME): checksums, counts, labels, and that the formats decode to the same pixels.

File names and the manifest schema come from pipeline.formats; the FFCV and DALI files are
written by pipeline.beton and pipeline.shards. Bad input raises UserError naming the path.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import socket
import stat
import tarfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .formats import (FORMATS, MANIFEST_NAME, SPLITS, Manifest, SplitInfo, dali_dir,
                      default_workers, ffcv_path, load_manifest, memory_images_path,
                      memory_labels_path, save_manifest, sha256_file)

TOOL_VERSION = "convert_datasets 1.0"
FFCV_RAW_MAX_SIDE = 64  # --ffcv-encoding auto: raw pixels up to this side, JPEG above
DEFAULT_JPEG_QUALITY = 95
SAMPLES_PER_SHARD = 5000
# --verify: a JPEG-stored image matches its raw pixels when, in 0..255 levels, the mean
# absolute difference is at most MEAN and the largest one at most MAX, at --jpeg-quality >= 90
# (scaled up for lower qualities by jpeg_tolerance()). Measured on 3000 real CIFAR-10 images
# at q95: mean <= 1.6 / max <= 18 for our 4:4:4 PIL JPEGs, mean <= 3.3 / max <= 36 for
# OpenCV's 4:2:0 ones (FFCV jpg); an unrelated image differs by ~50 on average.
JPEG_MEAN_TOL = 4.0
JPEG_MAX_TOL = 64.0
_IGNORED_NAMES = ("__MACOSX", "Thumbs.db")


# --------------------------------------------------------------------------- trees
# A Tree lists the regular files of a directory or an archive as relative POSIX paths and
# reads their bytes. Archives are read in place: nothing is ever extracted to disk.


def _ignored(rel: str) -> bool:
    return any(p.startswith(".") or p in _IGNORED_NAMES for p in rel.split("/"))


class Tree:
    def __init__(self, label: str):
        self.label = label  # SOURCE as the user gave it, for messages
        self.files: list[str] = []  # sorted relative paths of regular files
        self.dirs: set[str] = set()  # relative paths of every directory (explicit or implied)

    def _finish(self, files: Iterable[str], dirs: Iterable[str]) -> None:
        self.files = sorted(f for f in files if not _ignored(f))
        self.dirs = {d for d in dirs if d and not _ignored(d)}
        for f in self.files:  # archives need not list parent directories
            parts = f.split("/")
            self.dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    def display(self, rel: str) -> str:
        """A path for messages: the file for a directory, archive:member for an archive."""
        return f"{self.label}:{rel}"

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def job(self, rel: str) -> bytes | str:
        """What a decode worker gets for ``rel``: the bytes, or a file path it reads itself."""
        return self.read(rel)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DirTree(Tree):
    def __init__(self, root: Path, label: str):
        super().__init__(label)
        self.root = root
        files, dirs = [], []
        seen = {os.path.realpath(root)}  # symlinked directories are followed, loops are not
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root).as_posix()
            rel = "" if rel == "." else rel + "/"
            keep = []
            for d in dirnames:
                real = os.path.realpath(os.path.join(dirpath, d))
                if not _ignored(d) and real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            dirs += [rel + d for d in dirnames]
            files += [rel + f for f in filenames]
        self._finish(files, dirs)

    def display(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def job(self, rel: str) -> str:
        return str(self.root / rel)


def _member_name(archive: str, name: str) -> str:
    """The normalized relative path of an archive member; refuses absolute and '..' paths."""
    raw = name.replace("\\", "/")
    parts = raw.split("/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in parts:
        raise UserError(f"{archive}: member {name!r} has an absolute or '..' path; refusing an "
                        f"archive that could write outside its directory")
    return "/".join(p for p in parts if p not in ("", "."))


class TarTree(Tree):
    """An uncompressed tar is read lazily (random access); a compressed one is read once,
    front to back, into memory (seeking in a .gz/.xz stream would re-decompress it)."""

    def __init__(self, path: Path, label: str):
        super().__init__(label)
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:")
            self.compressed = False
        except tarfile.ReadError:
            self.tf = self._open_any(path)
            self.compressed = True
        self.members: dict[str, tarfile.TarInfo] = {}
        self.data: dict[str, bytes] = {}
        dirs = []
        try:
            for m in self.tf:
                name = _member_name(label, m.name)
                if m.issym() or m.islnk():
                    raise UserError(f"{label}: member {m.name!r} is a link; refusing archives "
                                    f"with symlinks or hardlinks")
                if m.ischr() or m.isblk() or m.isfifo():
                    raise UserError(f"{label}: member {m.name!r} is a device file or FIFO; "
                                    f"refusing the archive")
                if m.isdir():
                    dirs.append(name)
                elif m.isfile() and name:
                    if self.compressed and not _ignored(name):
                        self.data[name] = self.tf.extractfile(m).read()
                    self.members[name] = m
        except UserError:
            self.tf.close()
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # zlib/lzma errors too
            self.tf.close()
            raise UserError(f"{label}: corrupt or truncated archive ({_one_line(e)})") from None
        self._finish(self.members, dirs)

    @staticmethod
    def _open_any(path: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(path, "r:*")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{path}: not a readable tar archive ({_one_line(e)})") from None

    def read(self, rel: str) -> bytes:
        if self.compressed:
            return self.data[rel]
        f = self.tf.extractfile(self.members[rel])
        return f.read()

    def close(self) -> None:
        self.tf.close()
        self.data.clear()


class ZipTree(Tree):
    def __init__(self, path: Path, label: str):
        super().__init__(label)
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{label}: not a readable zip archive ({_one_line(e)})") from None
        files, dirs = [], []
        self._names: dict[str, zipfile.ZipInfo] = {}
        for info in self.zf.infolist():
            name = _member_name(label, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                self.zf.close()
                raise UserError(f"{label}: member {info.filename!r} is a symlink; refusing the "
                                f"archive")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                self.zf.close()
                raise UserError(f"{label}: member {info.filename!r} is a device file or FIFO; "
                                f"refusing the archive")
            (dirs if info.is_dir() else files).append(name)
            self._names[name] = info
        self._finish([f for f in files if f], dirs)

    def read(self, rel: str) -> bytes:
        return self.zf.read(self._names[rel])

    def close(self) -> None:
        self.zf.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def open_tree(source: Path | str) -> Tree:
    """A directory, or a tar (any compression) / zip archive, as a Tree."""
    label = str(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{label}: no such file or directory")
    if path.is_dir():
        return DirTree(path, label)
    if zipfile.is_zipfile(path):
        return ZipTree(path, label)
    try:
        is_tar = tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError):
        is_tar = False
    if is_tar:
        return TarTree(path, label)
    raise UserError(f"{label}: not a directory or a .tar, .tar.gz, .tar.xz or .zip archive")


# --------------------------------------------------------------------------- plans
# A DatasetPlan says what to convert: the classes and, per split, which files (or, for
# CIFAR pickles, which arrays) with which labels, in dataset order.


@dataclass
class SplitPlan:
    labels: np.ndarray  # int64 (N,), indices into DatasetPlan.classes
    paths: list[str] = field(default_factory=list)  # tree-relative image files, dataset order
    arrays: np.ndarray | None = None  # CIFAR pickles: uint8 (N, 32, 32, 3) instead of paths

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: np.ndarray, remap: np.ndarray) -> "SplitPlan":
        paths = [p for p, keep in zip(self.paths, mask) if keep] if self.paths else []
        arrays = self.arrays[mask] if self.arrays is not None else None
        return SplitPlan(remap[self.labels[mask]].astype(np.int64), paths, arrays)


@dataclass
class DatasetPlan:
    kind: str  # "imagefolder" | "tiny-imagenet" | "cifar10-pickle" | "cifar100-pickle"
    classes: list[str]
    splits: dict[str, SplitPlan]
    notes: list[str] = field(default_factory=list)  # things worth telling the user


def _level(tree: Tree, prefix: str) -> tuple[set[str], set[str]]:
    """(files, directories) directly under ``prefix``."""
    files = {f[len(prefix):] for f in tree.files if f.startswith(prefix)}
    dirs = {d[len(prefix):] for d in tree.dirs if d.startswith(prefix)}
    return {f for f in files if "/" not in f}, {d for d in dirs if d and "/" not in d}


def _layout(files: set[str], dirs: set[str]) -> str | None:
    if "batches.meta" in files and any(f.startswith("data_batch_") for f in files):
        return "cifar10-pickle"
    if {"meta", "train", "test"} <= files:
        return "cifar100-pickle"
    if "wnids.txt" in files:
        return "tiny-imagenet"
    if dirs & set(SPLITS):
        return "imagefolder"
    return None


def plan_dataset(tree: Tree) -> DatasetPlan:
    """Recognise the layout of ``tree`` and list its splits, classes and samples. A level
    without a recognised layout but with exactly one directory (an archive's wrapping folder,
    torchvision's download root) is descended into."""
    prefix = ""
    while True:
        files, dirs = _level(tree, prefix)
        kind = _layout(files, dirs)
        if kind is not None or len(dirs) != 1:
            break
        prefix += dirs.pop() + "/"
    if kind == "cifar10-pickle":
        return _plan_cifar(tree, prefix, cifar100=False)
    if kind == "cifar100-pickle":
        return _plan_cifar(tree, prefix, cifar100=True)
    if kind == "tiny-imagenet":
        return _plan_tiny_imagenet(tree, prefix)
    if kind == "imagefolder":
        return _plan_imagefolder(tree, prefix)
    where = tree.display(prefix.rstrip("/")) if prefix else tree.label
    raise UserError(f"{where}: no train/, val/ or test/ directory of <class>/<image> folders, "
                    f"and not CIFAR pickles or Tiny ImageNet; point SOURCE at the folder that "
                    f"holds the splits")


def _plan_imagefolder(tree: Tree, prefix: str) -> DatasetPlan:
    by_split: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        if f"{prefix}{split}" not in tree.dirs:
            continue
        base = f"{prefix}{split}/"
        class_dirs = {d[len(base):] for d in tree.dirs
                      if d.startswith(base) and "/" not in d[len(base):]}
        files: dict[str, list[str]] = {c: [] for c in class_dirs}
        for f in tree.files:
            if f.startswith(base) and "/" in f[len(base):]:  # files right in split/ are ignored
                files[f[len(base):].split("/")[0]].append(f)
        for c, fs in sorted(files.items()):
            if not fs:
                raise UserError(f"{tree.display(base + c)}: empty class directory; add images "
                                f"or remove it")
        if not files:
            raise UserError(f"{tree.display(base.rstrip('/'))}: no images (expected "
                            f"{split}/<class>/<image>)")
        by_split[split] = files
    classes = sorted({c for files in by_split.values() for c in files})
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, files in by_split.items():
        paths, labels = [], []
        for c in sorted(files, key=index.__getitem__):
            paths += sorted(files[c])
            labels += [index[c]] * len(files[c])
        splits[split] = SplitPlan(np.asarray(labels, np.int64), paths)
    return DatasetPlan("imagefolder", classes, splits)


def _plan_tiny_imagenet(tree: Tree, prefix: str) -> DatasetPlan:
    wnids_path = prefix + "wnids.txt"
    wnids = [w.strip() for w in tree.read(wnids_path).decode("utf-8", "replace").splitlines()
             if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{tree.display(wnids_path)}: empty or has duplicate class ids")
    index = {w: i for i, w in enumerate(wnids)}
    splits: dict[str, SplitPlan] = {}
    notes = []

    base = prefix + "train/"
    per_class: dict[str, list[str]] = {w: [] for w in wnids}
    for f in tree.files:
        parts = f[len(base):].split("/") if f.startswith(base) else []
        if len(parts) == 3 and parts[1] == "images":
            if parts[0] not in index:
                raise UserError(f"{tree.display(base + parts[0])}: class not in wnids.txt")
            per_class[parts[0]].append(f)
    if any(per_class.values()):
        for w, fs in per_class.items():
            if not fs:
                raise UserError(f"{tree.display(base + w + '/images')}: no images for a class "
                                f"listed in wnids.txt")
        paths = [f for w in wnids for f in sorted(per_class[w])]
        labels = [index[w] for w in wnids for _ in per_class[w]]
        splits["train"] = SplitPlan(np.asarray(labels, np.int64), paths)

    ann_path = prefix + "val/val_annotations.txt"
    if ann_path in set(tree.files):
        ann = {}
        for n, line in enumerate(tree.read(ann_path).decode("utf-8", "replace").splitlines(), 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) < 2 or cols[1] not in index:
                raise UserError(f"{tree.display(ann_path)}:{n}: expected '<file> <wnid> ...' with "
                                f"a wnid from wnids.txt, got {line.strip()!r}")
            ann[cols[0]] = index[cols[1]]
        vbase = prefix + "val/images/"
        items = []
        for f in tree.files:
            if f.startswith(vbase) and "/" not in f[len(vbase):]:
                name = f[len(vbase):]
                if name not in ann:
                    raise UserError(f"{tree.display(f)}: not listed in {ann_path}")
                items.append((ann[name], f))
        if not items:
            raise UserError(f"{tree.display(vbase.rstrip('/'))}: no images")
        items.sort()
        splits["val"] = SplitPlan(np.asarray([l for l, _ in items], np.int64),
                                  [f for _, f in items])
    if any(f.startswith(prefix + "test/") for f in tree.files):
        notes.append("Tiny ImageNet test/ has no labels: skipped")
    if not splits:
        raise UserError(f"{tree.display(prefix + 'train')}: Tiny ImageNet layout (wnids.txt) but "
                        f"no train/<wnid>/images/* or val/val_annotations.txt")
    return DatasetPlan("tiny-imagenet", wnids, splits, notes)


class _SafeUnpickler(pickle.Unpickler):
    """Loads CIFAR batches (dicts of bytes, lists, ints and numpy arrays) and nothing else:
    a pickle from an untrusted archive could otherwise run arbitrary code."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(tree: Tree, rel: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(tree.read(rel)), encoding="bytes").load()
    except Exception as e:  # any unpickling failure is bad input
        raise UserError(f"{tree.display(rel)}: not a CIFAR python pickle "
                        f"({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{tree.display(rel)}: not a CIFAR python pickle (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _plan_cifar(tree: Tree, prefix: str, cifar100: bool) -> DatasetPlan:
    meta_name, names_key, labels_key = (("meta", "fine_label_names", "fine_labels") if cifar100
                                        else ("batches.meta", "label_names", "labels"))
    meta = _load_pickle(tree, prefix + meta_name)
    if names_key not in meta:
        raise UserError(f"{tree.display(prefix + meta_name)}: no '{names_key}' entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    if cifar100:
        batches = {"train": ["train"], "test": ["test"]}
    else:
        train = sorted((f[len(prefix):] for f in tree.files
                        if re.fullmatch(re.escape(prefix) + r"data_batch_\d+", f)),
                       key=lambda n: int(n.rsplit("_", 1)[1]))
        batches = {"train": train, "test": ["test_batch"]}
    splits = {}
    for split, names in batches.items():
        images, labels = [], []
        for name in names:
            rel = prefix + name
            if rel not in set(tree.files):
                raise UserError(f"{tree.display(rel)}: missing CIFAR batch")
            d = _load_pickle(tree, rel)
            data = np.asarray(d.get("data", []))
            lab = np.asarray(d.get(labels_key, []), dtype=np.int64)
            if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
                    or len(lab) != len(data) or len(data) == 0):
                raise UserError(f"{tree.display(rel)}: not a CIFAR batch (need 'data' uint8 "
                                f"(N, 3072) and N '{labels_key}'; got {data.dtype} {data.shape} "
                                f"and {len(lab)} labels)")
            if lab.min() < 0 or lab.max() >= len(classes):
                raise UserError(f"{tree.display(rel)}: label {int(lab.max())} out of range for "
                                f"{len(classes)} classes")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
            labels.append(lab)
        splits[split] = SplitPlan(np.concatenate(labels), [],
                                  np.ascontiguousarray(np.concatenate(images)))
    return DatasetPlan("cifar100-pickle" if cifar100 else "cifar10-pickle", classes, splits)


def read_classes_file(path: Path | str) -> list[str]:
    """One class name a line; blank lines and '#' comments ignored."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise UserError(f"--classes {path}: cannot read it ({_one_line(e)})") from None
    names = [l.split("#", 1)[0].strip() for l in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"--classes {path}: no class names (one a line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--classes {path}: listed twice: {', '.join(dup)}")
    return names


def restrict_classes(plan: DatasetPlan, names: list[str], flag: str) -> DatasetPlan:
    """Keep the listed classes, in the dataset's own order; labels renumbered 0..k-1."""
    unknown = [n for n in names if n not in plan.classes]
    if unknown:
        raise UserError(f"{flag}: {', '.join(unknown[:5])} not among the dataset's "
                        f"{len(plan.classes)} classes (e.g. {', '.join(plan.classes[:3])})")
    wanted = set(names)
    keep = [i for i, c in enumerate(plan.classes) if c in wanted]
    remap = np.full(len(plan.classes), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    splits = {}
    for split, sp in plan.splits.items():
        mask = remap[sp.labels] >= 0
        if not mask.any():
            raise UserError(f"{flag}: split '{split}' has no images of the listed classes")
        splits[split] = sp.select(mask, remap)
    return DatasetPlan(plan.kind, [plan.classes[i] for i in keep], splits, plan.notes)


# --------------------------------------------------------------------------- decoding


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
    keep_pixels: bool  # return the pixels (memory / ffcv); else only statistics
    want_jpeg: bool  # return JPEG bytes for the dali shards
    jpeg_quality: int


class _Bad(NamedTuple):
    reason: str


class Decoded(NamedTuple):
    index: int
    pixels: np.ndarray | None  # uint8 (H, W, 3) when keep_pixels
    jpeg: bytes | None  # when want_jpeg
    passthrough: bool  # jpeg is the source file's bytes
    shape: tuple[int, int, int] | None
    stats: np.ndarray | None  # pixel_stats() of the image when the pixels are not returned
    error: str | None


def _decode_job(job: tuple[int, object], settings: DecodeSettings) -> Decoded:
    index, payload = job
    if isinstance(payload, _Bad):
        return Decoded(index, None, None, False, None, None, payload.reason)
    try:
        if isinstance(payload, np.ndarray):  # CIFAR pickle pixels
            data, arr, passthrough = None, payload, False
            if settings.resize:
                arr = np.asarray(resize_center_crop(Image.fromarray(arr), settings.resize))
        else:
            data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            arr, passthrough = decode_image(data, settings.resize)
    except UnidentifiedImageError:
        return Decoded(index, None, None, False, None, None, "not an image PIL can read")
    except Image.DecompressionBombError as e:
        return Decoded(index, None, None, False, None, None, _one_line(e))
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's corrupt-file errors
        return Decoded(index, None, None, False, None, None, f"corrupt or truncated image "
                       f"({_one_line(e)})")
    jpeg = None
    if settings.want_jpeg:
        jpeg = data if passthrough else encode_jpeg(arr, settings.jpeg_quality)
    keep = settings.keep_pixels
    return Decoded(index, arr if keep else None, jpeg, passthrough and settings.want_jpeg,
                   arr.shape, None if keep else pixel_stats([arr]), None)


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


def _windowed(jobs: Iterator, window: int, sem: threading.Semaphore, stop: threading.Event):
    """Yield jobs with at most ``window`` in flight, so archive bytes are not read far ahead."""
    for job in jobs:
        while not sem.acquire(timeout=0.1):
            if stop.is_set():
                return
        yield job


def parallel_map(fn, jobs: Iterable, workers: int, pool: Pool | None, chunksize: int = 16):
    """``map(fn, jobs)`` in order, through ``pool`` when given, with a bounded look-ahead."""
    if pool is None or workers <= 1:
        yield from map(fn, jobs)
        return
    window = max(4 * workers * chunksize, 256)
    sem, stop = threading.BoundedSemaphore(window), threading.Event()
    try:
        for result in pool.imap(fn, _windowed(iter(jobs), window, sem, stop), chunksize):
            sem.release()
            yield result
    finally:
        stop.set()


# --------------------------------------------------------------------------- convert


@dataclass
class ConvertOptions:
    name: str
    out: Path = Path("data")
    formats: tuple[str, ...] = FORMATS
    resize: int | None = None  # shorter side -> SIDE, then center crop SIDE x SIDE
    workers: int = field(default_factory=default_workers)
    overwrite: bool = False
    skip_bad: bool = False
    classes: list[str] | None = None  # keep only these (from --classes FILE)
    classes_flag: str = "--classes"  # how to name the class list in messages
    ffcv_encoding: str = "auto"  # raw | jpg | auto (raw up to FFCV_RAW_MAX_SIDE px a side)
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    samples_per_shard: int = SAMPLES_PER_SHARD
    progress: bool = True
    source_label: str | None = None  # what manifest.source records (default: SOURCE resolved)


@dataclass
class _SplitData:
    labels: np.ndarray  # int64 (N,) of the images kept
    pixels: np.ndarray | list | None  # uint8 (N, H, W, 3), or a list of (H_i, W_i, 3)
    jpegs: list[bytes] | None
    shapes: set
    stats: np.ndarray  # (7,) as in Decoded.stats, summed
    passthrough: int


@dataclass
class ConvertResult:
    root: Path
    manifest: Manifest
    seconds: dict[str, float]  # plan, decode, memory, ffcv, dali, checksums, total
    images: int
    passthrough: dict[str, int]  # per split: JPEGs stored untouched in the dali shards
    notes: list[str]

    def images_per_s(self) -> dict[str, float]:
        """Throughput: decode stage, each writer alone, each format end to end, whole run."""
        s, n = self.seconds, self.images
        out = {"decode": n / s["decode"] if s["decode"] else float("inf")}
        for fmt in self.manifest.formats:
            out[f"{fmt}_write"] = n / s[fmt] if s[fmt] else float("inf")
            out[f"{fmt}_end_to_end"] = n / (s["plan"] + s["decode"] + s[fmt])
        out["total"] = n / s["total"]
        return out


def validate_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise UserError(f"--name {name!r}: must be a plain directory name (no '/', not starting "
                        f"with '.')")
    return name


def _check_options(opts: ConvertOptions) -> None:
    validate_name(opts.name)
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise UserError(f"--formats {','.join(opts.formats)}: choose from {','.join(FORMATS)}")
    if opts.resize is not None and opts.resize < 1:
        raise UserError(f"--resize {opts.resize}: must be a positive side in pixels")
    if opts.workers < 1:
        raise UserError(f"--workers {opts.workers}: must be >= 1")
    if not 1 <= opts.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {opts.jpeg_quality}: must be in 1..100")
    if opts.ffcv_encoding not in ("raw", "jpg", "auto"):
        raise UserError(f"--ffcv-encoding {opts.ffcv_encoding}: choose raw, jpg or auto")
    if opts.samples_per_shard < 1:
        raise UserError(f"samples per shard {opts.samples_per_shard}: must be >= 1")


def _jobs(tree: Tree, sp: SplitPlan) -> Iterator[tuple[int, object]]:
    if sp.arrays is not None:
        yield from enumerate(sp.arrays)
        return
    for i, rel in enumerate(sp.paths):
        try:
            yield i, tree.job(rel)
        except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, RuntimeError) as e:
            yield i, _Bad(f"unreadable in the archive ({_one_line(e)})")


def _decode_split(tree: Tree, split: str, sp: SplitPlan, settings: DecodeSettings,
                  opts: ConvertOptions, pool: Pool | None, skipped: list[dict]) -> _SplitData:
    from tqdm import tqdm

    n = len(sp)
    fixed_size = "memory" in opts.formats
    pixels: np.ndarray | list | None = [] if settings.keep_pixels and not fixed_size else None
    jpegs: list[bytes] | None = [] if settings.want_jpeg else None
    labels, shapes = [], set()
    stats = np.zeros(7)
    passthrough, first = 0, None
    name = (lambda i: tree.display(sp.paths[i])) if sp.paths else (lambda i: f"{split}[{i}]")

    if sp.arrays is not None and not settings.resize and not settings.want_jpeg:
        # CIFAR pixels need no work: take them as they are.  # (N, 32, 32, 3)
        return _SplitData(sp.labels.copy(), sp.arrays, None, {sp.arrays.shape[1:]},
                          pixel_stats(sp.arrays), 0)

    chunksize = max(1, min(64, n // (opts.workers * 8) or 1))
    fn = partial(_decode_job, settings=settings)
    bar = tqdm(total=n, desc=f"decode {split}", unit="img", disable=not opts.progress,
               mininterval=0.5, dynamic_ncols=True)
    try:
        for r in parallel_map(fn, _jobs(tree, sp), opts.workers, pool, chunksize):
            bar.update(1)
            if r.error is not None:
                if not opts.skip_bad:
                    raise UserError(f"{name(r.index)}: {r.error}; fix or delete it, or pass "
                                    f"--skip-bad")
                skipped.append({"path": name(r.index), "reason": r.error})
                continue
            if fixed_size:
                if first is None:
                    first = r.index
                    pixels = np.empty((n, *r.shape), np.uint8)  # (N, H, W, 3), trimmed below
                elif r.shape != pixels.shape[1:]:
                    h0, w0 = pixels.shape[1:3]
                    raise UserError(f"{name(r.index)}: image is {r.shape[1]}x{r.shape[0]} but "
                                    f"{name(first)} is {w0}x{h0}; the memory format needs one "
                                    f"size: pass --resize SIDE (or leave memory out of --formats)")
                pixels[len(labels)] = r.pixels
            elif pixels is not None:
                pixels.append(r.pixels)
            if jpegs is not None:
                jpegs.append(r.jpeg)
            passthrough += r.passthrough
            labels.append(int(sp.labels[r.index]))
            shapes.add(r.shape)
            if r.stats is not None:
                stats += r.stats
    finally:
        bar.close()
    if not labels:
        raise UserError(f"split '{split}' of {tree.label}: no readable images")
    if fixed_size:
        pixels = pixels[:len(labels)]
    if pixels is not None:
        stats = pixel_stats(pixels)  # vectorized here rather than per image in the workers
    return _SplitData(np.asarray(labels, np.int64), pixels, jpegs, shapes, stats, passthrough)


def _fsync_save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temp_dirs(out: Path, name: str) -> None:
    """Temp dirs of runs that were killed (their process is gone) are removed."""
    for d in out.glob(f".{name}.tmp-*-*"):
        pid = d.name[len(f".{name}.tmp-"):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # someone else's live process
            pass


def _choose_ffcv_encoding(requested: str, data: dict[str, _SplitData]) -> str:
    if requested != "auto":
        return requested
    side = max(max(s[:2]) for d in data.values() for s in d.shapes)
    return "raw" if side <= FFCV_RAW_MAX_SIDE else "jpg"


def _mean_std(data: dict[str, _SplitData]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over every pixel of train (all splits if there is none)."""
    parts = [data["train"]] if "train" in data else list(data.values())
    s = sum(d.stats for d in parts)
    n = s[6]
    mean = s[0:3] / n
    var = np.maximum(s[3:6] / n - mean * mean, 0.0)
    return [float(x) for x in mean / 255.0], [float(x) for x in np.sqrt(var) / 255.0]


def convert(source: Path | str, opts: ConvertOptions) -> ConvertResult:
    """Convert SOURCE into ``opts.out/opts.name``; returns the manifest and the timings.

    Every output is written into a temp directory inside ``opts.out`` that is renamed to
    ``opts.name`` only once complete (manifest included): a failed or interrupted run leaves
    nothing that looks like a dataset. Decoded splits are held in memory until written.
    """
    t0 = time.perf_counter()
    _check_options(opts)
    out = Path(opts.out)
    final = out / opts.name
    if (final.exists() or final.is_symlink()) and not opts.overwrite:
        raise UserError(f"{final}: already exists; pass --overwrite to replace it")
    formats = tuple(f for f in FORMATS if f in opts.formats)
    seconds = {k: 0.0 for k in ("plan", "decode", *FORMATS, "checksums")}

    with open_tree(source) as tree:
        plan = plan_dataset(tree)
        if opts.classes is not None:
            plan = restrict_classes(plan, opts.classes, opts.classes_flag)
        seconds["plan"] = time.perf_counter() - t0

        settings = DecodeSettings(opts.resize, keep_pixels=bool({"memory", "ffcv"} & set(formats)),
                                  want_jpeg="dali" in formats, jpeg_quality=opts.jpeg_quality)
        skipped: list[dict] = []
        data: dict[str, _SplitData] = {}
        t = time.perf_counter()
        pool = Pool(opts.workers) if opts.workers > 1 else None
        try:
            for split, sp in plan.splits.items():
                data[split] = _decode_split(tree, split, sp, settings, opts, pool, skipped)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        seconds["decode"] = time.perf_counter() - t

    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out, opts.name)
    tmp = out / f".{opts.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        ffcv_encoding = _choose_ffcv_encoding(opts.ffcv_encoding, data) if "ffcv" in formats else ""
        if "memory" in formats:
            t = time.perf_counter()
            for split, d in data.items():
                _fsync_save_npy(memory_images_path(tmp, split), d.pixels)  # (N, H, W, 3) uint8
                _fsync_save_npy(memory_labels_path(tmp, split), d.labels)  # (N,) int64
            seconds["memory"] = time.perf_counter() - t
        if "ffcv" in formats:
            from .beton import write_beton
            t = time.perf_counter()
            for split, d in data.items():
                write_beton(ffcv_path(tmp, split), d.pixels, d.labels, encoding=ffcv_encoding,
                            jpeg_quality=opts.jpeg_quality, num_workers=opts.workers)
            seconds["ffcv"] = time.perf_counter() - t
        if "dali" in formats:
            from .shards import write_shards
            t = time.perf_counter()
            for split, d in data.items():
                write_shards(dali_dir(tmp, split), zip(d.jpegs, d.labels.tolist()),
                             opts.samples_per_shard)
            seconds["dali"] = time.perf_counter() - t

        t = time.perf_counter()
        files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        seconds["checksums"] = time.perf_counter() - t
        mean, std = _mean_std(data)
        splits = {}
        for split, d in data.items():
            shape = [int(x) for x in next(iter(d.shapes))] if len(d.shapes) == 1 else None
            counts = np.bincount(d.labels, minlength=len(plan.classes))
            splits[split] = SplitInfo(len(d.labels), shape, [int(c) for c in counts])
        manifest = Manifest(
            name=opts.name,
            source=opts.source_label or str(Path(source).resolve()),
            classes=list(plan.classes), splits=splits, mean=mean, std=std,
            formats=list(formats), files=files, skipped=skipped,
            ffcv_encoding=ffcv_encoding, jpeg_quality=opts.jpeg_quality,
            tool_version=TOOL_VERSION, source_format=plan.kind, resize=opts.resize)
        save_manifest(tmp, manifest)
        if final.exists() or final.is_symlink():
            old = out / f".{opts.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - t0
    return ConvertResult(final, manifest, seconds, sum(len(d.labels) for d in data.values()),
                         {s: d.passthrough for s, d in data.items()}, plan.notes)


def download_cifar(name: str, dest: Path) -> Path:
    """Fetch CIFAR-10/100 with torchvision into ``dest``; the folder of pickles it unpacks."""
    try:
        from torchvision import datasets
    except ImportError as e:
        raise UserError(f"--download: needs torchvision ({e})") from None
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(name)
    if cls is None:
        raise UserError(f"--download {name}: only cifar10 and cifar100 can be downloaded; "
                        f"otherwise pass a path as SOURCE")
    dest.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        for train in (True, False):
            cls(root=str(dest), train=train, download=True)
    except Exception as e:  # URLError, HTTPError, checksum RuntimeError, ...
        raise UserError(f"--download {name}: download failed ({_one_line(e)}); without network, "
                        f"fetch {cls.url} yourself and pass that file as SOURCE") from None
    finally:
        socket.setdefaulttimeout(old)
    return dest / cls.base_folder


# --------------------------------------------------------------------------- verify


def jpeg_tolerance(quality: int) -> tuple[float, float]:
    """(mean, max) absolute difference in 0..255 levels allowed between raw pixels and their
    JPEG at ``quality``."""
    scale = max(1.0, (100 - quality) / 10.0)  # 1 at q>=90, 2.5 at q75, 5 at q50
    return JPEG_MEAN_TOL * scale, min(255.0, JPEG_MAX_TOL * scale)


def _pil_decode(jpeg: bytes) -> np.ndarray | str:
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        return _one_line(e)


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


def _verify_split(root: Path, m: Manifest, split: str, info: SplitInfo, workers: int,
                  pool: Pool | None, progress: bool) -> list[str]:
    from tqdm import tqdm

    problems: list[str] = []
    k = m.num_classes
    ref: tuple[str, np.ndarray | list, np.ndarray, bool] | None = None  # name, px, labels, exact
    mean_tol, max_tol = jpeg_tolerance(m.jpeg_quality)

    if "memory" in m.formats:
        ip, lp = memory_images_path(root, split), memory_labels_path(root, split)
        try:
            images = np.load(ip, mmap_mode="r", allow_pickle=False)
            labels = np.load(lp, allow_pickle=False)
        except (OSError, ValueError) as e:
            problems.append(f"{ip}: unreadable ({_one_line(e)})")
        else:
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
                problems.append(f"{ip}: expected uint8 (N, H, W, 3), got {images.dtype} "
                                f"{images.shape}")
            elif info.shape is not None and list(images.shape[1:]) != list(info.shape):
                problems.append(f"{ip}: images are {list(images.shape[1:])}, manifest says "
                                f"{info.shape}")
            elif len(images) != len(labels):
                problems.append(f"{ip}: {len(images)} images but {lp.name} has {len(labels)} "
                                f"labels")
            elif labels.dtype != np.int64 or labels.ndim != 1:
                problems.append(f"{lp}: expected int64 (N,), got {labels.dtype} {labels.shape}")
            else:
                problems += _check_labels(lp.name, labels, info, k, None)
                ref = ("memory", images, labels, True)

    if "ffcv" in m.formats:
        path = ffcv_path(root, split)
        try:
            from .beton import read_beton
            images, labels = read_beton(path)
        except Exception as e:  # a broken file surfaces as any exception from the reader
            problems.append(f"{path}: unreadable ({_one_line(e)})")
        else:
            labels = np.asarray(labels, np.int64)
            problems += _check_labels(path.name, labels, info,
                                      k, ref[::2] if ref else None)
            raw = m.ffcv_encoding == "raw"
            if ref is not None and len(images) == len(ref[1]):
                both_jpeg = not raw and not ref[3]
                cmp = _Compare(path.name, ref[0], None if raw and ref[3] else
                               mean_tol * (2 if both_jpeg else 1),
                               max_tol * (2 if both_jpeg else 1))
                for i in range(len(images)):
                    cmp.add(i, np.asarray(ref[1][i]), np.asarray(images[i]))
                if cmp.problem():
                    problems.append(cmp.problem())
            if ref is None and len(labels) == info.count:
                ref = ("ffcv", images, labels, raw)

    if "dali" in m.formats:
        d = dali_dir(root, split)
        try:
            from .shards import read_shards
            samples = list(read_shards(d))
        except Exception as e:
            problems.append(f"{d}: unreadable shards ({_one_line(e)})")
        else:
            labels = np.asarray([lab for _, lab in samples], np.int64)
            problems += _check_labels(f"{split}/ shards", labels, info, k,
                                      ref[::2] if ref else None)
            cmp = None
            if ref is not None and len(samples) == len(ref[1]):
                cmp = _Compare(f"{split}/ shards", ref[0],
                               mean_tol * (1 if ref[3] else 2), max_tol * (1 if ref[3] else 2))
            undecodable, first = 0, None
            jpegs = (j for j, _ in samples)
            it = parallel_map(_pil_decode, jpegs, workers, pool, chunksize=64)
            for i, img in enumerate(tqdm(it, total=len(samples), desc=f"decode {split} shards",
                                         unit="img", disable=not progress, mininterval=0.5)):
                if isinstance(img, str):
                    undecodable += 1
                    first = first or f"image {i}: {img}"
                elif cmp is not None:
                    cmp.add(i, np.asarray(ref[1][i]), img)
            if undecodable:
                problems.append(f"{d}: {undecodable} JPEGs do not decode (first {first})")
            if cmp is not None and cmp.problem():
                problems.append(cmp.problem())
    return problems


def verify(root: Path | str, workers: int | None = None, progress: bool = True) -> list[str]:
    """Re-read every output of ``root``; a one-line description of each problem found."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such dataset directory")
    m = load_manifest(root)
    workers = workers or default_workers()
    problems = _verify_files(root, m, progress)
    pool = Pool(workers) if workers > 1 and "dali" in m.formats else None
    try:
        for split, info in m.splits.items():
            problems += _verify_split(root, m, split, info, workers, pool, progress)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return problems
