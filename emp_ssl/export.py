"""The trained encoder out of the trainer: export a ``ckpt.pt``, load it back in one line.

    python tools/export.py --checkpoint runs/demo/ckpt.pt --out runs/demo/export

writes (each file atomically):

    backbone.safetensors        the ResNet backbone, torchvision key names (conv1, bn1, layer1..4)
    backbone_torchvision.pt     the same tensors as a plain state dict (torch.save); no fc keys
    projector_block.safetensors the projector's first Linear+BN block (``0.*`` Linear, ``1.*``
                                BatchNorm1d; followed by a ReLU): the probe's "pre_projector"
                                feature. Omitted with ``projector=False`` / ``--no-projector``.
    export.json                 stem, width, feature dims, the training data's name/mean/std/
                                image size, patch/output size, the augmentation and training
                                recipe, git commits, the source checkpoint's sha256

Loading into torchvision (what :func:`torchvision_resnet18` does)::

    m = torchvision.models.resnet18()            # resnet34 for arch "resnet34"
    if stem == "cifar":                          # 3x3/1 conv1, no max-pool (the reference code's)
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    m.load_state_dict(torch.load("backbone_torchvision.pt"))   # strict

torchvision's ResNet has a fixed base width of 64. An encoder of another width (the demo's 16)
cannot load into ``resnet18()`` as it is; :func:`torchvision_resnet18` then builds torchvision's
own ``ResNet`` class and rebuilds its stem and stages with torchvision's ``_make_layer`` at that
width (same modules, same key names, only the channel counts differ), and export.json says so
(``torchvision.loads_into_resnet18``: false).

:func:`load_backbone` reads an export directory, its export.json, or a ``ckpt.pt`` and returns
an eval-mode module with ``features(x, kind)`` ("backbone", and "pre_projector" where the
projector block is there), ``forward(x)`` = the backbone feature, and the metadata
:func:`emp_ssl.embed` takes its defaults from (``emp_ssl_meta``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from model.checkpoint import CheckpointError, load_checkpoint, load_encoder
from model.encoder import ARCH_BLOCKS, EncoderConfig, ResNetBackbone
from pipeline.errors import UserError
from pipeline.formats import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic

from .embedding import META_ATTR

EXPORT_FORMAT = "emp-ssl-export/1"
BACKBONE_FILE = "backbone.safetensors"
TORCHVISION_FILE = "backbone_torchvision.pt"
PROJECTOR_FILE = "projector_block.safetensors"
META_FILE = "export.json"
TORCHVISION_WIDTH = 64  # torchvision's ResNet base width (inplanes = 64, fixed)

_STAGE = re.compile(r"^backbone\.stages\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^layer(\d+)\.(.*)$")


class ExportError(UserError, ValueError):
    """A bad export input or directory; the message is one line naming the file."""


# --------------------------------------------------------------------------- key layouts

# (ours, torchvision) name pairs; stage k is torchvision's layer{k+1}. The BasicBlock names below
# them (conv1, bn1, conv2, bn2, downsample.0/1) are the same in both.
_PREFIXES = (("backbone.stem.0.", "conv1."), ("backbone.stem.1.", "bn1."))


def _rename(key: str, to_tv: bool) -> str | None:
    for ours, tv in _PREFIXES:
        src, dst = (ours, tv) if to_tv else (tv, ours)
        if key.startswith(src):
            return dst + key[len(src):]
    m = (_STAGE if to_tv else _LAYER).match(key)
    if m is None:
        return None
    return f"layer{int(m[1]) + 1}.{m[2]}" if to_tv else f"backbone.stages.{int(m[1]) - 1}.{m[2]}"


def to_torchvision_keys(state_dict: dict) -> dict:
    """Our EMPEncoder's backbone tensors under torchvision's ResNet names:
    backbone.stem.0 -> conv1, backbone.stem.1 -> bn1, backbone.stages.{k} -> layer{k+1}.
    Projector keys are dropped."""
    return {new: v for k, v in state_dict.items() if (new := _rename(k, to_tv=True)) is not None}


def from_torchvision_keys(state_dict: dict) -> dict:
    """Inverse of :func:`to_torchvision_keys`: keys of our ``ResNetBackbone`` (no ``backbone.``
    prefix). A key with no counterpart raises ExportError."""
    out = {}
    for k, v in state_dict.items():
        new = _rename(k, to_tv=False)
        if new is None:
            raise ExportError(f"backbone key {k!r} is not a torchvision ResNet backbone key "
                              f"(conv1, bn1, layer1-4; fc must be absent)")
        out[new[len("backbone."):]] = v
    return out


def torchvision_resnet(arch: str = "resnet18", stem: str = "cifar", width: int = 64) -> nn.Module:
    """torchvision's ResNet with this project's stem changes and ``fc = Identity``, random
    weights. Width 64: exactly ``torchvision.models.resnet18()`` (or resnet34) with conv1 /
    maxpool swapped for the cifar stem. Another width: the same class, its stem and stages
    rebuilt by torchvision's ``_make_layer`` at that base width."""
    from torchvision.models.resnet import BasicBlock, ResNet

    if arch not in ARCH_BLOCKS:
        raise ExportError(f"arch {arch!r}: choose one of {sorted(ARCH_BLOCKS)}")
    m = ResNet(BasicBlock, list(ARCH_BLOCKS[arch]))
    if width != TORCHVISION_WIDTH:
        m.inplanes = width
        m.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        m.bn1 = nn.BatchNorm2d(width)
        blocks = ARCH_BLOCKS[arch]
        m.layer1 = m._make_layer(BasicBlock, width, blocks[0])
        m.layer2 = m._make_layer(BasicBlock, 2 * width, blocks[1], stride=2)
        m.layer3 = m._make_layer(BasicBlock, 4 * width, blocks[2], stride=2)
        m.layer4 = m._make_layer(BasicBlock, 8 * width, blocks[3], stride=2)
    if stem == "cifar":
        m.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m


def torchvision_resnet18(export_dir: Path | str, device="cpu") -> nn.Module:
    """The torchvision model of an export directory (eval mode), its backbone_torchvision.pt
    loaded strictly. forward(x) -> (N, 8 * width) backbone features."""
    meta, d = read_export(export_dir)
    m = torchvision_resnet(meta["arch"], meta["stem"], int(meta["width"]))
    path = d / TORCHVISION_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing from the export; run tools/export.py again")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: does not load into the torchvision model export.json "
                          f"describes ({str(e).strip().splitlines()[0][:200]})") from None
    return m.to(device).eval()


# --------------------------------------------------------------------------- the module

class ExportedBackbone(nn.Module):
    """An exported encoder: our ResNet backbone (+ the projector's first block, when kept).
    ``forward(x)`` = ``features(x, "backbone")``: (N, 3, S, S) -> (N, 8 * width)."""

    def __init__(self, cfg: EncoderConfig, pre_projector_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.arch, cfg.stem, cfg.width)
        self.pre_projector = (nn.Sequential(nn.Linear(self.backbone.out_dim, pre_projector_dim),
                                            nn.BatchNorm1d(pre_projector_dim), nn.ReLU(inplace=True))
                              if pre_projector_dim else None)

    @property
    def feature_kinds(self) -> list[str]:
        return ["backbone"] + (["pre_projector"] if self.pre_projector is not None else [])

    def feature_dim(self, kind: str = "backbone") -> int:
        self._check_kind(kind)
        return self.backbone.out_dim if kind == "backbone" else self.pre_projector[0].out_features

    def _check_kind(self, kind: str) -> None:
        if kind not in self.feature_kinds:
            raise ValueError(f"feature kind {kind!r}: this encoder gives {self.feature_kinds}"
                             + (" (exported without the projector block)"
                                if kind == "pre_projector" else ""))

    def features(self, x: Tensor, kind: str = "backbone") -> Tensor:
        self._check_kind(kind)
        h = self.backbone(x)  # (N, 8w)
        return h if kind == "backbone" else self.pre_projector(h)  # (N, projector[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def _augment_dict(ckpt: dict) -> dict:
    """The training recipe's augmentations as AugmentParams fields (the probe's choice:
    the checkpoint's config, else the paper's defaults), JSON-ready."""
    from dataclasses import asdict

    from .protocol import training_augment

    aug, source = training_augment(ckpt)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(aug).items()}
    return {**d, "from": source}


def _meta_for_embed(meta: dict, kinds: list[str]) -> dict:
    aug = {k: v for k, v in (meta.get("augment") or {}).items() if k != "from"}
    return {"patch_size": int(meta["patch"]["patch_size"]), "out_size": int(meta["patch"]["out_size"]),
            "mean": list(meta["dataset"]["mean"]), "std": list(meta["dataset"]["std"]),
            "augment": aug or None, "features": kinds}


def _checkpoint_meta(ckpt: dict, path: Path, sha: str) -> dict:
    """export.json's content (less the file list) from a checkpoint of this project."""
    from .runtime import git_commit

    for key in ("encoder", "model", "patch", "data"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' section (has "
                                  f"{', '.join(sorted(ckpt))}); was it written by train.py?")
    cfg = EncoderConfig.from_dict(ckpt["encoder"])
    data = ckpt["data"]
    config = ckpt.get("config") or {}
    dcfg, ocfg, rcfg = (config.get(s) or {} for s in ("data", "optim", "run"))
    return {
        "format": EXPORT_FORMAT,
        "arch": cfg.arch, "stem": cfg.stem, "width": cfg.width, "projector": list(cfg.projector),
        "feature_dims": {"backbone": 8 * cfg.width, "pre_projector": cfg.projector[0]
                         if len(cfg.projector) > 1 else None},
        "dataset": {"name": data.get("name"), "mean": list(data["mean"]), "std": list(data["std"]),
                    "image_shape": data.get("image_shape"), "classes": data.get("classes"),
                    "normalize": data.get("normalize", "dataset")},
        "patch": {"patch_size": int(ckpt["patch"]["patch_size"]),
                  "out_size": int(ckpt["patch"]["out_size"])},
        "augment": _augment_dict(ckpt),
        "training": {"preset": ckpt.get("preset"), "epochs": ocfg.get("epochs"),
                     "num_patches": dcfg.get("num_patches"), "batch_size": dcfg.get("batch_size"),
                     "seed": rcfg.get("seed"), "epoch": ckpt.get("epoch"), "step": ckpt.get("step")},
        "git_commit": {"checkpoint": ckpt.get("git_commit", "unknown"), "export": git_commit()},
        "source": {"checkpoint": path.name, "sha256": sha,
                   **({"converted_from": ckpt["converted_from"]} if "converted_from" in ckpt else {})},
    }


def _save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    # bytes, then the project's atomic write: save_file would leave a 0600 file behind
    write_bytes_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                  metadata=metadata))


def export_checkpoint(ckpt_path: Path | str, out_dir: Path | str, *, projector: bool = True) -> Path:
    """Write the export of ``ckpt_path`` into ``out_dir`` (created); returns its export.json."""
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    ckpt = load_checkpoint(ckpt_path)
    meta = _checkpoint_meta(ckpt, ckpt_path, sha256_file(ckpt_path))
    enc = load_encoder(ckpt, ckpt_path)  # strict: the tensors match the saved config
    sd = enc.state_dict()
    tv = to_torchvision_keys(sd)
    out.mkdir(parents=True, exist_ok=True)
    files = {"backbone": BACKBONE_FILE, "torchvision_state_dict": TORCHVISION_FILE}
    _save_safetensors(tv, out / BACKBONE_FILE, {"format": EXPORT_FORMAT, "layout": "torchvision"})
    with atomic_path(out / TORCHVISION_FILE) as tmp:
        with open(tmp, "wb") as f:
            torch.save({k: v.detach().cpu().clone() for k, v in tv.items()}, f)
    stale = out / PROJECTOR_FILE
    if projector and len(enc.hidden):
        block = {k[len("hidden.0."):]: v for k, v in sd.items() if k.startswith("hidden.0.")}
        _save_safetensors(block, out / PROJECTOR_FILE, {"format": EXPORT_FORMAT,
                                                        "layout": "Linear(0), BatchNorm1d(1), ReLU"})
        files["projector_block"] = PROJECTOR_FILE
    elif stale.exists():  # a previous export's block would be read as this one's
        stale.unlink()
    if not (projector and len(enc.hidden)):
        meta["feature_dims"]["pre_projector"] = None
    meta["files"] = files
    meta["torchvision"] = {
        "builder": f"torchvision.models.{meta['arch']}",
        "changes": (["conv1 = Conv2d(3, width, 3, stride=1, padding=1, bias=False)",
                     "maxpool = Identity"] if meta["stem"] == "cifar" else []) + ["fc = Identity"],
        "loads_into_resnet18": meta["width"] == TORCHVISION_WIDTH,
        "note": ("loads into torchvision.models.%s() after the changes above" % meta["arch"]
                 if meta["width"] == TORCHVISION_WIDTH else
                 f"width {meta['width']}: torchvision's {meta['arch']}() has base width 64; build "
                 f"torchvision.models.resnet.ResNet and rebuild conv1/bn1/layer1-4 at this width "
                 f"with its _make_layer (emp_ssl.export.torchvision_resnet18 does)"),
    }
    write_json_atomic(out / META_FILE, meta)
    return out / META_FILE


# --------------------------------------------------------------------------- loading

def read_export(path: Path | str) -> tuple[dict, Path]:
    """(export.json's content, the export directory) of an export directory or its export.json."""
    path = Path(path)
    d = path.parent if path.name == META_FILE else path
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{path}: not an export (no {META_FILE}); pass the --out directory of "
                          f"tools/export.py or a ckpt.pt")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{meta_path}: not an export of this project (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta, d


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing from the export; run tools/export.py again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from None


def _from_export(path: Path) -> ExportedBackbone:
    meta, d = read_export(path)
    files = meta.get("files") or {}
    try:
        cfg = EncoderConfig(arch=meta["arch"], stem=meta["stem"], width=int(meta["width"]),
                            projector=tuple(meta["projector"]))
        has_block = "projector_block" in files
        model = ExportedBackbone(cfg, meta["feature_dims"]["pre_projector"] if has_block else None)
        model.backbone.load_state_dict(from_torchvision_keys(_load_safetensors(d / BACKBONE_FILE)))
        if has_block:
            model.pre_projector.load_state_dict(_load_safetensors(d / files["projector_block"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ExportError):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{d}: export files do not match export.json ({first})") from None
    setattr(model, META_ATTR, _meta_for_embed(meta, model.feature_kinds))
    return model


def _from_checkpoint(path: Path) -> ExportedBackbone:
    ckpt = load_checkpoint(path)
    meta = _checkpoint_meta(ckpt, path, "")
    enc = load_encoder(ckpt, path)
    has_block = len(enc.hidden) > 0
    model = ExportedBackbone(enc.cfg, enc.cfg.projector[0] if has_block else None)
    model.backbone.load_state_dict(enc.backbone.state_dict())
    if has_block:
        model.pre_projector.load_state_dict(enc.hidden[0].state_dict())
    setattr(model, META_ATTR, _meta_for_embed(meta, model.feature_kinds))
    return model


def load_backbone(path: Path | str, device="cpu") -> nn.Module:
    """The encoder of an export directory (or its export.json) or of a ``ckpt.pt``, in eval
    mode on ``device``: ``features(x, kind)`` for "backbone" and (when the projector block is
    there) "pre_projector"; ``forward(x)`` = the backbone feature; ``emp_ssl_meta`` holds the
    patch geometry, normalization and augmentation recipe that :func:`emp_ssl.embed` uses."""
    path = Path(path)
    if path.is_dir() or path.name == META_FILE:
        model = _from_export(path)
    elif path.is_file():
        model = _from_checkpoint(path)
    else:
        raise ExportError(f"{path}: no such file or directory; pass an export directory "
                          f"(tools/export.py --out) or a ckpt.pt")
    return model.to(device).eval()
