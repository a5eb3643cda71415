"""The on-disk formats, defined once: file names, the manifest schema, atomic writes.

A converted dataset lives in one directory ``data/<name>/``:

    manifest.json                         see :class:`Manifest`
    <split>.u8.npy  <split>.labels.npy    memory: uint8 (N, H, W, 3) + int64 (N,)
    <split>.beton                         ffcv
    <split>/shard-NNNNN.tar (+ .idx)      dali: WebDataset shards of <key>.jpg + <key>.cls

The converter (tools/convert_datasets.py) writes through these definitions and every
source in pipeline/sources reads through them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
FORMATS = ("memory", "ffcv", "dali")
DALI_EXTENSIONS = ("jpg", "cls")  # members of every WebDataset sample: <key>.jpg, <key>.cls


def memory_images_path(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}.u8.npy"


def memory_labels_path(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}.labels.npy"


def ffcv_path(root: Path | str, split: str) -> Path:
    return Path(root) / f"{split}.beton"


def dali_dir(root: Path | str, split: str) -> Path:
    return Path(root) / split


def dali_shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def dali_index_name(index: int) -> str:
    return f"shard-{index:05d}.idx"


def dali_shards(root: Path | str, split: str) -> list[tuple[Path, Path]]:
    """(tar, idx) pairs of a split, in shard order."""
    d = dali_dir(root, split)
    tars = sorted(d.glob("shard-*.tar"))
    return [(t, t.with_suffix(".idx")) for t in tars]


@dataclass
class SplitInfo:
    count: int
    shape: list[int] | None  # [H, W, 3] when every image has it (after --resize), else None
    class_counts: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    """manifest.json: everything a reader needs to know about a converted dataset."""

    name: str
    source: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    mean: list[float]  # per-channel RGB mean of the train split, in [0, 1]
    std: list[float]  # per-channel RGB std of the train split, in [0, 1]
    formats: list[str]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} with --skip-bad
    ffcv_encoding: str = "raw"  # "raw" or "jpg"
    jpeg_quality: int = 90
    tool_version: str = ""
    schema_version: int = SCHEMA_VERSION
    source_format: str = ""  # imagefolder | tiny-imagenet | cifar10-pickle | cifar100-pickle
    resize: int | None = None  # --resize SIDE (shorter side, then center crop), None if not

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Manifest":
        obj = dict(obj)
        obj["splits"] = {k: SplitInfo(**v) for k, v in obj["splits"].items()}
        return cls(**obj)


def load_manifest(root: Path | str) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: no manifest; convert the dataset first with "
                        f"`python tools/convert_datasets.py SOURCE --name NAME`")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: unreadable manifest ({e}); re-convert with --overwrite")


def save_manifest(root: Path | str, manifest: Manifest) -> None:
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest.to_json())


def require_split(manifest: Manifest, root: Path | str, split: str) -> SplitInfo:
    if split not in manifest.splits:
        raise UserError(f"{root}: no split '{split}' (has {', '.join(manifest.splits)})")
    return manifest.splits[split]


def require_format(manifest: Manifest, root: Path | str, fmt: str) -> None:
    if fmt not in manifest.formats:
        raise UserError(f"{root}: converted without the '{fmt}' format (has "
                        f"{', '.join(manifest.formats)}); re-convert with --formats {fmt} --overwrite "
                        f"or pick another --source")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path beside ``path`` for the caller (or a library) to write; on success it
    is fsynced and renamed onto ``path``, on any error removed: readers never see half a file.
    The temp file is created by ``open``, so it has the mode a plain ``open`` gives
    (0666 & ~umask), which a library rewriting it keeps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    open(tmp, "xb").close()
    try:
        yield str(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` (any buffer) is at ``offset`` of ``fd``."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def dumps_json(obj, indent: int = 2, _level: int = 0) -> str:
    """``json.dumps(obj, indent=2)``, except that a list of plain numbers (or bools/None) is
    kept on one line, so per-image arrays (a probe's predictions) stay a few lines long."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj:
        if all(x is None or isinstance(x, (bool, int, float)) for x in obj):
            return json.dumps(list(obj))
        items = [inner + dumps_json(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json_atomic(path: Path | str, obj) -> None:
    """``obj`` as indented JSON (:func:`dumps_json`), written atomically."""
    write_bytes_atomic(path, (dumps_json(obj) + "\n").encode())


def save_figure_atomic(fig, path: Path | str, **savefig_kwargs) -> None:
    """matplotlib's ``fig.savefig`` through ``atomic_path``; the format is the suffix's (the
    temp name ends in .tmp) unless ``format=`` is given."""
    savefig_kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
