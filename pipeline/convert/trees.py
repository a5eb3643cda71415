"""SOURCE as a Tree: the regular files of a directory or an archive as relative POSIX paths,
and their bytes on request. Archives are read in place: nothing is ever extracted as files.

    DirTree   a directory (symlinked directories followed, loops not)
    TarTree   a .tar read by offset; a .tar.gz/.tar.xz/... decompressed once, front to back,
              into one anonymous temp file (``spill_dir``) that is then read by offset
    ZipTree   a .zip

Memory: a Tree holds names and (offset, size) pairs, never the members' bytes, so reading
an ImageNet-sized archive costs a few hundred bytes per file, not the archive's size.
"""
from __future__ import annotations

import os
import re
import socket
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

from ..errors import UserError, one_line

_IGNORED_NAMES = ("__MACOSX", "Thumbs.db")
_SPILL_BLOCK = 1 << 20  # bytes copied at a time from a compressed member into the spill file


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
    """An uncompressed tar is read by offset (random access); a compressed one is read once,
    front to back, each member's bytes appended to an anonymous temp file in ``spill_dir``
    (seeking in a .gz/.xz stream would re-decompress it), which is then read by offset."""

    def __init__(self, path: Path, label: str, spill_dir: Path | str | None = None):
        super().__init__(label)
        self.path = path
        self.spill = None
        try:
            self.tf = tarfile.open(path, "r:")
            self.compressed = False
        except tarfile.ReadError:
            self.tf = self._open_any(path)
            self.compressed = True
        self._file = open(path, "rb") if not self.compressed else None
        self.where: dict[str, tuple[int, int]] = {}  # member -> (offset, size) in its file
        try:
            if self.compressed:
                self.spill = tempfile.TemporaryFile(dir=spill_dir)
            dirs = self._scan(label)
        except BaseException:
            self.close()
            raise
        self._finish(self.where, dirs)

    def _scan(self, label: str) -> list[str]:
        dirs, pos = [], 0
        try:
            while (m := self.tf.next()) is not None:
                self.tf.members.clear()  # tarfile keeps every TarInfo otherwise
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
                    if m.issparse():
                        raise UserError(f"{label}: member {m.name!r} is a sparse file; "
                                        f"re-create the archive without --sparse")
                    if not self.compressed:
                        self.where[name] = (m.offset_data, m.size)
                    elif not _ignored(name):
                        self._spill_member(m, label)
                        self.where[name] = (pos, m.size)
                        pos += m.size
                    else:
                        self.where[name] = (-1, 0)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # zlib/lzma errors too
            raise UserError(f"{label}: corrupt or truncated archive ({one_line(e)})") from None
        if self.spill is not None:
            self.spill.flush()
        return dirs

    def _spill_member(self, m: tarfile.TarInfo, label: str) -> None:
        src = self.tf.extractfile(m)
        while block := src.read(_SPILL_BLOCK):
            try:
                self.spill.write(block)
            except OSError as e:  # the temp dir is full, most likely
                raise UserError(f"{label}: cannot unpack the compressed archive into a temp file "
                                f"({one_line(e)}); free space in the output directory or pass an "
                                f"uncompressed .tar") from None

    @staticmethod
    def _open_any(path: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(path, "r|*")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"{path}: not a readable tar archive ({one_line(e)})") from None

    def read(self, rel: str) -> bytes:
        offset, size = self.where[rel]
        f = self.spill if self.compressed else self._file
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise EOFError(f"member ends after {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        self.tf.close()
        for f in (self._file, self.spill):
            if f is not None:
                f.close()
        self.where.clear()


class ZipTree(Tree):
    def __init__(self, path: Path, label: str):
        super().__init__(label)
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{label}: not a readable zip archive ({one_line(e)})") from None
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


def open_tree(source: Path | str, spill_dir: Path | str | None = None) -> Tree:
    """A directory, or a tar (any compression) / zip archive, as a Tree. A compressed tar is
    unpacked into an anonymous temp file in ``spill_dir`` (default: the system's temp dir)."""
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
        return TarTree(path, label, spill_dir)
    raise UserError(f"{label}: not a directory or a .tar, .tar.gz, .tar.xz or .zip archive")


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
        raise UserError(f"--download {name}: download failed ({one_line(e)}); without network, "
                        f"fetch {cls.url} yourself and pass that file as SOURCE") from None
    finally:
        socket.setdefaulttimeout(old)
    return dest / cls.base_folder
