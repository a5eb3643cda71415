"""Dataset layouts: which splits, classes and samples a Tree holds, in dataset order.

    plan_dataset(tree) -> DatasetPlan   CIFAR-10/100 python pickles, Tiny ImageNet's own layout,
                                        or an ImageFolder tree <split>/<class>/<image>
    restrict_classes(plan, names)       --classes FILE: a subset, labels renumbered 0..k-1
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError, one_line
from ..formats import SPLITS
from .trees import Tree

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
                        f"({one_line(e)})") from None
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
        raise UserError(f"--classes {path}: cannot read it ({one_line(e)})") from None
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


def plan_fingerprint(plan: DatasetPlan) -> str:
    """sha256 of what ``plan`` converts, in order: layout, classes, and per split each file's
    path (or, for CIFAR pickles, the pixels) and label. Equal for the same SOURCE listing."""
    h = hashlib.sha256()
    h.update(f"{plan.kind}\0{len(plan.classes)}\0".encode())
    for c in plan.classes:
        h.update(c.encode() + b"\0")
    for split, sp in plan.splits.items():
        h.update(f"{split}\0{len(sp)}\0".encode())
        h.update(np.ascontiguousarray(sp.labels, np.int64).tobytes())
        for p in sp.paths:
            h.update(p.encode() + b"\0")
        if sp.arrays is not None:
            h.update(np.ascontiguousarray(sp.arrays).tobytes())
    return h.hexdigest()
