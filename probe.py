"""Evaluate a trained EMP-SSL encoder: bag-of-features embeddings -> linear probe, kNN, t-SNE.

    python probe.py --checkpoint runs/cifar10/ckpt.pt --data data/cifar10
    python probe.py --checkpoint runs/cifar10/ckpt.pt --data data/cifar10 --transfer-to data/cifar100
    python probe.py --checkpoint runs/cifar10/ckpt.pt --data data/cifar10 --random-init   # baseline

Protocol (the paper's, Sec. 4; defaults in emp_ssl/protocol.py): every image of the train and
test split is cut into ``--num-patches`` patches by the same on-device ``make_patches`` the trainer uses, with the
checkpoint's patch geometry and the dataset manifest's mean/std (a checkpoint with
``data.normalize: fixed``, such as the reference code's converted by model/reference_ckpt.py,
gives its own, for every dataset); ``--eval-mode augmented``
applies the training augmentations to them (as the paper), ``crops`` only crops. The encoder
embeds every patch and the image's feature is the mean of its patches' features
(``--feature backbone``: the ResNet's pooled h; ``pre_projector``: the first projector block,
which is what the reference code averages). On those frozen features:

    linear probe : nn.Linear on raw features, SGD(lr 0.03, momentum 0.9, wd 5e-5), batch 100,
                   lr_e = lr (1 + cos(pi e / epochs)) / 2, 100 epochs; reported: the final
                   epoch's test top-1. ``linear_best_top1`` is the best epoch *selected on
                   the test split*, reported only to compare with the reference code.
    kNN          : cosine similarity, k = 20 neighbours vote with weight exp(sim / 0.07).
    transfer     : the same on ``--transfer-to``'s train/test splits, normalized with that
                   dataset's own manifest mean/std and the checkpoint's patch geometry.

Features are cached in ``--cache-dir`` (default ``<checkpoint dir>/features``) under a key of
the checkpoint file's sha256, the dataset manifest's sha256, split, feature kind, patches,
eval mode, seed and subset, so re-probing skips extraction and a new checkpoint misses the
cache. Output in ``--out`` (default ``<checkpoint dir>/probe``, ``probe-random-init`` for the
baseline): results.json, tsne.png, confusion.png (+ transfer_*.png). Accuracies in results.json
are fractions in [0, 1]; the printed summary shows percent. results.json also holds every test
picture's linear and kNN prediction with its identity (class, position within the class), so
``tools/compare_probes.py`` can compare two probes paired on the same pictures, also across
two copies of one dataset (``--test-like`` restricts the test split to the other copy's pictures).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from emp_ssl.classifiers import knn_predict, train_linear_probe
from emp_ssl.cli import print_config, rename_flags
from emp_ssl.embedding import class_positions, embed, images_per_call, split_rows
from emp_ssl.protocol import PROBE, training_augment
from emp_ssl.runtime import AMP_CHOICES, resolve_amp, resolve_device
from model.checkpoint import CheckpointError, load_checkpoint, load_encoder
from model.encoder import FEATURE_KINDS, EncoderConfig, build_encoder
from pipeline.errors import UserError
from pipeline.formats import (MANIFEST_NAME, Manifest, load_manifest, require_format,
                              require_split, save_figure_atomic, sha256_file, write_bytes_atomic,
                              write_json_atomic)
from pipeline.patches import AugmentParams
from pipeline.sources.memory import load_memory_arrays

CACHE_VERSION = "emp-ssl-probe-features/1"
IDENTITY_NOTE = ("a test picture is (class, class_position): the k-th image of its class in the "
                 "converted split's order (file-name order within a class for an ImageFolder, "
                 "pickle order for CIFAR pickles); row is its index in the split")
EVAL_MODES = ("augmented", "crops")
TSNE_MAX_POINTS = 2000
# old spelling -> the shared vocabulary (emp_ssl/cli.py); the old ones still work, with a note
RENAMED_FLAGS = {"--test-patches": "--num-patches", "--epochs": "--probe-epochs",
                 "--batch-size": "--probe-batch-size", "--lr": "--probe-lr",
                 "--momentum": "--probe-momentum", "--weight-decay": "--probe-weight-decay"}


@dataclass
class ProbeConfig:
    """Everything one probe run uses, resolved from the command line; saved in results.json."""

    checkpoint: Path
    data: Path
    out: Path
    cache_dir: Path
    transfer_to: Path | None = None
    test_split: str = "auto"  # "auto" = test if the dataset has one, else val
    num_patches: int = PROBE.num_patches
    eval_mode: str = PROBE.eval_mode
    feature: str = PROBE.feature
    extract_batch: int = 0  # images per encoder call; 0 = from a patch budget per device
    amp: str = "fp32"  # feature extraction: "bf16" (autocast) or "fp32" (resolved from --amp auto)
    probe_epochs: int = PROBE.probe_epochs
    probe_batch_size: int = PROBE.probe_batch_size
    probe_lr: float = PROBE.probe_lr
    probe_momentum: float = PROBE.probe_momentum
    probe_weight_decay: float = PROBE.probe_weight_decay
    knn_k: int = PROBE.knn_k
    knn_temperature: float = PROBE.knn_temperature
    random_init: bool = False
    device: str = "cpu"
    max_train_images: int | None = None  # seeded random subset of the train split
    max_test_images: int | None = None  # ... of the test split
    test_like: Path | None = None  # test only on the pictures this dataset's test split holds
    plots: bool = True
    seed: int = PROBE.seed
    progress: bool = True

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--checkpoint", type=Path, required=True, help="ckpt.pt written by train.py")
    io.add_argument("--data", type=Path, required=True,
                    help="converted dataset the encoder was trained on (data/<name>, memory format)")
    io.add_argument("--transfer-to", type=Path, default=None,
                    help="also probe on this converted dataset (normalized with its own mean/std)")
    io.add_argument("--test-split", default="auto", choices=("auto", "test", "val"),
                    help="split to report on; auto = test if present, else val")
    io.add_argument("--out", type=Path, default=None,
                    help="output dir (default <checkpoint dir>/probe, or probe-random-init)")
    io.add_argument("--cache-dir", type=Path, default=None,
                    help="feature cache (default <checkpoint dir>/features)")
    io.add_argument("--no-plots", action="store_true", help="skip tsne.png and confusion.png")
    io.add_argument("--max-images", type=int, default=None,
                    help="use a seeded random subset of at most N images per split (demos); "
                         "sets both of the next two")
    io.add_argument("--max-train-images", type=int, default=None,
                    help="a seeded random subset of at most N train images")
    io.add_argument("--max-test-images", type=int, default=None,
                    help="a seeded random subset of at most N test images")
    io.add_argument("--test-like", type=Path, default=None, metavar="DATA",
                    help="test only on the pictures that DATA's test split holds: the first k "
                         "images of each class, k = DATA's count of that class. For copies of one "
                         "dataset kept in the same order (the shared lossless and JPEG CIFAR-10): "
                         "probe the JPEG copy on the twins of the 1,000 lossless test pictures")

    fx = p.add_argument_group("bag-of-features embedding")
    fx.add_argument("--num-patches", type=int, default=PROBE.num_patches,
                    help="patches per image; feature(image) = mean_i f(patch_i) (paper: 128)")
    fx.add_argument("--eval-mode", default=PROBE.eval_mode, choices=EVAL_MODES,
                    help="augmented = the training augmentations (paper); crops = crops only")
    fx.add_argument("--feature", default=PROBE.feature, choices=FEATURE_KINDS,
                    help="pre_projector (default) = first projector block (Linear+BN+ReLU), what "
                         "the reference code averages; backbone = pooled ResNet h, the paper's text")
    fx.add_argument("--extract-batch", type=int, default=0,
                    help="images per encoder call (x num-patches patches); 0 = auto")
    fx.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                    help="extraction precision: auto = bf16 autocast on CUDA (faster), fp32 "
                         "on CPU; fp32 = the reference code's. Part of the feature-cache key")

    lp = p.add_argument_group("linear probe: SGD with lr_e = lr (1 + cos(pi e / epochs)) / 2")
    lp.add_argument("--probe-epochs", type=int, default=PROBE.probe_epochs,
                    help="epochs of the linear classifier (was --epochs)")
    lp.add_argument("--probe-batch-size", type=int, default=PROBE.probe_batch_size)
    lp.add_argument("--probe-lr", type=float, default=PROBE.probe_lr)
    lp.add_argument("--probe-momentum", type=float, default=PROBE.probe_momentum)
    lp.add_argument("--probe-weight-decay", type=float, default=PROBE.probe_weight_decay)

    kn = p.add_argument_group("kNN: votes of the k nearest (cosine) weighted by exp(sim / T)")
    kn.add_argument("--knn-k", type=int, default=PROBE.knn_k)
    kn.add_argument("--knn-temperature", type=float, default=PROBE.knn_temperature)

    ru = p.add_argument_group("run")
    ru.add_argument("--random-init", action="store_true",
                    help="baseline: the checkpoint's architecture, freshly initialized (seeded)")
    ru.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    ru.add_argument("--seed", type=int, default=PROBE.seed,
                    help="seeds the patches, the subset, the probe and the random init")
    ru.add_argument("--quiet", action="store_true", help="no progress bars")
    ru.add_argument("--print-config", action="store_true",
                    help="print the resolved configuration and exit")
    return p


def resolve_config(argv: list[str] | None = None) -> tuple[ProbeConfig, bool]:
    """(the configuration, whether --print-config was given)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(rename_flags(argv, RENAMED_FLAGS, "probe"))
    for name in ("num_patches", "probe_epochs", "probe_batch_size", "knn_k"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for flag in ("max_images", "max_train_images", "max_test_images"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    max_train = a.max_train_images if a.max_train_images is not None else a.max_images
    max_test = a.max_test_images if a.max_test_images is not None else a.max_images
    if a.extract_batch < 0:
        raise UserError(f"--extract-batch must be >= 0, got {a.extract_batch}")
    if a.knn_temperature <= 0 or a.probe_lr <= 0:
        raise UserError("--knn-temperature and --probe-lr must be > 0")
    device = resolve_device(a.device)
    run_dir = a.checkpoint.parent
    out = a.out or run_dir / ("probe-random-init" if a.random_init else "probe")
    return ProbeConfig(
        checkpoint=a.checkpoint, data=a.data, out=out,
        cache_dir=a.cache_dir or run_dir / "features", transfer_to=a.transfer_to,
        test_split=a.test_split, num_patches=a.num_patches, eval_mode=a.eval_mode,
        feature=a.feature, extract_batch=a.extract_batch, amp=resolve_amp(a.amp, device),
        probe_epochs=a.probe_epochs, probe_batch_size=a.probe_batch_size, probe_lr=a.probe_lr,
        probe_momentum=a.probe_momentum, probe_weight_decay=a.probe_weight_decay,
        knn_k=a.knn_k, knn_temperature=a.knn_temperature, random_init=a.random_init,
        device=str(device), max_train_images=max_train, max_test_images=max_test,
        test_like=a.test_like, plots=not a.no_plots, seed=a.seed,
        progress=not a.quiet), a.print_config


# --------------------------------------------------------------------------- checkpoint

@dataclass
class Loaded:
    """The encoder to probe and what the checkpoint says about its inputs."""

    encoder: torch.nn.Module
    sha256: str
    patch_size: int
    out_size: int
    data: dict  # the checkpoint's "data" section: name, classes, mean, std, image_shape
    augment: AugmentParams  # the recipe it was trained with (its config), else the paper's
    meta: dict  # for results.json


def load_model(path: Path, *, random_init: bool, seed: int, device: torch.device) -> Loaded:
    ckpt = load_checkpoint(path)
    for key in ("encoder", "model", "patch", "data"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' section (has "
                                  f"{', '.join(sorted(ckpt))}); was it written by train.py?")
    try:
        patch_size, out_size = int(ckpt["patch"]["patch_size"]), int(ckpt["patch"]["out_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: 'patch' must hold integer patch_size and out_size, "
                              f"got {ckpt['patch']!r}") from None
    encoder = load_encoder(ckpt, path)  # strict: a wrong architecture fails here
    if random_init:  # same architecture, fresh weights drawn from the seed (global RNG untouched)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_encoder(EncoderConfig.from_dict(ckpt["encoder"])).eval()
    encoder = encoder.to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    sha = sha256_file(path)
    augment, augment_from = training_augment(ckpt)
    meta = {"path": str(path), "sha256": sha, "encoder": ckpt["encoder"],
            "patch": {"patch_size": patch_size, "out_size": out_size},
            "trained_on": ckpt["data"].get("name"),
            "train_seed": ((ckpt.get("config") or {}).get("run") or {}).get("seed"),
            "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
            "git_commit": ckpt.get("git_commit"),
            "augment": {**asdict(augment), "from": augment_from}}
    return Loaded(encoder, sha, patch_size, out_size, dict(ckpt["data"]), augment, meta)


# --------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    root: Path
    manifest: Manifest
    manifest_sha256: str
    train_split: str
    test_split: str
    test_per_class: list[int] | None = None  # --test-like: test on the first k of each class
    test_like: str | None = None  # the dataset those counts come from
    normalization: tuple[list[float], list[float], str] | None = None  # (mean, std, from)

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        """The (mean, std) patches are normalized with (see :func:`input_normalization`)."""
        mean, std, _ = self.normalization or (self.manifest.mean, self.manifest.std, "")
        return list(mean), list(std)

    def describe(self) -> dict:
        m = self.manifest
        return {"name": m.name, "root": str(self.root), "manifest_sha256": self.manifest_sha256,
                "source": m.source, "num_classes": m.num_classes, "train_split": self.train_split,
                "test_split": self.test_split, "test_like": self.test_like,
                "normalization": dict(zip(("mean", "std", "from"), self.normalization or
                                          (m.mean, m.std, "dataset manifest")))}


def input_normalization(checkpoint_data: dict | None, manifest: Manifest) -> tuple[list, list, str]:
    """(mean, std, where from) of the patches fed to the encoder: the dataset manifest's,
    as train.py normalizes, unless the checkpoint fixes its own (``data.normalize == "fixed"``:
    a model trained with constants for every dataset, such as the reference code's 0.5 / 0.5,
    converted by model/reference_ckpt.py); those then apply to every dataset probed."""
    d = checkpoint_data or {}
    if d.get("normalize") == "fixed":
        try:
            mean, std = [float(x) for x in d["mean"]], [float(x) for x in d["std"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("checkpoint data.normalize is 'fixed' but data.mean/std are not "
                                  "3 numbers each") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise CheckpointError(f"checkpoint data.normalize is 'fixed' with mean {mean}, std "
                                  f"{std}: need 3 numbers each, std > 0")
        return mean, std, "checkpoint (fixed)"
    return list(manifest.mean), list(manifest.std), "dataset manifest"


def test_like_counts(root: Path, ds: Dataset) -> list[int]:
    """--test-like: per class, how many test pictures ``root`` holds, after checking that it
    has ``ds``'s classes in the same order."""
    other = load_manifest(root)
    if other.classes != ds.manifest.classes:
        raise UserError(f"--test-like {root}: its classes ({', '.join(other.classes[:5])}...) are "
                        f"not those of --data {ds.root}; give a copy of the same dataset")
    split = ds.test_split if ds.test_split in other.splits else None
    counts = other.splits[split].class_counts if split else []
    if len(counts) != other.num_classes:
        raise UserError(f"--test-like {root}: its manifest has no per-class counts for a "
                        f"'{ds.test_split}' split; re-convert it with this version")
    return [int(c) for c in counts]


def open_dataset(root: Path, *, test_split: str, patch_size: int, flag: str,
                 trained_classes=None, checkpoint_data: dict | None = None) -> Dataset:
    """Check that ``root`` can be probed with this checkpoint; ``trained_classes`` (the
    checkpoint's data.classes) is given for the dataset the encoder was trained on;
    ``checkpoint_data`` (its "data" section) decides the input normalization."""
    manifest = load_manifest(root)
    require_format(manifest, root, "memory")
    if test_split == "auto":
        test_split = "test" if "test" in manifest.splits else "val"
    for split in ("train", test_split):
        info = require_split(manifest, root, split)
        if info.shape is None:
            raise UserError(f"{root}: split '{split}' has images of different sizes; the probe "
                            f"needs one size (re-convert with --resize)")
        h, w = info.shape[:2]
        if patch_size > min(h, w):
            raise UserError(f"{root}: {h}x{w} images are smaller than the checkpoint's "
                            f"{patch_size}px patches; probe on data of the size it was trained on")
    if trained_classes is not None:
        names = list(trained_classes) if not isinstance(trained_classes, int) else None
        count = trained_classes if isinstance(trained_classes, int) else len(names)
        if count != manifest.num_classes or (names is not None and names != manifest.classes):
            raise UserError(
                f"{flag} {root}: its {manifest.num_classes} classes are not the {count} classes "
                f"the checkpoint was trained on; pass the training data as --data and this "
                f"dataset as --transfer-to")
    manifest_sha = sha256_file(Path(root) / MANIFEST_NAME)
    return Dataset(Path(root), manifest, manifest_sha, "train", test_split,
                   normalization=input_normalization(checkpoint_data, manifest))


# --------------------------------------------------------------------------- features

def _save_atomic(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())  # temp file + rename


def feature_cache_path(cache_dir: Path, key_fields: dict) -> Path:
    """The cache file for one (checkpoint, dataset, split, recipe): named by a hash of it all."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in key_fields["dataset"])
    return cache_dir / f"{name}-{key_fields['split']}-{key_fields['feature']}-{key}.pt"


def load_cached(path: Path, key_fields: dict):
    """(features, labels) from the cache, or None when absent, unreadable or for other inputs."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("key") != key_fields:
            return None
        return obj["features"], obj["labels"]
    except Exception:  # noqa: BLE001 - a bad cache file is recomputed, never fatal
        return None


@dataclass
class SplitFeatures:
    features: torch.Tensor  # float32 (N, d), on the probe's device
    labels: torch.Tensor  # int64 (N,), on the probe's device
    rows: np.ndarray  # int64 (N,): the dataset row of each feature
    positions: np.ndarray  # int64 (N,): each row's position within its class
    cached: bool


def split_features(loaded: Loaded, ds: Dataset, split: str, cfg: ProbeConfig,
                   device: torch.device) -> SplitFeatures:
    """Features of one split: from the cache when its key matches, else extracted and cached."""
    m = ds.manifest
    augment = loaded.augment if cfg.eval_mode == "augmented" else None
    cap = cfg.max_train_images if split == ds.train_split else cfg.max_test_images
    per_class = ds.test_per_class if split == ds.test_split else None
    mean, std = ds.mean_std
    key_fields = {
        "version": CACHE_VERSION, "checkpoint_sha256": loaded.sha256,
        "random_init": cfg.random_init, "dataset": m.name,
        "dataset_manifest_sha256": ds.manifest_sha256, "split": split, "feature": cfg.feature,
        "test_patches": cfg.num_patches, "eval_mode": cfg.eval_mode,
        "augment": {k: list(v) if isinstance(v, tuple) else v
                    for k, v in asdict(augment).items()} if augment is not None else None,
        "patch_size": loaded.patch_size, "out_size": loaded.out_size,
        "mean": mean, "std": std, "seed": cfg.seed, "max_images": cap,
        "per_class": per_class, "amp": cfg.amp,
    }
    images, labels_np = load_memory_arrays(ds.root, split)
    B = images_per_call(cfg.extract_batch, cfg.num_patches, loaded.out_size, device, cfg.amp)
    rows = split_rows(labels_np, split, num_classes=m.num_classes, batch_size=B, seed=cfg.seed,
                      max_images=cap, per_class=per_class)
    positions = class_positions(labels_np, m.num_classes)[rows]
    path = feature_cache_path(cfg.cache_dir, key_fields)
    hit = load_cached(path, key_fields)
    if hit is not None and len(hit[1]) == len(rows):  # to the device once, for the probes
        return SplitFeatures(hit[0].to(device), hit[1].to(device), rows, positions, True)
    if len(rows) == 0:
        raise UserError(f"{ds.root}: no {split} images selected (--test-like keeps none)")

    feats = embed(images, loaded.encoder, rows=rows, num_patches=cfg.num_patches,
                  feature=cfg.feature, eval_mode=cfg.eval_mode, augment=augment,
                  patch_size=loaded.patch_size, out_size=loaded.out_size, mean=mean, std=std,
                  seed=cfg.seed, split=split, batch_size=B, amp=cfg.amp, device=device,
                  progress=cfg.progress, desc=f"{m.name}/{split} x{cfg.num_patches} patches")
    labels = torch.from_numpy(labels_np[rows]).to(device)
    _save_atomic({"key": key_fields, "features": feats.cpu(), "labels": labels.cpu(),
                  "device": str(device)}, path)
    return SplitFeatures(feats, labels, rows, positions, False)


# --------------------------------------------------------------------------- plots

def plot_tsne(features: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path,
              *, title: str, seed: int, max_points: int = TSNE_MAX_POINTS) -> None:
    """2-D t-SNE of (a seeded subsample of) the features, one colour per class (Figure 5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(labels), generator=g)[:max_points]
    x, y = features[idx].double().numpy(), labels[idx].numpy()
    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)

    C = len(class_names)
    cmap = plt.get_cmap("tab10" if C <= 10 else "tab20" if C <= 20 else "gist_ncar")
    fig, ax = plt.subplots(figsize=(7, 6))
    for c in range(C):
        sel = y == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(c / max(C - 1, 1) if C > 20 else c),
                       label=class_names[c] if C <= 20 else None)
    if C <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title)
    save_figure_atomic(fig, path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(pred: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path,
                   *, title: str) -> None:
    """Row-normalized confusion matrix of the linear probe's test predictions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = len(class_names)
    cm = torch.bincount(labels * C + pred, minlength=C * C).view(C, C).double()
    cm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if C <= 20:
        ax.set_xticks(range(C), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(C), class_names, fontsize=8)
        for i in range(C):
            for j in range(C):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * cm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure_atomic(fig, path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- evaluation

def evaluate(loaded: Loaded, ds: Dataset, cfg: ProbeConfig, device: torch.device,
             prefix: str = "") -> dict:
    """Features of both splits, linear probe, kNN and plots on one dataset -> its results."""
    name = ds.manifest.name
    t0 = time.perf_counter()
    tr = split_features(loaded, ds, ds.train_split, cfg, device)
    te = split_features(loaded, ds, ds.test_split, cfg, device)
    train_x, train_y, test_x, test_y = tr.features, tr.labels, te.features, te.labels
    t1 = time.perf_counter()
    C = ds.manifest.num_classes
    lin = train_linear_probe(train_x, train_y, test_x, test_y, num_classes=C,
                             epochs=cfg.probe_epochs, lr=cfg.probe_lr, momentum=cfg.probe_momentum,
                             weight_decay=cfg.probe_weight_decay,
                             batch_size=cfg.probe_batch_size, seed=cfg.seed, device=device,
                             progress=cfg.progress, desc=f"{name} linear probe")
    t2 = time.perf_counter()
    knn_pred = knn_predict(train_x, train_y, test_x, num_classes=C, k=cfg.knn_k,
                           temperature=cfg.knn_temperature)
    knn_acc = (knn_pred == test_y).sum().item() / len(test_y)
    knn_pred, test_x, test_y = knn_pred.cpu(), test_x.cpu(), test_y.cpu()  # for plots and JSON
    t3 = time.perf_counter()
    plots = {}
    if cfg.plots:
        what = f"{'random-init' if cfg.random_init else 'EMP-SSL'} {cfg.feature} features"
        tsne, conf = cfg.out / f"{prefix}tsne.png", cfg.out / f"{prefix}confusion.png"
        plot_tsne(test_x, test_y, ds.manifest.classes, tsne, seed=cfg.seed,
                  title=f"t-SNE of {name}/{ds.test_split}: {what}")
        acc = 100 * lin["final_top1"]
        plot_confusion(lin["test_pred"], test_y, ds.manifest.classes, conf,
                       title=f"{name}/{ds.test_split} linear probe: {acc:.2f}% top-1")
        plots = {"tsne": str(tsne), "confusion": str(conf)}
    t4 = time.perf_counter()
    return {
        "linear_top1": lin["final_top1"],
        "linear_best_top1": lin["best_top1"],
        "linear_best_epoch": lin["best_epoch"],
        "linear_best_note": "best epoch selected on the test split; for comparison with the "
                            "reference code only (linear_top1 is the final epoch)",
        "linear_train_top1": lin["final_train_top1"],
        "linear_train_loss": lin["final_train_loss"],
        "knn_top1": knn_acc,
        "dataset": ds.describe(),
        "num_train": len(train_y), "num_test": len(test_y),
        "feature_dim": train_x.shape[1],
        "features_cached": {"train": tr.cached, "test": te.cached},
        "timings_s": {"extraction": t1 - t0, "linear_probe": t2 - t1, "knn": t3 - t2,
                      "plots": t4 - t3},
        "plots": plots,
        "linear_history": lin["history"],
        "test_predictions": {
            "identity": IDENTITY_NOTE, "dataset": name, "manifest_sha256": ds.manifest_sha256,
            "split": ds.test_split, "classes": list(ds.manifest.classes),
            "skipped_files": len(ds.manifest.skipped),
            "row": te.rows.tolist(), "label": test_y.tolist(),
            "class_position": te.positions.tolist(),
            "linear": lin["test_pred"].tolist(), "knn": knn_pred.tolist()},
    }


def run(cfg: ProbeConfig) -> dict:
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    loaded = load_model(cfg.checkpoint, random_init=cfg.random_init, seed=cfg.seed, device=device)
    ds = open_dataset(cfg.data, test_split=cfg.test_split, patch_size=loaded.patch_size,
                      flag="--data", trained_classes=loaded.data.get("classes"),
                      checkpoint_data=loaded.data)
    if cfg.test_like is not None:
        ds.test_per_class = test_like_counts(cfg.test_like, ds)
        ds.test_like = str(cfg.test_like)
    transfer_ds = None
    if cfg.transfer_to is not None:  # check both datasets before any long work
        transfer_ds = open_dataset(cfg.transfer_to, test_split=cfg.test_split,
                                   patch_size=loaded.patch_size, flag="--transfer-to",
                                   checkpoint_data=loaded.data)
    cfg.out.mkdir(parents=True, exist_ok=True)

    results = {
        "checkpoint": loaded.meta, "random_init": cfg.random_init, "feature": cfg.feature,
        "test_patches": cfg.num_patches, "eval_mode": cfg.eval_mode, "seed": cfg.seed,
        "device": str(device), "amp": cfg.amp,
        "max_images": {"train": cfg.max_train_images, "test": cfg.max_test_images},
        "probe": {"epochs": cfg.probe_epochs, "batch_size": cfg.probe_batch_size,
                  "lr": cfg.probe_lr, "momentum": cfg.probe_momentum,
                  "weight_decay": cfg.probe_weight_decay,
                  "schedule": "cosine per epoch", "features": "raw (not standardized)",
                  "knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature},
        **evaluate(loaded, ds, cfg, device),
    }
    if transfer_ds is not None:
        results["transfer"] = evaluate(loaded, transfer_ds, cfg, device, prefix="transfer_")
    results["timings_s"]["total"] = time.perf_counter() - t0
    results["config"] = cfg.to_json()
    write_json_atomic(cfg.out / "results.json", results)
    return results


def _summary(r: dict) -> str:
    d = r["dataset"]
    return (f"{d['name']}/{d['test_split']}: linear {100 * r['linear_top1']:.2f}% (final epoch; "
            f"best-on-test {100 * r['linear_best_top1']:.2f}%), kNN {100 * r['knn_top1']:.2f}%, "
            f"{r['feature_dim']}-d features")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, show = resolve_config(argv)
        if show:
            print_config(cfg.to_json())
            return 0
        results = run(cfg)
    except (UserError, CheckpointError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    print(_summary(results))
    if "transfer" in results:
        print("transfer -> " + _summary(results["transfer"]))
    print(f"wrote {cfg.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
