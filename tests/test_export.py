"""emp_ssl/export.py, tools/export.py and hubconf.py: the exported backbone is the trained
encoder, through torchvision, load_backbone and torch.hub (local), for both stems, for a
checkpoint train.py wrote and for one converted from the authors' code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import ROOT, run_tool
from emp_ssl import embed
from emp_ssl.checkpoints import convert_reference_checkpoint, save_checkpoint
from emp_ssl.export import (BACKBONE_FILE, META_FILE, PROJECTOR_FILE, TORCHVISION_FILE,
                            ExportError, export_checkpoint, load_backbone, torchvision_resnet18)
from model.encoder import EncoderConfig, build_encoder
from pipeline.formats import load_manifest
from pipeline.patches import flatten_patches, make_patches
from pipeline.sources.memory import load_memory_arrays
from test_reference_ckpt import TheirStructure, _randomize_norm_stats

# stem -> (patch_size, out_size): the imagenet stem's stride-2 conv + max-pool needs 64px inputs
GEOMETRY = {"cifar": (16, 32), "imagenet": (16, 64)}


def _checkpoint(path: Path, data: Path, stem: str, *, width: int = 8, seed: int = 0) -> tuple[Path, nn.Module]:
    """A checkpoint in train.py's layout holding a seeded encoder with non-trivial BatchNorm
    statistics (so every buffer must be mapped right), 'trained on' ``data``."""
    m = load_manifest(data)
    torch.manual_seed(seed)
    enc = build_encoder(EncoderConfig(stem=stem, width=width, projector=(48, 16)))
    _randomize_norm_stats(enc, seed + 1)
    enc.eval()
    P, S = GEOMETRY[stem]
    save_checkpoint(path, {
        "model": enc.state_dict(), "encoder": enc.cfg.to_dict(), "patch": {"patch_size": P, "out_size": S},
        "data": {"name": m.name, "classes": list(m.classes), "mean": list(m.mean), "std": list(m.std),
                 "image_shape": m.splits["train"].shape},
        "step": 3, "epoch": 0, "git_commit": "ckpt-commit",
        "config": {"augment": {"blur_p": 0.0}, "data": {"num_patches": 4, "batch_size": 50},
                   "optim": {"epochs": 1.0}, "run": {"seed": 5}}})
    return path, enc


def _patches(images: np.ndarray, stem: str, mean, std) -> torch.Tensor:
    P, S = GEOMETRY[stem]
    g = torch.Generator().manual_seed(0)
    p = make_patches(torch.from_numpy(images), num_patches=2, patch_size=P, out_size=S, mean=mean,
                     std=std, generator=g, augment=None)
    return flatten_patches(p)  # (2 * B, 3, S, S)


@pytest.fixture(scope="module")
def test_images(cifar_subset_data) -> np.ndarray:
    images, _ = load_memory_arrays(cifar_subset_data, "test")
    return np.ascontiguousarray(images[::10])  # 10 real CIFAR-10 pictures, one per class


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_export_matches_encoder_through_torchvision_load_backbone_and_hub(
        stem, cifar_subset_data, test_images, tmp_path):
    ckpt, enc = _checkpoint(tmp_path / "run" / "ckpt.pt", cifar_subset_data, stem)
    meta_path = export_checkpoint(ckpt, tmp_path / "export")
    out = meta_path.parent
    assert {p.name for p in out.iterdir()} == {BACKBONE_FILE, TORCHVISION_FILE, PROJECTOR_FILE, META_FILE}
    meta = json.loads(meta_path.read_text())
    m = load_manifest(cifar_subset_data)
    assert (meta["stem"], meta["width"], meta["arch"]) == (stem, 8, "resnet18")
    assert meta["feature_dims"] == {"backbone": 64, "pre_projector": 48}
    assert meta["dataset"]["name"] == m.name and meta["dataset"]["mean"] == list(m.mean)
    assert meta["dataset"]["image_shape"] == [32, 32, 3]
    assert meta["patch"] == dict(zip(("patch_size", "out_size"), GEOMETRY[stem]))
    assert meta["augment"]["blur_p"] == 0.0 and meta["augment"]["from"] == "checkpoint config"
    assert meta["training"]["epochs"] == 1.0 and meta["training"]["num_patches"] == 4
    assert meta["training"]["batch_size"] == 50 and meta["training"]["seed"] == 5
    assert meta["git_commit"]["checkpoint"] == "ckpt-commit" and meta["git_commit"]["export"]
    assert meta["source"]["sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert meta["torchvision"]["loads_into_resnet18"] is False  # width 8, not torchvision's 64

    sd = torch.load(out / TORCHVISION_FILE, weights_only=True)
    assert "conv1.weight" in sd and "layer4.1.bn2.running_var" in sd and not any(k.startswith("fc.") for k in sd)

    # torchvision's ResNet class, loaded from the export, computes our encoder's backbone
    # feature on real pictures (fp32; the same ops in the same order)
    tv = torchvision_resnet18(out)
    assert isinstance(tv, torchvision.models.ResNet)
    x = _patches(test_images, stem, m.mean, m.std)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), enc.features(x, "backbone"), rtol=0, atol=1e-5)
    common = dict(num_patches=4, patch_size=GEOMETRY[stem][0], out_size=GEOMETRY[stem][1],
                  mean=m.mean, std=m.std, augment={"blur_p": 0.0}, feature="backbone")
    torch.testing.assert_close(embed(test_images, tv, **common), embed(test_images, enc, **common),
                               rtol=0, atol=1e-5)

    # load_backbone of the export and of the checkpoint: the same module, the same embed()
    # with the metadata's defaults (geometry, normalization, recipe, pre_projector feature)
    a, b = load_backbone(out), load_backbone(ckpt)
    assert not a.training and a.emp_ssl_meta["features"] == ["backbone", "pre_projector"]
    ea, eb = embed(test_images, a, num_patches=4), embed(test_images, b, num_patches=4)
    assert ea.shape == (10, 48) and torch.equal(ea, eb)
    assert torch.equal(ea, embed(test_images, enc, num_patches=4, patch_size=GEOMETRY[stem][0],
                                 out_size=GEOMETRY[stem][1], mean=m.mean, std=m.std,
                                 augment={"blur_p": 0.0}))
    with torch.no_grad():
        torch.testing.assert_close(a(x), enc.features(x), rtol=0, atol=0)

    hub = torch.hub.load(str(ROOT), "emp_ssl_resnet18", source="local", weights=str(out))
    assert torch.equal(embed(test_images, hub, num_patches=4), ea)


def test_train_py_checkpoint_through_the_cli(cifar_subset_data, test_images, tmp_path):
    import train

    run = tmp_path / "run"
    assert train.main(["--config", "configs/demo.yaml", "--num-patches", "4", "--data.batch_size", "50",
                       "--model.projector", "64,16", "--run.tensorboard", "false", "--device", "cpu",
                       "--data", str(cifar_subset_data), "--out", str(run), "--run.max_steps", "2"]) == 0
    out = tmp_path / "export"
    proc = run_tool("tools/export.py", "--checkpoint", str(run / "ckpt.pt"), "--out", str(out))
    assert "wrote" in proc.stdout
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # every file as readable as a plain open() makes it
    meta = json.loads((out / META_FILE).read_text())
    assert meta["width"] == 16 and meta["training"]["num_patches"] == 4
    assert meta["training"]["preset"] == "demo"  # the recipe --config named
    from emp_ssl.config import preset_name
    assert preset_name(run / "config.yaml") == "demo"  # --config RUN/config.yaml keeps the name
    assert meta["training"]["step"] == 2 and meta["training"]["batch_size"] == 50
    a, b = load_backbone(out), load_backbone(run / "ckpt.pt")
    assert torch.equal(embed(test_images, a, num_patches=2), embed(test_images, b, num_patches=2))

    # --no-projector: backbone only; embed's default feature follows
    export_checkpoint(run / "ckpt.pt", out, projector=False)  # = tools/export.py --no-projector
    assert not (out / PROJECTOR_FILE).exists()
    c = load_backbone(out)
    assert c.emp_ssl_meta["features"] == ["backbone"]
    e = embed(test_images, c, num_patches=2)
    assert e.shape == (10, 128)
    assert torch.equal(e, embed(test_images, b, num_patches=2, feature="backbone"))
    with pytest.raises(ValueError, match="exported without the projector"):
        c.features(torch.zeros(1, 3, 32, 32), "pre_projector")


def test_converted_reference_checkpoint_loads_into_their_torchvision_backbone(test_images, tmp_path):
    """Their encoder IS torchvision's resnet18 (3x3 conv1, no max-pool, fc = Identity): the
    export's state dict loads strictly into it, and features match theirs."""
    torch.manual_seed(6)
    theirs = TheirStructure(hidden=32, z_dim=8)
    _randomize_norm_stats(theirs, seed=7)
    theirs.eval()
    src = tmp_path / "save_models" / "0.pt"
    src.parent.mkdir()
    torch.save(nn.DataParallel(theirs).state_dict(), src)
    ckpt = convert_reference_checkpoint(
        src, tmp_path / "ckpt.pt", data={"name": "cifar10", "classes": [f"c{i}" for i in range(10)],
                                         "image_shape": [32, 32, 3]},
        patch={"patch_size": 16, "out_size": 32}, augment={"blur_p": 0.1}, seed=3, epoch=1,
        step=500, source={"commit": "abc123", "file": str(src)})
    out = export_checkpoint(ckpt, tmp_path / "export").parent
    meta = json.loads((out / META_FILE).read_text())
    assert meta["torchvision"]["loads_into_resnet18"] is True and meta["width"] == 64
    assert meta["dataset"]["mean"] == [0.5] * 3 and meta["dataset"]["normalize"] == "fixed"
    assert meta["source"]["converted_from"]["commit"] == "abc123"

    tv = torchvision.models.resnet18()  # the stated changes, nothing else
    tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool, tv.fc = nn.Identity(), nn.Identity()
    tv.load_state_dict(torch.load(out / TORCHVISION_FILE, weights_only=True), strict=True)
    tv.eval()
    x = _patches(test_images[:4], "cifar", [0.5] * 3, [0.5] * 3)
    model = load_backbone(out)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), theirs.backbone(x), rtol=0, atol=1e-5)
        _, feature_ref = theirs(x)
        torch.testing.assert_close(model.features(x, "pre_projector"), feature_ref, rtol=0, atol=1e-5)
    assert model.emp_ssl_meta["mean"] == [0.5] * 3 and model.emp_ssl_meta["augment"]["blur_p"] == 0.1


def test_hub_without_weights_is_a_random_init_backbone():
    m = torch.hub.load(str(ROOT), "emp_ssl_resnet18", source="local", width=8, projector=[16, 8])
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    assert m.features(torch.zeros(2, 3, 32, 32), "pre_projector").shape == (2, 16)


def _one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg


def test_bad_inputs_give_one_line_errors(cifar_subset_data, tmp_path):
    proc = run_tool("tools/export.py", "--checkpoint", str(tmp_path / "nope.pt"), "--out",
                    str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "nope.pt" in _one_line(proc.stderr) and "Traceback" not in proc.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = run_tool("tools/export.py", "--checkpoint", str(junk), "--out", str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "junk.pt" in _one_line(proc.stderr)
    ckpt, _ = _checkpoint(tmp_path / "run" / "ckpt.pt", cifar_subset_data, "cifar")
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_tool("tools/export.py", "--checkpoint", str(ckpt), "--out", str(afile), check=False)
    assert proc.returncode == 2 and "not a directory" in _one_line(proc.stderr)

    with pytest.raises(ExportError, match="no such file"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(ExportError, match="not an export"):
        load_backbone(tmp_path)  # a directory without export.json
    out = export_checkpoint(ckpt, tmp_path / "export").parent
    (out / BACKBONE_FILE).write_bytes(b"garbage")
    with pytest.raises(ExportError, match=BACKBONE_FILE) as e:
        load_backbone(out)
    _one_line(str(e.value))
    (out / META_FILE).write_text("{")
    with pytest.raises(ExportError, match="not readable JSON"):
        load_backbone(out)
    (out / META_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ExportError, match="not an export of this project"):
        torchvision_resnet18(out)
