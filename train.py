"""EMP-SSL trainer: decode once, n augmented patches per image on the device, fused TCR loss, LARS.

    python train.py --config configs/cifar10_n20_e1.yaml --data data/cifar10 --out runs/c10
    python train.py --config configs/demo.yaml --out runs/demo --epochs 0.5 --optim.lr 0.2
    torchrun --nproc_per_node 2 train.py --config ... --out ...         # DDP, global batch kept

Objective (Tong et al. 2023): for projections z_ij (patch i of image j, L2-normalized),
    loss = -1/n sum_i R(Z_i) - lam * 1/n sum_i mean_j cos(z_ij, mean_i' z_i'j)
    R(Z) = 1/2 logdet(I + d/(b*eps) Z^T Z),  eps = 0.2 (the reference code's eps, i.e. eps^2
    of the paper's formula), lam = 200.
LARS (eta 0.005, momentum 0.9 nesterov, wd 1e-4, biases/norm weights excluded), lr 0.3 with a
per-step cosine to 0 (optional linear warm-up), batch 100 images x n patches.

Writes RUN/config.yaml (resolved config + git commit), RUN/metrics.jsonl, RUN/tb/ (TensorBoard)
and RUN/ckpt.pt (every epoch, at the end, and on SIGINT/SIGTERM; atomic). --resume continues a
run from RUN/ckpt.pt exactly: batch order is a function of (seed, epoch) and each step's patch
randomness of (seed, step, rank), so an interrupted and resumed CPU run equals an uninterrupted
one bit for bit.

Monitor (``--monitor.every K``: K steps, or a fraction of an epoch such as 0.25): every K
steps and at the end, kNN (k 20, T 0.07) and linear top-1 of the current encoder on a fixed
set of M train and M test images, each embedded as probe.py does (the mean feature over a few
augmented patches from a seeded generator), with BatchNorm in eval mode; to metrics.jsonl
({"monitor": true, ...}), TensorBoard (monitor/) and the progress bar. It draws from its own
generators only, so a run with the monitor equals one without it. ``--stop-at ACC`` ends the
run with a checkpoint when the monitor's accuracy reaches ACC and records the step, the epoch
and the training wall-clock (the loop's time without the monitor's) at which it did.
"""
from __future__ import annotations

import time

_T_IMPORTS = time.perf_counter()  # the start of this module's imports (torch's included)

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.encoder import FEATURE_KINDS, EncoderConfig, build_encoder
from model.flops import achieved_tflops, peak_tflops, step_flops_per_patch
from model.lars import LARS, lars_param_groups
from model.linear_probe import knn_top1, train_linear_probe
from model.step import EmpStep, configure_cuda
from pipeline.errors import UserError
from pipeline.features import extract_features, images_per_call, split_rows
from pipeline.formats import load_manifest, require_split, write_bytes_atomic
from pipeline.patches import AugmentParams, make_patches
from pipeline.sources import SOURCES, build_source
from pipeline.sources.base import SourceOptions
from pipeline.sources.memory import load_memory_arrays

ROOT = Path(__file__).resolve().parent
IMPORT_S = time.perf_counter() - _T_IMPORTS  # seconds this module's imports took


# ----------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    path: str = "data/cifar10"  # converted dataset directory (tools/convert_datasets.py)
    source: str = "auto"  # auto | memory | dali | torchvision | ffcv | reference
    image_size: int = 32  # stored image side this geometry is meant for (checked vs manifest)
    patch_size: int = 16  # P: side of the random fixed-size crops (paper: 16 for CIFAR)
    out_size: int = 32  # S: crops are upsampled to S x S (paper: 32 for CIFAR)
    num_patches: int = 20  # n patches per image (paper: 20 or 200)
    batch_size: int = 100  # images per step, global over all ranks (paper: 100)
    num_workers: int = 0  # decode workers of the dali/ffcv/reference sources (0 = default)
    max_images: int = 0  # cap on images per epoch (a fresh random subset each epoch); 0 = all


@dataclass
class OptimConfig:
    epochs: float = 1.0  # may be fractional; the cosine schedule spans exactly this many
    lr: float = 0.3  # peak lr; cosine to 0 per step (paper: 0.3, no warm-up)
    warmup_epochs: float = 0.0  # linear warm-up from 0 (paper: none)
    momentum: float = 0.9
    weight_decay: float = 1e-4  # applied to weights with ndim > 1 only
    eta: float = 0.005  # LARS trust coefficient: local lr = eta*|w| / (|g| + wd*|w|)


@dataclass
class LossConfig:
    lam: float = 200.0  # invariance weight lambda
    eps: float = 0.2  # TCR eps (the reference code's value, = eps^2 of the paper's formula)


@dataclass
class RunConfig:
    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the step: forward + loss as one graph, the LARS update
    cuda_graphs: bool = False  # capture the whole step as a CUDA graph, replayed every step
    peak_tflops: float = 0.0  # peak TFLOP/s per GPU for the MFU; 0 = from the GPU's name
    patch_chunk: int = 0  # K > 0: backprop K patch groups at a time (see Trainer._chunked)
    log_every: int = 20  # steps between metric reads (the only host sync in the loop)
    max_steps: int = 0  # stop (with a checkpoint) after this many steps in this invocation
    tensorboard: bool = True


@dataclass
class MonitorConfig:
    """The accuracy monitor (off unless ``every`` > 0): kNN and linear top-1 of the current
    encoder on a fixed set of M train and M test images, each embedded as probe.py does (the
    mean of ``feature`` features over ``patches`` augmented patches from a seeded generator).
    Suggested: ``every`` 0.5 (two evaluations per epoch; see the README for the cost)."""

    every: float = 0.0  # 0 = off; >= 1: every this many steps; in (0, 1): this fraction of an epoch
    images: int = 1000  # M per split: the first M of a seeded shuffle (probe.py --max-images M)
    patches: int = 8  # patches per image; feature = mean over them (probe.py --test-patches)
    feature: str = "pre_projector"  # pre_projector | backbone (probe.py --feature)
    eval_mode: str = "augmented"  # augmented = the run's training augmentations | crops
    epochs: int = 20  # linear classifier epochs on the cached features (probe.py's SGD recipe)
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0  # the monitor set, its patches and the classifier's init (probe.py --seed)
    stop_at: float = 0.0  # > 0: end the run (with a checkpoint) once stop_metric reaches it
    stop_metric: str = "linear"  # linear | knn


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)  # arch, stem, width, projector
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentParams = field(default_factory=AugmentParams)  # per-patch probabilities, strengths
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # kNN/linear every K steps, stop-at


# Settings that may change between an interrupted run and its --resume: they do not change the
# math (the monitor only reads the encoder, with generators of its own).
RESUME_FREE = {("run", "out"), ("run", "max_steps"), ("run", "log_every"), ("run", "tensorboard"),
               ("run", "compile"), ("run", "cuda_graphs"), ("run", "peak_tflops"),
               ("data", "num_workers"), *(("monitor", f.name) for f in dataclasses.fields(MonitorConfig))}


def _load_preset(path: Path, seen=()) -> dict:
    if not path.is_file():
        raise UserError(f"--config {path}: no such preset; see configs/ for the paper's recipes")
    if path in seen:
        raise UserError(f"--config {path}: 'inherit' loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: expected a mapping of sections (data:, model:, ...)")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    return _merge(_load_preset(path.parent / parent, (*seen, path)), raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value, default, key: str):
    """Parse a CLI string into the type of the field's default."""
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            items = [type(default[0])(x) for x in value.split(",")] if default else value.split(",")
            return type(default)(items)
    except ValueError:
        raise UserError(f"--{key}: cannot read {value!r} as {type(default).__name__}") from None
    return value


def build_config(raw: dict) -> TrainConfig:
    """Typed config from a nested dict; unknown sections/keys are errors, not silently dropped."""
    cfg = TrainConfig()
    for section, values in raw.items():
        if not hasattr(cfg, section) or not isinstance(values, dict):
            raise UserError(f"config: unknown section '{section}' (have: "
                            f"{', '.join(f.name for f in dataclasses.fields(cfg))})")
        sub = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(sub)}
        updates = {}
        for k, v in values.items():
            if k not in names:
                raise UserError(f"config: unknown key '{section}.{k}' (have: {', '.join(sorted(names))})")
            updates[k] = _coerce(v, getattr(sub, k), f"{section}.{k}")
        try:
            setattr(cfg, section, dataclasses.replace(sub, **updates))  # sections may be frozen
        except (TypeError, ValueError) as e:  # a section's own check (e.g. augment.jitter_order)
            raise UserError(f"config {section}: {e}") from None
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    d, o = cfg.data, cfg.optim
    if d.source not in ("auto", *SOURCES):
        raise UserError(f"--source {d.source}: unknown; choose auto, {', '.join(SOURCES)}")
    for key, val in (("data.num_patches", d.num_patches), ("data.batch_size", d.batch_size),
                     ("data.patch_size", d.patch_size), ("data.out_size", d.out_size)):
        if val < 1:
            raise UserError(f"--{key} {val}: must be >= 1")
    if d.batch_size < 2:
        raise UserError(f"--data.batch_size {d.batch_size}: the coding rate needs >= 2 images per step")
    if o.epochs <= 0:
        raise UserError(f"--epochs {o.epochs}: must be > 0 (fractions allowed)")
    if o.lr <= 0:
        raise UserError(f"--optim.lr {o.lr}: must be > 0")
    if cfg.run.amp not in ("auto", "bf16", "fp32"):
        raise UserError(f"--run.amp {cfg.run.amp}: choose auto, bf16 or fp32")
    if cfg.run.patch_chunk < 0 or cfg.run.patch_chunk > d.num_patches:
        raise UserError(f"--patch-chunk {cfg.run.patch_chunk}: must be in [0, num_patches={d.num_patches}]")
    if cfg.run.cuda_graphs and 0 < cfg.run.patch_chunk < d.num_patches:
        raise UserError(f"--run.cuda_graphs with --patch-chunk {cfg.run.patch_chunk}: the graph holds "
                        f"the unchunked step; drop one of the two")
    if cfg.run.peak_tflops < 0:
        raise UserError(f"--run.peak_tflops {cfg.run.peak_tflops}: must be >= 0 (0 = from the GPU's name)")
    if cfg.model.stem == "cifar" and d.out_size > 32:
        raise UserError(f"--model.stem cifar with {d.out_size}px patches: the cifar stem is for 32px "
                        f"inputs; use --model.stem imagenet (or a tinyimagenet/imagenet100 preset)")
    validate_monitor(cfg.monitor, cfg.model)


def validate_monitor(m: MonitorConfig, model: EncoderConfig) -> None:
    if m.every < 0 or (m.every >= 1 and m.every != int(m.every)):
        raise UserError(f"--monitor.every {m.every:g}: give whole steps (>= 1), a fraction of an epoch "
                        f"(0.25 = every quarter epoch), or 0 for off")
    if not 0 <= m.stop_at <= 1:
        raise UserError(f"--stop-at {m.stop_at:g}: an accuracy as a fraction in (0, 1], e.g. 0.90")
    if m.stop_at and not m.every:
        raise UserError(f"--stop-at {m.stop_at:g}: needs the monitor; add --monitor.every STEPS "
                        f"(or a fraction of an epoch, e.g. 0.25)")
    if m.stop_metric not in ("linear", "knn"):
        raise UserError(f"--stop-metric {m.stop_metric}: choose linear or knn")
    for key, val in (("images", m.images), ("patches", m.patches), ("epochs", m.epochs),
                     ("knn_k", m.knn_k)):
        if val < 1:
            raise UserError(f"--monitor.{key} {val}: must be >= 1")
    if m.knn_temperature <= 0:
        raise UserError(f"--monitor.knn_temperature {m.knn_temperature:g}: must be > 0")
    if m.feature not in FEATURE_KINDS:
        raise UserError(f"--monitor.feature {m.feature}: choose {' or '.join(FEATURE_KINDS)}")
    if m.feature == "pre_projector" and len(model.projector) < 2:
        raise UserError(f"--monitor.feature pre_projector: the projector {list(model.projector)} has "
                        f"no hidden block; use --monitor.feature backbone")
    if m.eval_mode not in ("augmented", "crops"):
        raise UserError(f"--monitor.eval_mode {m.eval_mode}: choose augmented or crops")


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as --section.key value, e.g. --optim.lr 0.2 "
               "--model.width 32 --augment.blur_p 0. Keys: see the dataclasses at the top of "
               "train.py (model: EncoderConfig in model/encoder.py) or a saved RUN/config.yaml.")
    p.add_argument("--config", default="configs/cifar10_n20_e1.yaml",
                   help="YAML preset (configs/); default: the paper's CIFAR-10 1-epoch n=20 recipe")
    p.add_argument("--data", help="converted dataset dir (data.path), e.g. data/cifar10")
    p.add_argument("--out", help="run directory (run.out): ckpt.pt, config.yaml, metrics.jsonl, tb/")
    p.add_argument("--epochs", type=float, help="training epochs (optim.epochs); fractions allowed")
    p.add_argument("--num-patches", type=int, help="n patches per image (data.num_patches; paper 20 or 200)")
    p.add_argument("--source", help=f"data source (data.source): auto, {', '.join(SOURCES)}; auto = "
                   "memory when the split fits on the device, else the JPEG shards on a GPU "
                   "(DALI when installed, else torchvision's nvJPEG), else FFCV")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the step: forward + loss as "
                   "one graph and the LARS update (run.compile); --run.cuda_graphs true captures "
                   "the whole step as a CUDA graph")
    p.add_argument("--patch-chunk", type=int, help="K: backprop K patch groups at a time so n=200 fits "
                   "in less memory; same gradient apart from BatchNorm batch statistics (run.patch_chunk)")
    p.add_argument("--device", help="auto | cpu | cuda (run.device)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--stop-at", metavar="ACC",
                   help="end the run with a checkpoint once the monitor's accuracy (a fraction, e.g. "
                        "0.90) is reached; records the step, epoch and training time (monitor.stop_at; "
                        "needs --monitor.every)")
    p.add_argument("--stop-metric", help="the monitor accuracy --stop-at reads: linear (default) or knn "
                                         "(monitor.stop_metric)")
    args, rest = p.parse_known_args(argv)
    raw = _load_preset(Path(args.config))
    overrides = {"data.path": args.data, "run.out": args.out, "optim.epochs": args.epochs,
                 "data.num_patches": args.num_patches, "data.source": args.source,
                 "run.compile": True if args.compile else None, "run.patch_chunk": args.patch_chunk,
                 "run.device": args.device, "run.seed": args.seed, "monitor.stop_at": args.stop_at,
                 "monitor.stop_metric": args.stop_metric}
    if len(rest) % 2:
        raise UserError(f"{rest[-1]}: overrides come in pairs, --section.key value")
    for flag, value in zip(rest[::2], rest[1::2]):
        if not flag.startswith("--") or "." not in flag:
            raise UserError(f"{flag}: unknown flag; overrides look like --section.key value (see --help)")
        overrides[flag[2:]] = value
    for key, value in overrides.items():
        if value is not None:
            section, name = key.split(".", 1)
            raw.setdefault(section, {})[name] = value
    return build_config(raw), args.resume


# ----------------------------------------------------------------------------- helpers
def _plain(obj):
    """JSON's view of a config: tuples become lists (YAML-safe; equal whichever was saved)."""
    return json.loads(json.dumps(obj))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU here; use --device cpu (or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name if name != "cuda" else f"cuda:{local_rank}")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), interpreter start-up included; None
    where /proc is missing."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines()
                    if l.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))


class Spans(dict):
    """Named wall-clock seconds of a run's start and end: ``with spans("data"): ...`` adds the
    time the block took to ``spans["data"]``."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * t))


def _installed(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] is None
        return False


def choose_source(cfg: DataConfig, split: str, device: torch.device) -> str:
    """--source auto: memory when the split fits on the device; else the shards on a GPU,
    decoded by DALI when it is installed and by torchvision (nvJPEG) otherwise; else FFCV
    (the shards again when FFCV is missing or the dataset has no .beton)."""
    if cfg.source != "auto":
        return cfg.source
    from pipeline.sources.memory import fits_in_memory

    if fits_in_memory(cfg.path, split, device):
        return "memory"
    formats = load_manifest(cfg.path).formats
    shards = "dali" if _installed("nvidia.dali") else "torchvision"
    if "dali" in formats and (device.type == "cuda" or "ffcv" not in formats
                              or not _installed("ffcv")):
        return shards
    return "ffcv"


# ----------------------------------------------------------------------------- monitor
class Monitor:
    """kNN and linear top-1 of the encoder on a fixed monitor set, every ``every`` steps.

    The set: the first M rows of a seeded shuffle of the train split and of the test split
    (``probe.py --max-images M --seed S`` embeds the same rows), held on the device as uint8.
    Each evaluation embeds them as probe.py does (``pipeline.features.extract_features``):
    feature(image) = mean of ``encoder.features(patch, feature)`` over ``patches`` patches,
    drawn ``images_per_call`` images at a time from a generator seeded to
    ``S * 1_000_003 + split_index`` afresh each time, so every evaluation sees the same
    patches, and at probe.py's settings they are the probe's patches. On those features, on
    the device: a weighted kNN (k, T as probe.py) and probe.py's linear classifier (SGD lr 0.03,
    momentum 0.9, wd 5e-5, batch 100, cosine) for ``epochs`` epochs, final-epoch test top-1.

    Cost per evaluation: 2 M x patches encoder forward passes (no backward) plus
    epochs x ceil(M / 100) linear SGD steps; a training step is n x batch patches forward and
    backward (~3 forward passes each).

    BatchNorm runs on its running statistics (eval mode) and the model goes back to train mode
    after. Every random draw comes from the monitor's own generators, so the global torch RNG,
    the training patch generator and the source order are untouched: training with the monitor
    equals training without it.
    """

    def __init__(self, cfg: MonitorConfig, *, data_path, manifest, patch_size: int, out_size: int,
                 augment: AugmentParams, device: torch.device, amp: str, steps_per_epoch: int):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.every = int(cfg.every) if cfg.every >= 1 else max(1, round(cfg.every * steps_per_epoch))
        self.geometry = dict(num_patches=cfg.patches, patch_size=patch_size, out_size=out_size,
                             mean=manifest.mean, std=manifest.std,
                             augment=augment if cfg.eval_mode == "augmented" else None)
        self.num_classes = manifest.num_classes
        self.batch = images_per_call(0, cfg.patches, out_size, device, amp)  # probe.py's default
        self.sets = {}  # split -> (uint8 (M, H, W, 3), int64 (M,), split index), on the device
        for split in ("train", "test" if "test" in manifest.splits else "val"):
            try:
                images, labels = load_memory_arrays(data_path, split)
            except UserError as e:
                raise UserError(f"--monitor.every: the monitor reads the memory format: {e}") from None
            index = ("train", "val", "test").index(split)
            rows = split_rows(labels, num_classes=manifest.num_classes, batch_size=self.batch,
                              seed=cfg.seed + index, max_images=cfg.images, per_class=None)  # (M,)
            self.sets[split] = (torch.from_numpy(np.ascontiguousarray(images[rows])).to(device),
                                torch.from_numpy(labels[rows]).to(device), index)
        self.counts = {split: len(v[1]) for split, v in self.sets.items()}

    def due(self, step: int, total_steps: int) -> bool:
        """After ``step`` steps: every ``every`` steps, and at the end of the schedule."""
        return step % self.every == 0 or step == total_steps

    def features(self, model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """split -> (float32 (M, d), int64 (M,)) on the CPU, the model in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        try:
            out = {}
            for split, (images, labels, index) in self.sets.items():
                gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + index)
                B = self.batch
                batches = ((images[i:i + B], labels[i:i + B]) for i in range(0, len(labels), B))
                out[split] = extract_features(model, batches, kind=self.cfg.feature, generator=gen,
                                              device=self.device, progress=False, amp=self.amp,
                                              **self.geometry)
            return out
        finally:
            model.train(was_training)

    def evaluate(self, model: torch.nn.Module) -> dict:
        """{"knn_top1", "linear_top1"} (fractions) of ``model`` on the monitor set, and the
        seconds its features and its two classifiers took ("features_s", "heads_s")."""
        c = self.cfg
        t0 = time.perf_counter()
        (train_x, train_y), (test_x, test_y) = self.features(model).values()  # on the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # features_s is the features' time
        t1 = time.perf_counter()
        knn = knn_top1(train_x, train_y, test_x, test_y, num_classes=self.num_classes,
                       k=c.knn_k, temperature=c.knn_temperature)
        lin = train_linear_probe(train_x, train_y, test_x, test_y, num_classes=self.num_classes,
                                 epochs=c.epochs, seed=c.seed, device=self.device, progress=False)
        return {"knn_top1": knn, "linear_top1": lin["final_top1"], "features_s": t1 - t0,
                "heads_s": time.perf_counter() - t1}


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg = cfg
        self.spans = spans = Spans()  # where the start-up time goes (summary: "startup_s")
        with spans("setup"):
            self._setup(cfg, resume)
        d = cfg.data
        with spans("data"):
            self._build_source(cfg)
        with spans("model"):
            self._build_model(cfg, resume)
        with spans("flop_count"):  # once: the model FLOPs per patch of this step (meta device)
            self.flops_per_patch = step_flops_per_patch(
                cfg.model, num_patches=d.num_patches, batch=self.local_batch, out_size=d.out_size,
                lam=cfg.loss.lam, eps=cfg.loss.eps)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_tflops(name, self.amp, cfg.run.peak_tflops)  # None: no MFU (CPU, unknown GPU)
        self._stop_signal = None
        self.time_to_first_step: float | None = None

    def _setup(self, cfg: TrainConfig, resume: bool) -> None:
        self.rank, self.world, local = init_distributed()
        self.is_main = self.rank == 0
        self.device = pick_device(cfg.run.device, local)
        self._patch_gen = torch.Generator(device=self.device)  # re-seeded every step
        self.out = Path(cfg.run.out)
        ckpt_path = self.out / "ckpt.pt"
        if ckpt_path.exists() and not resume:
            raise UserError(f"--out {self.out}: already holds a run (ckpt.pt); pass --resume to "
                            f"continue it, or choose a new --out")
        if resume and not ckpt_path.exists():
            raise UserError(f"--resume: {ckpt_path} does not exist; start without --resume")
        self.amp = cfg.run.amp if cfg.run.amp != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if self.device.type == "cuda":
            configure_cuda()
        if cfg.run.cuda_graphs and self.world > 1:
            raise UserError(f"--run.cuda_graphs: captures the one-process step; not under DDP "
                            f"({self.world} ranks)")
        self._resume_from = ckpt_path if resume else None

    def _build_source(self, cfg: TrainConfig) -> None:
        d = cfg.data
        self.manifest = load_manifest(d.path)
        info = require_split(self.manifest, d.path, "train")
        if info.shape is not None and (info.shape[0] != d.image_size or info.shape[1] != d.image_size):
            raise UserError(f"--data {d.path}: images are {info.shape[0]}x{info.shape[1]} but the preset "
                            f"expects {d.image_size}x{d.image_size} ({d.patch_size}->{d.out_size} patches, "
                            f"{cfg.model.stem} stem); pick the matching --config or re-convert with "
                            f"--resize {d.image_size}")
        if d.batch_size % self.world:
            raise UserError(f"--data.batch_size {d.batch_size}: not divisible by the {self.world} ranks")
        self.local_batch = d.batch_size // self.world
        self.source_name = choose_source(d, "train", self.device)
        opts = SourceOptions(batch_size=self.local_batch, device=self.device, shuffle=True,
                             drop_last=True, seed=cfg.run.seed, rank=self.rank, world_size=self.world,
                             num_workers=d.num_workers)
        extra = {}
        if self.source_name == "reference":
            extra = dict(num_patches=d.num_patches, patch_size=d.patch_size, out_size=d.out_size,
                         mean=self.manifest.mean, std=self.manifest.std, augment=cfg.augment)
        self.source = build_source(self.source_name, d.path, "train", opts, **extra)
        self.steps_per_epoch = len(self.source)
        if d.max_images:
            self.steps_per_epoch = min(self.steps_per_epoch, max(1, d.max_images // d.batch_size))
        if self.steps_per_epoch < 1:
            raise UserError(f"--data {d.path}: fewer train images ({info.count}) than one batch "
                            f"({d.batch_size}); lower --data.batch_size")
        self.total_steps = max(1, round(cfg.optim.epochs * self.steps_per_epoch))
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)

    def _build_model(self, cfg: TrainConfig, resume: bool) -> None:
        torch.manual_seed(cfg.run.seed)
        self.model = build_encoder(cfg.model).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = LARS(lars_param_groups(self.model), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                        weight_decay=cfg.optim.weight_decay, eta=cfg.optim.eta)
        self.monitor = None
        if cfg.monitor.every:
            d = cfg.data
            self.monitor = Monitor(cfg.monitor, data_path=d.path, manifest=self.manifest,
                                   patch_size=d.patch_size, out_size=d.out_size, augment=cfg.augment,
                                   device=self.device, amp=self.amp, steps_per_epoch=self.steps_per_epoch)
        self.step = 0
        self.train_s_before = 0.0  # training seconds of earlier invocations of this run (resume)
        self._t_loop, self._monitor_s = None, 0.0
        if resume:
            self._restore(self._resume_from)
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        graphs = cfg.run.cuda_graphs
        if graphs and self.device.type != "cuda" and self.is_main:
            print("train: note: --run.cuda_graphs without CUDA: the same static step runs "
                  "uncaptured", file=sys.stderr)
        self.step_fn = EmpStep(net, self.model, self.opt, lam=cfg.loss.lam, eps=cfg.loss.eps,
                               amp=self.amp, patch_chunk=0 if graphs else cfg.run.patch_chunk,
                               ddp=net if self.world > 1 else None, compile=cfg.run.compile,
                               cuda_graphs=graphs)

    # -- checkpoints
    def _payload(self) -> dict:
        d = self.cfg.data
        return {
            "model": self.model.state_dict(),
            "encoder": self.cfg.model.to_dict(),
            "patch": {"patch_size": d.patch_size, "out_size": d.out_size},
            "data": {"name": self.manifest.name, "classes": list(self.manifest.classes),
                     "mean": list(self.manifest.mean), "std": list(self.manifest.std),
                     "image_shape": self.manifest.splits["train"].shape},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epoch": self.step // self.steps_per_epoch,
            "rng": {"torch": torch.get_rng_state()},
            "train_s": self.train_seconds(),
            "config": asdict(self.cfg),
            "git_commit": self.commit,
        }

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        path = self.out / "ckpt.pt"
        save_checkpoint(path, self._payload())
        self.last_good = path
        return path

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        saved = _plain(ckpt.get("config", {}))  # tuples and lists compare equal after this
        mine = _plain(asdict(self.cfg))
        diff = [f"{s}.{k}" for s in mine for k in mine[s]
                if s in saved and saved[s].get(k) != mine[s][k] and (s, k) not in RESUME_FREE]
        if diff:
            raise UserError(f"--resume: the config differs from the run's saved one in {', '.join(diff)}; "
                            f"resume with the same settings or start a new --out")
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.train_s_before = float(ckpt.get("train_s", 0.0))
        torch.set_rng_state(ckpt["rng"]["torch"])

    def train_seconds(self) -> float:
        """Training wall-clock of the run so far, over all its invocations: the loop's time
        without the monitor's (what time-to-accuracy reports)."""
        if self._t_loop is None:
            return self.train_s_before
        return self.train_s_before + time.perf_counter() - self._t_loop - self._monitor_s

    def _on_signal(self, signum, frame):  # noqa: ARG002
        self._stop_signal = signum

    # -- one step
    def _patches(self, batch, step: int) -> torch.Tensor:
        images, _ = batch
        if self.source.yields_patches:
            return images  # (n, B, 3, S, S) from the reference source
        d = self.cfg.data
        gen = self._patch_gen.manual_seed((self.cfg.run.seed * 1_000_003 + step) * self.world + self.rank)
        return make_patches(images, num_patches=d.num_patches, patch_size=d.patch_size,
                            out_size=d.out_size, mean=self.manifest.mean, std=self.manifest.std,
                            generator=gen, augment=self.cfg.augment)  # (n, B, 3, S, S)

    def train_step(self, batch, step: int):
        lr = cosine_lr(step, self.total_steps, self.cfg.optim.lr, self.warmup_steps)
        loss, tcr, inv = self.step_fn(self._patches(batch, step), lr)
        return loss, tcr, inv, lr

    # -- the loop
    def fit(self) -> int:
        with self.spans("run_dir"):  # git commit, config.yaml, TensorBoard writer
            writer = self._open_run_dir()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop(writer)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if writer is not None:
                writer.close()
            self.source.close()

    def _open_run_dir(self):
        cfg = self.cfg
        self.commit = git_commit()
        self.last_good = self.out / "ckpt.pt" if (self.out / "ckpt.pt").exists() else None
        writer = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = {**asdict(cfg), "git_commit": self.commit, "source_resolved": self.source_name,
                        "device": str(self.device), "world_size": self.world}
            resolved = _plain(resolved)  # tuples -> lists for YAML
            write_bytes_atomic(self.out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out / "tb"))
        return writer

    def _loop(self, writer) -> int:
        from tqdm import tqdm

        cfg, d = self.cfg, self.cfg.data
        start = self.step
        end = self.total_steps if not cfg.run.max_steps else min(self.total_steps, start + cfg.run.max_steps)
        bar = tqdm(total=self.total_steps, initial=start, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, mininterval=1.0, desc="train")
        metrics_f = open(self.out / "metrics.jsonl", "a") if self.is_main else None
        self.model.train()
        it, t_start = None, time.perf_counter()
        self._t_loop, self._monitor_s = t_start, 0.0
        win_t, win_steps, win_data = time.perf_counter(), 0, 0.0
        pending = None  # (step, loss, tcr, inv, lr) tensors not yet read back
        total_data = 0.0
        postfix = {}
        stopped = None  # the monitor record that reached --stop-at
        monitor_evals = 0
        try:
            for step in range(start, end):
                epoch, b = divmod(step, self.steps_per_epoch)
                if it is None or b == 0:
                    self.source.set_epoch(epoch, b)
                    it = iter(self.source)
                t0 = time.perf_counter()
                batch = next(it)
                dt = time.perf_counter() - t0
                win_data += dt
                total_data += dt
                loss, tcr, inv, lr = self.train_step(batch, step)
                if step == start:  # one sync: the first step's time (compile, autotune, capture)
                    self._first_step_done(t0)
                self.step = step + 1
                win_steps += 1
                pending = (step, loss, tcr, inv, lr)
                bar.update(1)
                last = self.step == end
                if self.step % cfg.run.log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    rec = self._record(pending, epoch, now - win_t, win_steps, win_data)
                    win_t, win_steps, win_data = now, 0, 0.0
                    if not math.isfinite(rec["loss"]):
                        where = self.last_good or "none (no checkpoint was written yet)"
                        print(f"\ntrain: error: non-finite loss ({rec['loss']}) at step {rec['step']}; last good "
                              f"checkpoint: {where}; try a lower --optim.lr, --run.amp fp32, or check the "
                              f"data with `python tools/convert_datasets.py --verify {d.path}`", file=sys.stderr)
                        return 3
                    if self.is_main:
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                        if writer is not None:
                            for k in ("loss", "tcr", "inv", "lr", "images_per_s", "patches_per_s",
                                      "tflops", "mfu"):
                                if k in rec:
                                    writer.add_scalar(f"train/{k}", rec[k], rec["step"])
                    postfix.update(loss=f"{rec['loss']:.2f}", lr=f"{rec['lr']:.3g}",
                                   img_s=f"{rec['images_per_s']:.0f}", p_s=f"{rec['patches_per_s']:.0f}",
                                   data=f"{100 * rec['data_frac']:.0f}%")
                    bar.set_postfix(postfix)
                if self.monitor is not None and self.monitor.due(self.step, self.total_steps):
                    mrec = self._monitor(writer, metrics_f)
                    monitor_evals += 1
                    win_t = time.perf_counter()  # the throughput window leaves the monitor out
                    if mrec is not None:
                        postfix.update(knn=f"{100 * mrec['knn_top1']:.1f}%",
                                       lin=f"{100 * mrec['linear_top1']:.1f}%")
                        bar.set_postfix(postfix)
                    stopped = self._stop_reached(mrec, metrics_f)
                    if stopped is not None:
                        break
                if self.step % self.steps_per_epoch == 0 and not last:
                    with self.spans("checkpoints"):
                        self.save()
                if self._stop_signal is not None:
                    path = self.save()
                    if self.is_main:
                        print(f"\ntrain: stopped by signal {self._stop_signal} at step {self.step}; "
                              f"checkpoint {path}; continue with --resume", file=sys.stderr)
                    return 128 + self._stop_signal
            with self.spans("final_checkpoint"):
                self.save()
        finally:
            bar.close()
            if metrics_f:
                metrics_f.close()
        wall = time.perf_counter() - t_start
        steps = self.step - start
        if self.is_main and steps:
            self._summary(steps, wall, total_data, monitor_evals, stopped)
        return 0

    def _first_step_done(self, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.spans["first_step"] = time.perf_counter() - t0
        self.time_to_first_step = process_age_s()  # since the process started; None without /proc

    def _flops_fields(self, patches_per_s: float) -> dict:
        """Achieved TFLOP/s at a (global) patches/s and, where the peak is known, the MFU."""
        out = {"tflops": achieved_tflops(patches_per_s, self.flops_per_patch)}
        if self.peak is not None:
            out["mfu"] = out["tflops"] / (self.peak.tflops * self.world)
        return out

    def startup_breakdown(self) -> dict:
        """Seconds before the first step (and at the end) by phase: interpreter start-up,
        imports (torch's included), setup, data (load + transfer), model (build, optimizer,
        restore, compile wrapper), flop_count, run_dir (git, config, TensorBoard), first_step
        (the first batch, patches and step: compilation, cuDNN autotuning, graph capture)."""
        out = dict(self.spans)
        age = process_age_s()
        if age is not None:
            out["interpreter"] = age - (time.perf_counter() - _T_IMPORTS)
        out["imports"] = IMPORT_S
        return {k: round(v, 3) for k, v in out.items()}

    def _summary(self, steps: int, wall: float, total_data: float, monitor_evals: int = 0,
                 stopped: dict | None = None) -> None:
        cfg, d = self.cfg, self.cfg.data
        imgs, n = steps * d.batch_size, d.num_patches
        first = self.spans.get("first_step", 0.0)
        train_wall = wall - self._monitor_s  # the monitor's evaluations are not training
        # the steady rate: every step after the first (which compiles, autotunes, captures)
        steady = ((imgs - d.batch_size) * n / (train_wall - first) if steps > 1 and train_wall > first
                  else imgs * n / train_wall)
        flops = self._flops_fields(steady)
        summary = {"summary": True, "steps": steps, "wall_s": round(wall, 2),
                   "train_s": round(self.train_seconds(), 2),
                   "images_per_s": imgs / train_wall, "patches_per_s": imgs * n / train_wall,
                   "patches_per_s_after_first_step": steady, "flops_per_patch": self.flops_per_patch,
                   **flops, "peak_tflops": self.peak.tflops if self.peak else None,
                   "peak": self.peak.source if self.peak else None,
                   "data_wait_frac": total_data / train_wall, "source": self.source_name,
                   "device": str(self.device), "amp": self.amp, "compile": cfg.run.compile,
                   "cuda_graphs": cfg.run.cuda_graphs,
                   "time_to_first_step_s": self.time_to_first_step,
                   "startup_s": self.startup_breakdown()}
        if self.monitor is not None:
            summary["monitor_cost"] = {"evals": monitor_evals, "every_steps": self.monitor.every,
                                       "monitor_s": round(self._monitor_s, 2),
                                       "share_of_wall": self._monitor_s / wall}
        if cfg.monitor.stop_at:
            summary["stop"] = stopped or {"stop_at": cfg.monitor.stop_at, "metric": cfg.monitor.stop_metric,
                                          "reached": False}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        util = (f", {100 * flops['mfu']:.1f}% MFU of {self.peak.tflops:.0f} ({self.peak.source})"
                if "mfu" in flops else "")
        s = summary["startup_s"]
        phases = ", ".join(f"{k} {s[k]:.1f}" for k in ("imports", "data", "model", "first_step") if k in s)
        ttfs = (f"; time to first step {self.time_to_first_step:.1f}s ({phases})"
                if self.time_to_first_step is not None else "")
        mon = ""
        if self.monitor is not None:
            mon = (f"; monitor {monitor_evals} evals, {self._monitor_s:.1f}s "
                   f"({100 * self._monitor_s / wall:.1f}% of the wall time)")
        print(f"train: {steps} steps in {wall:.1f}s: {summary['images_per_s']:.0f} images/s, "
              f"{summary['patches_per_s']:.0f} patches/s ({steady:.0f} after the first step: "
              f"{flops['tflops']:.3g} TFLOP/s{util}), data wait {100 * summary['data_wait_frac']:.1f}% "
              f"({self.source_name}, {self.device}, {self.amp}){ttfs}{mon}; checkpoint {self.out / 'ckpt.pt'}")
        if stopped is not None:
            print(f"train: {stopped['metric']} top-1 {100 * stopped['value']:.2f}% >= --stop-at "
                  f"{100 * stopped['stop_at']:.2f}% at step {stopped['step']} (epoch {stopped['epoch']:.3g}) "
                  f"after {stopped['train_s']:.1f}s of training")
        elif cfg.monitor.stop_at and self.step == self.total_steps:
            print(f"train: the monitor's {cfg.monitor.stop_metric} top-1 never reached --stop-at "
                  f"{100 * cfg.monitor.stop_at:.2f}%")

    def _monitor(self, writer, metrics_f) -> dict | None:
        """Evaluate the monitor now (rank 0); its record, None on the other ranks. Its time is
        kept out of the training wall-clock."""
        if not self.is_main:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued training work counts as training
        t0 = time.perf_counter()
        train_s = self.train_seconds()
        acc = self.monitor.evaluate(self.model)  # reads back to the host: synchronized
        took = time.perf_counter() - t0
        self._monitor_s += took
        c = self.cfg.monitor
        rec = {"monitor": True, "step": self.step, "epoch": self.step / self.steps_per_epoch,
               "train_s": train_s, **acc, "monitor_s": took, "train_images": self.monitor.counts["train"],
               "test_images": list(self.monitor.counts.values())[1], "patches": c.patches,
               "feature": c.feature, "time": time.time()}
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if writer is not None:
            for k in ("knn_top1", "linear_top1", "monitor_s"):
                writer.add_scalar(f"monitor/{k}", rec[k], rec["step"])
        return rec

    def _stop_reached(self, rec: dict | None, metrics_f) -> dict | None:
        """The --stop-at record when rank 0's monitor reached it (every rank learns it), else None."""
        c = self.cfg.monitor
        if not c.stop_at:
            return None
        key = f"{c.stop_metric}_top1"
        hit = rec is not None and rec[key] >= c.stop_at
        if self.world > 1:
            flag = torch.tensor([int(hit)], device=self.device)
            dist.broadcast(flag, 0)
            hit = bool(flag.item())
        if not hit:
            return None
        stop = {"stop": True, "stop_at": c.stop_at, "metric": c.stop_metric, "reached": True,
                "value": rec[key] if rec else None, "step": self.step,
                "epoch": self.step / self.steps_per_epoch, "train_s": rec["train_s"] if rec else None}
        if self.is_main:
            metrics_f.write(json.dumps(stop) + "\n")
            metrics_f.flush()
        return stop

    def _record(self, pending, epoch: int, elapsed: float, steps: int, data_s: float) -> dict:
        step, loss, tcr, inv, lr = pending
        vals = torch.stack([loss, tcr, inv]).tolist()  # the one host sync, every log_every steps
        imgs = steps * self.cfg.data.batch_size
        patches_per_s = imgs * self.cfg.data.num_patches / elapsed
        return {"step": step + 1, "epoch": epoch, "loss": vals[0], "tcr": vals[1], "inv": vals[2],
                "lr": lr, "images_per_s": imgs / elapsed, "patches_per_s": patches_per_s,
                **self._flops_fields(patches_per_s), "data_frac": data_s / elapsed, "time": time.time()}


def main(argv=None) -> int:
    try:
        cfg, resume = parse_args(argv)
        trainer = Trainer(cfg, resume)
        code = trainer.fit()
    except (UserError, CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
