"""model/reference_ckpt.py: checkpoints of the authors' code (github.com/tsb0601/EMP-SSL) as ours.

CI has no copy of their code, so their layout is built here: (1) a module with the structure of
their model/model.py (torchvision's resnet18 with a 3x3/1 conv1, no max-pool, fc = Identity;
``pre_feature`` = Linear, BN, ReLU; ``projection`` = Linear, BN, ReLU, Linear), wrapped in
nn.DataParallel as their main.py saves it; (2) our own encoder's state dict renamed to their keys
by a mapping written here from that structure. Converted, each loads strictly into our encoder
and gives the same outputs."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import probe
from model.checkpoint import CheckpointError, load_checkpoint
from model.encoder import EncoderConfig, build_encoder
from emp_ssl.checkpoints import convert_reference_checkpoint
from model.reference_ckpt import (THEIR_MEAN, THEIR_STD, layout, load_reference_encoder,
                                  to_encoder_state_dict)
from pipeline.formats import Manifest, SplitInfo


class TheirStructure(nn.Module):
    """The structure of the reference encoder (model/model.py, arch "resnet18-cifar"), with a
    narrower projector so the test stays fast: backbone -> pre_feature -> projection -> L2."""

    def __init__(self, hidden: int = 64, z_dim: int = 16):
        super().__init__()
        self.backbone = resnet18()
        self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.backbone.maxpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.pre_feature = nn.Sequential(nn.Linear(512, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                        nn.Linear(hidden, z_dim))

    def forward(self, x):
        feature = self.pre_feature(self.backbone(x))
        return F.normalize(self.projection(feature), p=2), feature


def _randomize_norm_stats(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm running statistics and affine parameters, so eval-mode outputs
    depend on every buffer being mapped to the right layer."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
            m.num_batches_tracked.fill_(7)


def _their_keys_from_ours(sd: dict) -> dict:
    """Our encoder's keys renamed to the reference layout (as nn.DataParallel saves it), by the
    structure of their model.py: stem conv/bn are torchvision's conv1/bn1, stages are layer1-4,
    the first projector block is pre_feature, the rest is one Sequential 'projection' of
    (Linear, BN, ReLU) triples and a final Linear."""
    hidden = sorted({int(k.split(".")[1]) for k in sd if k.startswith("hidden.")})
    last = 3 * (len(hidden) - 1)  # index of the final Linear in 'projection'
    stem = {"0": "conv1", "1": "bn1"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("backbone.stem."):
            name = f"backbone.{stem[p[2]]}." + ".".join(p[3:])
        elif k.startswith("backbone.stages."):
            name = f"backbone.layer{int(p[2]) + 1}." + ".".join(p[3:])
        elif k.startswith("hidden.0."):
            name = "pre_feature." + ".".join(p[2:])
        elif k.startswith("hidden."):
            name = f"projection.{3 * (int(p[1]) - 1) + int(p[2])}." + ".".join(p[3:])
        else:  # head.*
            name = f"projection.{last}." + ".".join(p[1:])
        out["module." + name] = v
    return out


def test_their_structure_converts_to_the_same_function():
    torch.manual_seed(0)
    theirs = TheirStructure(hidden=64, z_dim=16)
    _randomize_norm_stats(theirs, seed=1)
    theirs.eval()
    saved = nn.DataParallel(theirs).state_dict()  # what their main.py torch.save()s
    assert all(k.startswith("module.") for k in saved) and layout(saved) == "reference"

    sd, cfg, kind = to_encoder_state_dict(saved)
    assert kind == "reference"
    assert cfg == EncoderConfig(arch="resnet18", stem="cifar", width=64, projector=(64, 64, 16))
    ours = load_reference_encoder(saved)  # strict key check inside
    assert set(ours.state_dict()) == set(sd) and len(sd) == len(saved)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_ref, feature_ref = theirs(x)
        h, z = ours(x)
        feature = ours.features(x, "pre_projector")
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(feature, feature_ref, rtol=0, atol=1e-6)
    assert h.shape == (4, 512)


@pytest.mark.parametrize("stem,arch", [("imagenet", "resnet18"), ("cifar", "resnet34")])
def test_our_encoder_in_their_keys_round_trips(stem, arch):
    cfg = EncoderConfig(arch=arch, stem=stem, width=8, projector=(32, 24, 20, 16))
    torch.manual_seed(3)
    mine = build_encoder(cfg)
    _randomize_norm_stats(mine, seed=4)
    mine.eval()
    theirs = _their_keys_from_ours(mine.state_dict())
    assert "module.backbone.conv1.weight" in theirs and "module.projection.6.weight" in theirs

    sd, got_cfg, kind = to_encoder_state_dict(theirs)
    assert kind == "reference" and got_cfg == cfg
    assert sd.keys() == mine.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in mine.state_dict().items())
    back = load_reference_encoder(theirs)
    side = 64 if stem == "imagenet" else 32
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(x)[1], mine(x)[1])
    # without the DataParallel prefix (saved from the bare module) it converts the same way
    bare = {k[len("module."):]: v for k, v in theirs.items()}
    assert to_encoder_state_dict(bare)[1] == cfg
    # our own layout passes through unchanged
    assert to_encoder_state_dict(mine.state_dict())[2] == "ours"


def _manifest() -> Manifest:
    return Manifest(name="cifar10", source="synthetic", classes=[f"c{i}" for i in range(10)],
                    splits={"train": SplitInfo(count=10, shape=[32, 32, 3], class_counts=[1] * 10)},
                    mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], formats=["memory"])


def test_converted_file_is_a_checkpoint_probe_loads(tmp_path):
    torch.manual_seed(6)
    theirs = TheirStructure(hidden=32, z_dim=8)
    src = tmp_path / "save_models" / "0.pt"
    src.parent.mkdir()
    torch.save(nn.DataParallel(theirs).state_dict(), src)
    augment = {"flip_p": 0.5, "jitter_p": 0.8, "blur_p": 0.1, "jitter_order": "random"}
    m = _manifest()
    dst = convert_reference_checkpoint(
        src, tmp_path / "ckpt.pt", data={"name": m.name, "classes": m.classes, "image_shape": [32, 32, 3]},
        patch={"patch_size": 16, "out_size": 32}, augment=augment, seed=3, epoch=1, step=500,
        source={"commit": "abc123", "file": str(src)})
    ckpt = load_checkpoint(dst)
    assert ckpt["converted_from"]["commit"] == "abc123" and ckpt["git_commit"] == "abc123"
    assert ckpt["data"]["normalize"] == "fixed" and ckpt["data"]["mean"] == list(THEIR_MEAN)

    loaded = probe.load_model(dst, random_init=False, seed=0, device=torch.device("cpu"))
    assert loaded.patch_size == 16 and loaded.out_size == 32 and loaded.meta["train_seed"] == 3
    assert loaded.augment.blur_p == 0.1 and loaded.meta["epoch"] == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z_ref, f_ref = theirs.eval()(x)
        torch.testing.assert_close(loaded.encoder(x)[1], z_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encoder.features(x, "pre_projector"), f_ref, rtol=0, atol=1e-6)
    # the probe feeds this model patches normalized as it was trained (0.5 / 0.5), not with the
    # dataset's statistics; a checkpoint of ours keeps the manifest's
    assert probe.input_normalization(loaded.data, m) == (list(THEIR_MEAN), list(THEIR_STD),
                                                        "checkpoint (fixed)")
    assert probe.input_normalization({"mean": [0.1] * 3, "std": [0.2] * 3}, m)[:2] == (m.mean, m.std)
    with pytest.raises(CheckpointError, match="fixed"):
        probe.input_normalization({"normalize": "fixed", "mean": [0.5], "std": [0.5]}, m)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refuses_what_is_neither_layout(tmp_path):
    with pytest.raises(CheckpointError) as e:
        layout({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
    assert "neither" in _one_line(e) and "conv1.weight" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        to_encoder_state_dict({})
    assert "neither" in _one_line(e)

    theirs = nn.DataParallel(TheirStructure(hidden=32, z_dim=8)).state_dict()
    partial = {k: v for k, v in theirs.items() if "layer4.1.bn2" not in k}
    with pytest.raises(CheckpointError) as e:
        load_reference_encoder(partial, "partial.pt")
    assert _one_line(e).startswith("partial.pt: does not load")

    # a whole checkpoint of ours (not a bare state dict) and a file that is no checkpoint
    ours_ckpt = tmp_path / "ours.pt"
    torch.save({"format": "emp-ssl-ckpt/1", "model": {}, "step": 3}, ours_ckpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    kw = dict(data={}, patch={}, augment={}, seed=0, epoch=1, step=1, source={})
    for bad, what in ((ours_ckpt, "not a state dict"), (junk, "not a loadable state dict"),
                      (tmp_path / "missing.pt", "no such file")):
        with pytest.raises(CheckpointError) as e:
            convert_reference_checkpoint(bad, tmp_path / "out.pt", **kw)
        assert what in _one_line(e)
    assert not (tmp_path / "out.pt").exists()
