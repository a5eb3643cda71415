"""The trainer's typed configuration: dataclass sections, YAML presets, command-line overrides.

    preset (configs/*.yaml, ``inherit:`` chains)  ->  --section.key value overrides  ->  TrainConfig

Every key of every section can be set as ``--section.key value`` or ``--section.key=value``
(lists as ``1024,256`` or ``'[1024, 256]'``); the common ones also have a named flag
(``--epochs``, ``--num-patches``, ``--batch-size``, ...), the same names probe.py, tools/ and
benchmarks/ use. A saved ``RUN/config.yaml`` is itself a valid ``--config``.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.encoder import FEATURE_KINDS, EncoderConfig
from pipeline.errors import UserError
from pipeline.patches import AugmentParams
from pipeline.sources import SOURCES

from .cli import parse_list, print_config, rename_flags, split_equals
from .monitor import MonitorConfig


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
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the step: forward + loss as one graph, the LARS update
    cuda_graphs: bool = False  # capture the whole step as a CUDA graph, replayed every step
    peak_tflops: float = 0.0  # peak TFLOP/s per GPU for the MFU; 0 = from the GPU's name
    patch_chunk: int = 0  # K > 0: backprop K patch groups at a time (see EmpStep.chunked)
    log_every: int = 20  # steps between metric reads (the only host sync in the loop)
    max_steps: int = 0  # stop (with a checkpoint) after this many steps in this invocation
    save_every: str = "10m"  # checkpoint every N steps ("500") or minutes/seconds ("10m", "90s"); 0 = epoch ends only
    tensorboard: bool = True


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
               ("run", "save_every"), ("data", "num_workers"),
               *(("monitor", f.name) for f in dataclasses.fields(MonitorConfig))}
# Keys train.py adds to a saved RUN/config.yaml beside the sections (not config keys).
RUN_RECORD_KEYS = ("git_commit", "source_resolved", "device", "world_size", "preset")

# named flag -> (config key, help). The same names as probe.py, tools/ and benchmarks/.
NAMED_FLAGS = {
    "--data": ("data.path", "converted dataset dir, e.g. data/cifar10"),
    "--out": ("run.out", "run directory: ckpt.pt, config.yaml, metrics.jsonl, tb/"),
    "--epochs": ("optim.epochs", "training epochs; fractions allowed"),
    "--num-patches": ("data.num_patches", "n patches per image (paper: 20 or 200)"),
    "--batch-size": ("data.batch_size", "images per step, over all ranks (paper: 100)"),
    "--source": ("data.source", f"data source: auto, {', '.join(SOURCES)}; auto = memory when the "
                 "split fits on the device, else the JPEG shards on a GPU (DALI when installed, "
                 "else torchvision's nvJPEG), else FFCV"),
    "--patch-chunk": ("run.patch_chunk", "K: backprop K patch groups at a time so n=200 fits in "
                      "less memory; same gradient apart from BatchNorm batch statistics"),
    "--device": ("run.device", "auto | cpu | cuda | cuda:K"),
    "--seed": ("run.seed", "seeds the model, the batch order and every patch"),
    "--save-every": ("run.save_every", "checkpoint every N steps (500) or minutes (10m, 90s); "
                     "0 = only at epoch ends (plus the end and SIGINT/SIGTERM)"),
    "--stop-at": ("monitor.stop_at", "end the run with a checkpoint once the monitor's accuracy "
                  "(a fraction, e.g. 0.90) is reached (needs --monitor.every)"),
    "--stop-metric": ("monitor.stop_metric", "the monitor accuracy --stop-at reads: linear or knn"),
}
RENAMED_FLAGS: dict[str, str] = {}  # old spelling -> new; none yet for train.py


def parse_save_every(value: str) -> tuple[int, float]:
    """``--run.save_every``: (steps, seconds), one of them 0. "500" -> (500, 0); "10m" -> (0, 600);
    "90s" -> (0, 90); "0" -> (0, 0): only at epoch ends."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    if not m or (not m.group(2) and "." in m.group(1)):
        raise UserError(f"--run.save_every {value!r}: give steps (500), minutes (10m), seconds (90s) "
                        f"or hours (1h); 0 = only at epoch ends")
    number, unit = float(m.group(1)), m.group(2)
    if not unit:
        return int(number), 0.0
    return 0, number * {"s": 1, "m": 60, "h": 3600}[unit]


def preset_name(path: Path | str) -> str:
    """The recipe a --config names: a preset's file stem ("cifar10_n20_e1"), or, for a run's
    saved config.yaml, the preset that run was started from (its "preset" record)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("preset"), str):
        return raw["preset"]
    return path.stem


def load_preset(path: Path, seen=()) -> dict:
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
    for key in RUN_RECORD_KEYS:  # a saved RUN/config.yaml: its record keys are not config
        raw.pop(key, None)
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    return _merge(load_preset(path.parent / parent, (*seen, path)), raw)


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
            items = parse_list(value, f"--{key}")
            kind = type(default[0]) if default else None
            return type(default)(kind(x) for x in items) if kind else type(default)(items)
    except (ValueError, TypeError):
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
    for key, val in (("num-patches", d.num_patches), ("batch-size", d.batch_size),
                     ("data.patch_size", d.patch_size), ("data.out_size", d.out_size)):
        if val < 1:
            raise UserError(f"--{key} {val}: must be >= 1")
    if d.batch_size < 2:
        raise UserError(f"--batch-size {d.batch_size}: the coding rate needs >= 2 images per step")
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
    parse_save_every(cfg.run.save_every)
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


def parse_args(argv: list[str] | None, description: str = "") -> tuple[TrainConfig, argparse.Namespace]:
    """(the resolved config, the remaining flags: resume, print_config). Exits after printing
    the config with --print-config."""
    import sys

    argv = split_equals(rename_flags(sys.argv[1:] if argv is None else list(argv), RENAMED_FLAGS, "train"))
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as --section.key value (or --section.key=value; "
               "lists as 1024,256 or '[1024, 256]'), e.g. --optim.lr 0.2 --model.width 32 "
               "--augment.blur_p 0. Keys: emp_ssl/config.py (model: EncoderConfig in "
               "model/encoder.py, augment: AugmentParams in pipeline/patches.py), or --print-config.")
    p.add_argument("--config", default="configs/cifar10_n20_e1.yaml",
                   help="YAML preset (configs/) or a run's saved config.yaml; default: the paper's "
                        "CIFAR-10 1-epoch n=20 recipe")
    for flag, (key, text) in NAMED_FLAGS.items():
        p.add_argument(flag, dest=key.replace(".", "__"), help=f"{text} ({key})")
    p.add_argument("--compile", action="store_true", help="torch.compile the step: forward + loss as "
                   "one graph and the LARS update (run.compile); --run.cuda_graphs true captures "
                   "the whole step as a CUDA graph")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = p.parse_known_args(argv)
    raw = load_preset(Path(args.config))
    overrides = {key: getattr(args, key.replace(".", "__")) for key, _ in NAMED_FLAGS.values()}
    if args.compile:
        overrides["run.compile"] = True
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or "." not in flag:
            raise UserError(f"{flag}: unknown flag; overrides look like --section.key value (see --help)")
        if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and not _is_number(rest[i + 1])):
            raise UserError(f"{flag}: needs a value, as --section.key value or --section.key=value")
        overrides[flag[2:].replace("-", "_")] = rest[i + 1]
        i += 2
    for key, value in overrides.items():
        if value is not None:
            section, name = key.split(".", 1)
            raw.setdefault(section, {})[name] = value
    cfg = build_config(raw)
    if args.print_config:
        print_config(as_plain(cfg))
        raise SystemExit(0)
    return cfg, args


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def as_plain(cfg: TrainConfig) -> dict:
    """The config as plain YAML/JSON data (tuples become lists)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg)))
