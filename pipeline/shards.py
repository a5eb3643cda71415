"""WebDataset shards for the dali source: ``<split>/shard-NNNNN.tar`` + ``shard-NNNNN.idx``.

Each shard is a plain (uncompressed, USTAR) tar whose samples are two members in a row,
``<key>.jpg`` (the JPEG bytes as given) and ``<key>.cls`` (the label as ASCII decimal), where
``<key>`` is the sample's global index in dataset order, zero-padded to 9 digits.

Beside every tar lies the index that ``nvidia.dali.fn.readers.webdataset(index_paths=...)``
reads, in the layout of DALI's ``wds2idx`` tool (index version ``v1.2``):

    v1.2 <number of samples>
    jpg <data offset> <size> <key>.jpg cls <data offset> <size> <key>.cls      (one line a sample)

where the offset is the byte offset of the member's data (its 512-byte header excluded).
We write it ourselves while writing the tar, so no ``tar`` subprocess is needed.

Tars are reproducible: fixed mtime/owner/mode, so the same samples give the same sha256.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import UserError
from .formats import DALI_EXTENSIONS, atomic_path, dali_index_name, dali_shard_name, write_bytes_atomic

INDEX_VERSION = "v1.2"  # what DALI's wds2idx writes and fn.readers.webdataset reads
KEY_DIGITS = 9
_BLOCK = tarfile.BLOCKSIZE  # 512
_JPG, _CLS = DALI_EXTENSIONS


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> str:
    """Append a member; return its index fields ``<data offset> <size> <name>``."""
    start = tar.offset  # where this member's header begins
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return f"{start + _BLOCK} {len(data)} {name}"  # USTAR: one header block, short names


_END = object()


def write_shards(out_dir: Path | str, samples: Iterable[tuple[bytes, int]],
                 samples_per_shard: int = 5000) -> list[Path]:
    """Write (jpeg_bytes, label) samples, in order, as WebDataset shards + DALI indexes.

    Returns the tar paths in shard order. Every file appears only complete (``atomic_path``:
    temp + rename, the tar before its index); an exception midway (also one raised by the
    ``samples`` iterator) leaves the shards finished so far and no temp file. The iterator is
    asked for the next sample only once a full shard is on disk, so a caller that counts what
    it yielded knows which shards are complete.
    """
    return append_shards(out_dir, samples, samples_per_shard, start=0)


def append_shards(out_dir: Path | str, samples: Iterable[tuple[bytes, int]],
                  samples_per_shard: int, start: int) -> list[Path]:
    """``write_shards`` continued from sample ``start`` (a multiple of ``samples_per_shard``):
    the shards before it are left as they are; the first one written is
    ``start // samples_per_shard``, its first key ``sample_key(start)``."""
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    if start < 0 or start % samples_per_shard:
        raise ValueError(f"start={start}: not a multiple of samples_per_shard={samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    it = iter(samples)
    n = start
    sample = next(it, _END)
    while sample is not _END:
        shard = n // samples_per_shard
        tar_path, lines = out_dir / dali_shard_name(shard), []
        with atomic_path(tar_path) as tmp, open(tmp, "wb") as f, \
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            while True:
                jpeg, label = sample
                key = sample_key(n)
                jpg = _add(tar, f"{key}.{_JPG}", bytes(jpeg))
                cls = _add(tar, f"{key}.{_CLS}", str(int(label)).encode("ascii"))
                lines.append(f"{_JPG} {jpg} {_CLS} {cls}")
                n += 1
                if len(lines) == samples_per_shard:
                    break  # full: ask for the next sample only once this shard is on disk
                sample = next(it, _END)
                if sample is _END:
                    break
        index = f"{INDEX_VERSION} {len(lines)}\n" + "".join(l + "\n" for l in lines)
        write_bytes_atomic(out_dir / dali_index_name(shard), index.encode("ascii"))
        paths.append(tar_path)
        if sample is not _END:
            sample = next(it, _END)
    return paths


def index_count(idx_path: Path | str) -> int:
    """Samples in a shard, from its index's header line ``v1.2 <count>``."""
    with open(idx_path, "rb") as f:
        head = f.readline().split()
    if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit():
        raise UserError(f"{idx_path}: not a DALI webdataset index ({INDEX_VERSION}); "
                        f"re-convert with --overwrite")
    return int(head[1])


INDEX_DTYPE = np.dtype([("jpg_offset", "<i8"), ("jpg_size", "<i8"), ("cls_offset", "<i8"),
                        ("cls_size", "<i8")])


def read_index(idx_path: Path | str) -> np.ndarray:
    """A shard's index as INDEX_DTYPE (n,): where each sample's .jpg and .cls data lie in its tar."""
    count = index_count(idx_path)
    with open(idx_path, "rb") as f:
        lines = f.read().split(b"\n")[1:1 + count]
    out = np.zeros(count, INDEX_DTYPE)
    try:
        for i, line in enumerate(lines):
            ext1, off1, size1, _, ext2, off2, size2, _ = line.split()
            if (ext1.decode(), ext2.decode()) != (_JPG, _CLS):
                raise ValueError(f"components {ext1!r}, {ext2!r}")
            out[i] = (int(off1), int(size1), int(off2), int(size2))
    except ValueError as e:
        raise UserError(f"{idx_path}: line {i + 2} is not '{_JPG} <offset> <size> <name> "
                        f"{_CLS} <offset> <size> <name>' ({e}); re-convert with --overwrite") from None
    if len(lines) != count:
        raise UserError(f"{idx_path}: {len(lines)} sample lines, the header says {count}; "
                        f"re-convert with --overwrite")
    return out


def read_shards(shard_dir: Path | str) -> Iterator[tuple[bytes, int]]:
    """(jpeg_bytes, label) of every sample in ``shard_dir``'s shards, in dataset order."""
    shard_dir = Path(shard_dir)
    tars = sorted(shard_dir.glob("shard-*.tar"))
    if not tars:
        raise UserError(f"{shard_dir}: no shard-*.tar files; convert with --formats dali")
    for tar_path in tars:
        with tarfile.open(tar_path, mode="r:") as tf:
            pending: dict[str, bytes] = {}
            key = None
            for member in tf:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    raise UserError(f"{tar_path}: sample {key} is missing .{_JPG} or .{_CLS}")
                key = k
                pending[ext] = tf.extractfile(member).read()
                if _JPG in pending and _CLS in pending:
                    yield pending[_JPG], int(pending[_CLS].decode("ascii"))
                    pending, key = {}, None
            if pending:
                raise UserError(f"{tar_path}: sample {key} is missing .{_JPG} or .{_CLS}")
