"""Checkpoints of the authors' code (github.com/tsb0601/EMP-SSL) as checkpoints of this project.

Their ``main.py`` saves ``nn.DataParallel(encoder).state_dict()`` after every epoch: a plain
state dict whose keys start with ``module.`` (absent when saved from the bare module):

    theirs (model/model.py: torchvision resnet18,          ours (model/encoder.py)
    conv1 swapped for 3x3/1, maxpool and fc Identity)
    module.backbone.conv1.*                                backbone.stem.0.*
    module.backbone.bn1.*                                  backbone.stem.1.*
    module.backbone.layer{k}.{j}.*   (k = 1..4)            backbone.stages.{k-1}.{j}.*
    module.pre_feature.{0,1}.*       Linear, BN1d (, ReLU) hidden.0.{0,1}.*
    module.projection.{i,i+1}.*      Linear, BN1d (, ReLU) hidden.{1+i/3}.{0,1}.*   (i = 0, 3, ...)
    module.projection.{last}.*       Linear                head.*

The BasicBlock keys below a stage (conv1, bn1, conv2, bn2, downsample.{0,1}) are torchvision's
in both. The forward passes are the same function: z = normalize(head(hidden(backbone(x)))),
and their ``is_test`` feature (``pre_feature``'s output) is our ``features(x, "pre_projector")``.

The encoder's config is read off the tensors: stem from conv1's kernel (3: cifar, 7: imagenet),
width from its output channels, arch from the number of blocks per stage, projector widths from
the Linear weights. :func:`to_encoder_state_dict` accepts either layout (ours passes through) and
refuses anything else in one line (:class:`CheckpointError`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .encoder import ARCH_BLOCKS, EncoderConfig, build_encoder

THEIR_PARTS = ("backbone.", "pre_feature.", "projection.")
OUR_PARTS = ("backbone.stem.", "backbone.stages.", "hidden.", "head.")
# the 32px normalization of their dataset/aug.py (transforms.Normalize, every dataset)
THEIR_MEAN = (0.5, 0.5, 0.5)
THEIR_STD = (0.5, 0.5, 0.5)

_LAYER = re.compile(r"^backbone\.layer(\d+)\.(.*)$")
_SEQ = re.compile(r"^(pre_feature|projection)\.(\d+)\.(.*)$")


def layout(state_dict: dict) -> str:
    """"ours" (EMPEncoder keys), "reference" (their encoder, with or without ``module.``), or a
    CheckpointError naming what the keys look like."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if keys and len(keys) == len(state_dict) and all(k.startswith(OUR_PARTS) for k in keys):
        return "ours"
    bare = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    if (keys and len(keys) == len(state_dict) and all(k.startswith(THEIR_PARTS) for k in bare)
            and any(k.startswith("pre_feature.") for k in bare)):
        return "reference"
    sample = ", ".join(map(str, list(state_dict)[:3])) or "no keys"
    raise CheckpointError(f"state dict is neither this project's encoder (backbone.stem., "
                          f"backbone.stages., hidden., head.) nor the reference code's "
                          f"(module.backbone., module.pre_feature., module.projection.); its "
                          f"keys start {sample}")


def _reference_key(key: str, projection_linears: list[int]) -> str:
    """One of their (bare) keys -> ours. ``projection_linears``: the indices of the Linear
    layers inside their ``projection`` Sequential, ascending (the last is the head)."""
    if key.startswith("backbone.conv1."):
        return "backbone.stem.0." + key[len("backbone.conv1."):]
    if key.startswith("backbone.bn1."):
        return "backbone.stem.1." + key[len("backbone.bn1."):]
    m = _LAYER.match(key)
    if m:
        return f"backbone.stages.{int(m[1]) - 1}.{m[2]}"
    m = _SEQ.match(key)
    if m:
        seq, idx, rest = m[1], int(m[2]), m[3]
        if seq == "pre_feature" and idx in (0, 1):
            return f"hidden.0.{idx}.{rest}"
        if seq == "projection":
            if idx == projection_linears[-1]:
                return f"head.{rest}"
            for block, lin in enumerate(projection_linears[:-1]):
                if idx in (lin, lin + 1):  # Linear, then its BatchNorm1d
                    return f"hidden.{block + 1}.{idx - lin}.{rest}"
    raise CheckpointError(f"reference state dict: key {key!r} has no counterpart in this "
                          f"project's encoder (not a resnet + pre_feature + projection encoder)")


def _projection_linears(bare: dict) -> list[int]:
    """Indices of the Linear layers in their ``projection`` Sequential: 2-D ``.weight``s."""
    idx = sorted({int(m[2]) for k, v in bare.items() if (m := _SEQ.match(k)) and m[1] == "projection"
                  and m[3] == "weight" and v.ndim == 2})
    if not idx:
        raise CheckpointError("reference state dict: no Linear layer in module.projection")
    return idx


def _config(sd: dict) -> EncoderConfig:
    """The EncoderConfig of an encoder state dict in our key layout, read off its shapes."""
    try:
        conv = sd["backbone.stem.0.weight"]  # (width, 3, k, k)
        stem = {3: "cifar", 7: "imagenet"}[conv.shape[-1]]
        blocks = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"backbone.stages.{s}.")})
                       for s in range(4))
        arch = next(a for a, b in ARCH_BLOCKS.items() if b == blocks)
        hidden = sorted({int(k.split(".")[1]) for k in sd if k.startswith("hidden.")})
        widths = [sd[f"hidden.{i}.0.weight"].shape[0] for i in hidden] + [sd["head.weight"].shape[0]]
        return EncoderConfig(arch=arch, stem=stem, width=int(conv.shape[0]),
                             projector=tuple(int(w) for w in widths))
    except (KeyError, StopIteration, ValueError) as e:
        raise CheckpointError(f"encoder state dict: cannot tell its architecture ({type(e).__name__}: "
                              f"{str(e)[:120]}); expected a BasicBlock ResNet-18/34 with a "
                              f"3x3 or 7x7 stem and a projector") from None


def to_encoder_state_dict(state_dict: dict) -> tuple[dict, EncoderConfig, str]:
    """(state dict in our key layout, its EncoderConfig, the input's layout name).

    Tensors are the input's (not copied). The result loads into ``build_encoder(config)`` with
    strict key checking; :func:`load_reference_encoder` does that."""
    kind = layout(state_dict)
    if kind == "ours":
        sd = dict(state_dict)
    else:
        bare = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        linears = _projection_linears(bare)
        sd = {_reference_key(k, linears): v for k, v in bare.items()}
    return sd, _config(sd), kind


def load_reference_encoder(state_dict: dict, source: str = "state dict"):
    """An EMPEncoder (eval mode) holding a state dict of either layout, loaded strictly."""
    sd, cfg, _ = to_encoder_state_dict(state_dict)
    enc = build_encoder(cfg)
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{source}: does not load into the {cfg.arch} encoder its shapes "
                              f"describe ({first[:200]})") from None
    return enc.eval()


def read_reference_state_dict(path: Path | str) -> dict:
    """Their ``save_models/<epoch>.pt`` (``torch.save(net.state_dict(), ...)``), read with
    ``weights_only=True``; a CheckpointError (one line) when it is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass the reference run's "
                              f"logs/.../save_models/<epoch>.pt")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable state dict ({first[:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return sd


def reference_payload(src: Path | str, *, data: dict, patch: dict, augment: dict,
                      seed: int | None, epoch: int, step: int, source: dict) -> dict:
    """Their checkpoint ``src`` as the payload of a checkpoint of this project (written by
    ``emp_ssl.checkpoints.convert_reference_checkpoint``).

    ``data``: the "data" section (name, classes, image_shape; mean/std are set to their fixed
    0.5/0.5 with ``normalize: "fixed"``, so probe.py feeds the model what it was trained on);
    ``patch``: {"patch_size", "out_size"} of their crops; ``augment``: their recipe as this
    project's AugmentParams fields (probe.py's augmented patches follow it); ``source``: where
    it came from (their commit, file, sha256), kept under "converted_from"."""
    sd = read_reference_state_dict(src)
    enc = load_reference_encoder(sd, str(src))  # strict: refuses a partial or foreign dict
    payload = {
        "model": enc.state_dict(), "encoder": enc.cfg.to_dict(), "patch": dict(patch),
        "data": {**data, "mean": list(THEIR_MEAN), "std": list(THEIR_STD), "normalize": "fixed"},
        "step": int(step), "epoch": int(epoch),
        "config": {"augment": dict(augment), "run": {"seed": seed}},
        "git_commit": str(source.get("commit", "unknown")),
        "converted_from": {"layout": "reference", **source},
    }
    return payload
