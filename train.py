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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.encoder import EncoderConfig, build_encoder
from model.lars import LARS, lars_param_groups
from model.step import EmpStep, configure_cuda
from pipeline.errors import UserError
from pipeline.formats import load_manifest, require_split, write_bytes_atomic
from pipeline.patches import AugmentParams, make_patches
from pipeline.sources import SOURCES, build_source
from pipeline.sources.base import SourceOptions

ROOT = Path(__file__).resolve().parent


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
    compile: bool = False  # torch.compile the encoder
    patch_chunk: int = 0  # K > 0: backprop K patch groups at a time (see Trainer._chunked)
    log_every: int = 20  # steps between metric reads (the only host sync in the loop)
    max_steps: int = 0  # stop (with a checkpoint) after this many steps in this invocation
    tensorboard: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)  # arch, stem, width, projector
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentParams = field(default_factory=AugmentParams)  # per-patch probabilities, strengths
    run: RunConfig = field(default_factory=RunConfig)


# Settings that may change between an interrupted run and its --resume: they do not change the math.
RESUME_FREE = {("run", "out"), ("run", "max_steps"), ("run", "log_every"), ("run", "tensorboard"),
               ("run", "compile"), ("data", "num_workers")}


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
    if cfg.model.stem == "cifar" and d.out_size > 32:
        raise UserError(f"--model.stem cifar with {d.out_size}px patches: the cifar stem is for 32px "
                        f"inputs; use --model.stem imagenet (or a tinyimagenet/imagenet100 preset)")


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
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (run.compile)")
    p.add_argument("--patch-chunk", type=int, help="K: backprop K patch groups at a time so n=200 fits "
                   "in less memory; same gradient apart from BatchNorm batch statistics (run.patch_chunk)")
    p.add_argument("--device", help="auto | cpu | cuda (run.device)")
    p.add_argument("--seed", type=int, help="run.seed")
    args, rest = p.parse_known_args(argv)
    raw = _load_preset(Path(args.config))
    overrides = {"data.path": args.data, "run.out": args.out, "optim.epochs": args.epochs,
                 "data.num_patches": args.num_patches, "data.source": args.source,
                 "run.compile": True if args.compile else None, "run.patch_chunk": args.patch_chunk,
                 "run.device": args.device, "run.seed": args.seed}
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


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg = cfg
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

        torch.manual_seed(cfg.run.seed)
        self.model = build_encoder(cfg.model).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = LARS(lars_param_groups(self.model), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                        weight_decay=cfg.optim.weight_decay, eta=cfg.optim.eta)
        self.step = 0
        if resume:
            self._restore(ckpt_path)
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_fn = EmpStep(torch.compile(net) if cfg.run.compile else net, self.model, self.opt,
                               lam=cfg.loss.lam, eps=cfg.loss.eps, amp=self.amp,
                               patch_chunk=cfg.run.patch_chunk, ddp=net if self.world > 1 else None)
        self._stop_signal = None

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
        torch.set_rng_state(ckpt["rng"]["torch"])

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
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop(writer)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if writer is not None:
                writer.close()
            self.source.close()

    def _loop(self, writer) -> int:
        from tqdm import tqdm

        cfg, d = self.cfg, self.cfg.data
        n = d.num_patches
        start = self.step
        end = self.total_steps if not cfg.run.max_steps else min(self.total_steps, start + cfg.run.max_steps)
        bar = tqdm(total=self.total_steps, initial=start, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, mininterval=1.0, desc="train")
        metrics_f = open(self.out / "metrics.jsonl", "a") if self.is_main else None
        self.model.train()
        it, t_start = None, time.perf_counter()
        win_t, win_steps, win_data = time.perf_counter(), 0, 0.0
        pending = None  # (step, loss, tcr, inv, lr) tensors not yet read back
        total_data = 0.0
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
                            for k in ("loss", "tcr", "inv", "lr", "images_per_s", "patches_per_s"):
                                writer.add_scalar(f"train/{k}", rec[k], rec["step"])
                    bar.set_postfix(loss=f"{rec['loss']:.2f}", lr=f"{rec['lr']:.3g}",
                                    img_s=f"{rec['images_per_s']:.0f}", p_s=f"{rec['patches_per_s']:.0f}",
                                    data=f"{100 * rec['data_frac']:.0f}%")
                if self.step % self.steps_per_epoch == 0 and not last:
                    self.save()
                if self._stop_signal is not None:
                    path = self.save()
                    if self.is_main:
                        print(f"\ntrain: stopped by signal {self._stop_signal} at step {self.step}; "
                              f"checkpoint {path}; continue with --resume", file=sys.stderr)
                    return 128 + self._stop_signal
            self.save()
        finally:
            bar.close()
            if metrics_f:
                metrics_f.close()
        wall = time.perf_counter() - t_start
        steps = end - start
        if self.is_main and steps:
            imgs = steps * d.batch_size
            summary = {"summary": True, "steps": steps, "wall_s": round(wall, 2),
                       "images_per_s": imgs / wall, "patches_per_s": imgs * n / wall,
                       "data_wait_frac": total_data / wall, "source": self.source_name,
                       "device": str(self.device), "amp": self.amp, "compile": cfg.run.compile}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
            print(f"train: {steps} steps in {wall:.1f}s: {summary['images_per_s']:.0f} images/s, "
                  f"{summary['patches_per_s']:.0f} patches/s, data wait {100 * summary['data_wait_frac']:.1f}% "
                  f"({self.source_name}, {self.device}, {self.amp}); checkpoint {self.out / 'ckpt.pt'}")
        return 0

    def _record(self, pending, epoch: int, elapsed: float, steps: int, data_s: float) -> dict:
        step, loss, tcr, inv, lr = pending
        vals = torch.stack([loss, tcr, inv]).tolist()  # the one host sync, every log_every steps
        imgs = steps * self.cfg.data.batch_size
        return {"step": step + 1, "epoch": epoch, "loss": vals[0], "tcr": vals[1], "inv": vals[2],
                "lr": lr, "images_per_s": imgs / elapsed, "patches_per_s": imgs * self.cfg.data.num_patches / elapsed,
                "data_frac": data_s / elapsed, "time": time.time()}


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
