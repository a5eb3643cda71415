"""The torchvision source (the shards decoded by torchvision.io, no DALI) against the memory
source, on real pictures (conftest.py's) stored as JPEGs; and --source auto's choice of decoder."""
from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_tool
from pipeline.convert import ConvertOptions, convert, resize_center_crop
from pipeline.errors import UserError
from pipeline.patches import AugmentParams, make_patches
from pipeline import sources
from pipeline.sources import build_source
from pipeline.sources.base import SourceOptions

# torchvision's CPU decoder and Pillow are both libjpeg-turbo with the default (islow) IDCT and
# fancy upsampling: on these JPEGs (quality 90, 4:2:0) they decode identically (max difference
# 0, torchvision 0.29 / Pillow 13), and the memory format holds Pillow's decode of the same
# bytes (the converter keeps a baseline RGB JPEG untouched for the shards). 1 level of slack
# for other library versions. nvJPEG on a GPU has its own IDCT: within a few levels.
CPU_TOLERANCE = 1
# --image-size: torch's antialiased bilinear resize vs the converter's PIL one (--resize):
# within 1 level, 0.16 on average, on 80 crops of real pictures.
RESIZE_TOLERANCE = 1


@pytest.fixture(scope="module")
def jpeg_data(cifar_subset_dir, tmp_path_factory) -> Path:
    """80 train and 20 test pictures of conftest.py's real pictures (8 and 2 a class of CIFAR-10,
    20 and 5 of the sample images; as even as the class count allows), re-encoded as JPEG q90
    (whatever the subset's own format), converted to memory + dali shards of 25 samples."""
    src = tmp_path_factory.mktemp("jpeg-src")
    for split, total in (("train", 80), ("test", 20)):
        class_dirs = sorted((cifar_subset_dir / split).iterdir())
        for c, cls_dir in enumerate(class_dirs):
            k = total // len(class_dirs) + (c < total % len(class_dirs))
            for f in sorted(cls_dir.iterdir())[:k]:
                dst = src / split / cls_dir.name / f"{f.stem}.jpg"
                dst.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(f) as im:
                    im.convert("RGB").save(dst, "JPEG", quality=90)
    out = tmp_path_factory.mktemp("data")
    res = convert(src, ConvertOptions(name="c", out=out, formats=("memory", "dali"), workers=1,
                                      samples_per_shard=25, progress=False))
    assert res.passthrough == {"train": 80, "test": 20}  # the shards hold the files themselves
    return res.root


def _src(name, root, split="train", **kw):
    extra = {k: kw.pop(k) for k in ("image_size",) if k in kw}
    opts = SourceOptions(**{"batch_size": 16, "num_workers": 2, **kw})
    return build_source(name, root, split, opts, **extra)


def _epoch(src, epoch=0, start_batch=0):
    src.set_epoch(epoch, start_batch)
    return list(src)


def test_same_batches_and_pixels_as_the_memory_source(jpeg_data):
    tv = _src("torchvision", jpeg_data, drop_last=False, seed=3)
    mem = _src("memory", jpeg_data, drop_last=False, seed=3)
    assert len(tv) == len(mem) == 5  # ceil(80 / 16)
    for epoch in (0, 1):
        a, b = _epoch(tv, epoch), _epoch(mem, epoch)
        assert [len(y) for _, y in a] == [16, 16, 16, 16, 16]
        for (x, y), (xm, ym) in zip(a, b):
            assert x.dtype == torch.uint8 and x.shape == xm.shape == (len(y), 32, 32, 3)
            assert torch.equal(y, ym)
            assert int((x.int() - xm.int()).abs().max()) <= CPU_TOLERANCE
    tv.close()


def test_order_resume_and_ranks(jpeg_data):
    src = _src("torchvision", jpeg_data, drop_last=True, seed=7)
    labels = lambda batches: torch.cat([y for _, y in batches]).tolist()
    full = _epoch(src, 2)
    tail = _epoch(src, 2, start_batch=3)
    assert len(full) == 5 and len(tail) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[3:], tail))
    assert labels(_epoch(src, 3)) != labels(full)  # a new permutation each epoch
    unshuffled = _epoch(_src("torchvision", jpeg_data, shuffle=False, drop_last=False), 0)
    counts = json.loads((jpeg_data / "manifest.json").read_text())["splits"]["train"]["class_counts"]
    assert labels(unshuffled) == [c for c, k in enumerate(counts) for _ in range(k)]  # stored order
    # two ranks: disjoint halves of the epoch, together all of it
    imgs = [torch.cat([x for x, _ in _epoch(_src("torchvision", jpeg_data, drop_last=False,
                                                 seed=7, rank=r, world_size=2), 2)])
            for r in range(2)]
    everything = torch.cat([x for x, _ in _epoch(_src("torchvision", jpeg_data, drop_last=False,
                                                      seed=7), 2)])
    assert [len(x) for x in imgs] == [40, 40]
    as_set = lambda x: {bytes(i.numpy().tobytes()) for i in x}
    assert as_set(imgs[0]).isdisjoint(as_set(imgs[1]))
    assert as_set(imgs[0]) | as_set(imgs[1]) == as_set(everything)


def test_feeds_the_patch_step(jpeg_data):
    x, _ = next(iter(_src("torchvision", jpeg_data)))
    gen = torch.Generator().manual_seed(0)
    p = make_patches(x, num_patches=3, patch_size=16, out_size=32, mean=[0.5] * 3,
                     std=[0.25] * 3, generator=gen, augment=AugmentParams())
    assert p.shape == (3, 16, 3, 32, 32) and torch.isfinite(p).all()


def test_variable_sizes_with_image_size(cifar_subset_dir, tmp_path):
    """Crops of real pictures in several sizes (dali shards only): --image-size S decodes,
    resizes the shorter side to S and center-crops, as the converter's --resize does."""
    files = sorted((cifar_subset_dir / "test").glob("*/*"))[:12]
    src = tmp_path / "src"
    for i, f in enumerate(files):
        with Image.open(f) as im:
            crop = np.asarray(im.convert("RGB"))[: 20 + i % 9, : 32 - i % 7]
        dst = src / "train" / "c" / f"{i:02d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(dst)
    res = convert(src, ConvertOptions(name="v", out=tmp_path / "out", formats=("dali",),
                                      workers=1, jpeg_quality=100, progress=False))
    assert res.manifest.splits["train"].shape is None
    with pytest.raises(UserError, match="--image-size"):
        _src("torchvision", res.root)
    batches = _epoch(_src("torchvision", res.root, image_size=16, shuffle=False,
                          drop_last=False))
    x = torch.cat([b for b, _ in batches]).numpy()  # (12, 16, 16, 3)
    from pipeline.shards import read_shards
    for got, (jpeg, _) in zip(x, read_shards(res.root / "train")):
        with Image.open(io.BytesIO(jpeg)) as im:
            want = np.asarray(resize_center_crop(im.convert("RGB"), 16))
        assert np.abs(got.astype(int) - want).max() <= RESIZE_TOLERANCE


def test_missing_torchvision_is_one_line(jpeg_data, monkeypatch):
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    from pipeline.sources.tvjpeg import TorchvisionSource
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(UserError) as e:
        TorchvisionSource(jpeg_data, "train", SourceOptions(batch_size=8))
    assert str(e.value).startswith("--source torchvision: ") and "\n" not in str(e.value)


def test_auto_picks_dali_when_installed_else_torchvision(jpeg_data, tmp_path, monkeypatch):
    from emp_ssl.config import DataConfig
    from pipeline.sources import memory

    monkeypatch.setattr(memory, "fits_in_memory", lambda *a: False)
    cfg = DataConfig(path=str(jpeg_data), source="auto")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only their .type is read
    installed = {"nvidia.dali": False, "ffcv": True}
    monkeypatch.setattr(sources, "installed", lambda m: installed[m])
    assert sources.choose_source("auto", cfg.path, "train", cuda) == "torchvision"
    assert sources.choose_source("auto", cfg.path, "train", cpu) == "torchvision"  # no .beton in this dataset
    installed["nvidia.dali"] = True
    assert sources.choose_source("auto", cfg.path, "train", cuda) == "dali"
    # with a .beton: FFCV on the CPU when it is installed, the shards otherwise
    m = json.loads((jpeg_data / "manifest.json").read_text())
    m["formats"] = ["memory", "ffcv", "dali"]
    other = tmp_path / "with_beton"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(m))
    cfg = DataConfig(path=str(other), source="auto")
    assert sources.choose_source("auto", cfg.path, "train", cpu) == "ffcv"
    assert sources.choose_source("auto", cfg.path, "train", cuda) == "dali"
    installed.update({"ffcv": False, "nvidia.dali": False})
    assert sources.choose_source("auto", cfg.path, "train", cpu) == "torchvision"
    monkeypatch.undo()
    assert sources.installed("torch") and not sources.installed("surely_not_a_module_xyz")


def test_throughput_benchmark_measures_it(jpeg_data, tmp_path):
    out = tmp_path / "pipe.json"
    run_tool("benchmarks/pipeline_throughput.py", "--data", str(jpeg_data), "--n", "4",
             "--sources", "memory,torchvision", "--devices", "cpu", "--steps", "2", "--repeats",
             "1", "--warmup", "1", "--batch-size", "16", "--json", str(out))
    rows = {r["source"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torchvision"]["patches_per_s"] > 0 and rows["memory"]["patches_per_s"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_on_cuda(jpeg_data):
    tv = _src("torchvision", jpeg_data, device="cuda", drop_last=False, seed=3)
    mem = _src("memory", jpeg_data, device="cpu", drop_last=False, seed=3)
    for (x, y), (xm, ym) in zip(_epoch(tv), _epoch(mem)):
        assert x.is_cuda and y.is_cuda and x.shape == xm.shape
        assert torch.equal(y.cpu(), ym)
        d = (x.cpu().int() - xm.int()).abs()
        assert float(d.float().mean()) < 1.0 and int(d.max()) <= 16  # nvJPEG's own IDCT
