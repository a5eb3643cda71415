"""The dali and ffcv sources on a small real-image dataset (conftest.py's JPEG pictures) written by
our own writers."""
from __future__ import annotations

import builtins
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.formats import (Manifest, SplitInfo, dali_dir, ffcv_path, save_manifest)
from pipeline.shards import write_shards
from pipeline.sources.base import SourceOptions

N_TRAIN = 30  # 3 a class of CIFAR-10, 8/8/8/6 of the sample images: divisible by the world sizes 2, 3
# DALI's CPU decoder and PIL are both libjpeg-turbo: on the 500 CIFAR train JPEGs of the subset
# they decoded identically (max difference 0, DALI 2.4 / Pillow 13); 1 level of slack for other
# library versions. nvJPEG on the GPU has its own IDCT: only nearest-match identity is asserted.
DALI_TOLERANCE = 1


def _pil(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def data(cifar_jpeg_subset_dir, tmp_path_factory):
    """data/<name> with a fixed-size 'train' split (30 real JPEGs, dali + ffcv raw) and a
    variable-size 'val' split (crops of them re-encoded, dali + ffcv jpg); returns
    (root, train pixels (30, 32, 32, 3), train labels (30,))."""
    from pipeline.beton import write_beton

    root = tmp_path_factory.mktemp("data") / "tiny"
    classes = sorted(p.name for p in (cifar_jpeg_subset_dir / "train").iterdir())
    jpegs, labels = [], []
    for label, name in enumerate(classes):  # class-major, as even as 30 allows
        k = N_TRAIN // len(classes) + (label < N_TRAIN % len(classes))
        for f in sorted((cifar_jpeg_subset_dir / "train" / name).iterdir())[:k]:
            jpegs.append(f.read_bytes())
            labels.append(label)
    labels = np.array(labels, dtype=np.int64)
    class_counts = np.bincount(labels, minlength=len(classes)).tolist()
    pixels = np.stack([_pil(j) for j in jpegs])  # (30, 32, 32, 3)
    # store in a shuffled order, as a converter should (DALI shuffles within a buffer only)
    store = np.random.default_rng(0).permutation(N_TRAIN)
    jpegs = [jpegs[i] for i in store]
    pixels, labels = pixels[store], labels[store]
    write_shards(dali_dir(root, "train"), zip(jpegs, labels.tolist()), samples_per_shard=7)
    write_beton(ffcv_path(root, "train"), pixels, labels, encoding="raw")

    val = [pixels[i][: 20 + i % 9, : 32 - i % 7] for i in range(12)]  # variable sizes
    val_jpegs = []
    for im in val:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        val_jpegs.append(buf.getvalue())
    write_shards(dali_dir(root, "val"), zip(val_jpegs, range(12)), samples_per_shard=5)
    write_beton(ffcv_path(root, "val"), val, np.arange(12), encoding="jpg")

    save_manifest(root, Manifest(
        name="tiny", source=str(cifar_jpeg_subset_dir), classes=classes,
        splits={"train": SplitInfo(N_TRAIN, [32, 32, 3], class_counts),
                "val": SplitInfo(12, None, [])},
        mean=[0.5] * 3, std=[0.25] * 3, formats=["ffcv", "dali"]))
    return root, pixels, labels


def _make(kind, root, split="train", **kw):
    extra = {k: kw.pop(k) for k in ("image_size",) if k in kw}
    opts = SourceOptions(**{"batch_size": 8, "num_workers": 1, **kw})
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
        from pipeline.sources.dali import DaliSource
        return DaliSource(root, split, opts, **extra)
    pytest.importorskip("ffcv", reason="ffcv not installed")
    from pipeline.sources.ffcv import FfcvSource
    return FfcvSource(root, split, opts, **extra)


def _epoch(src, epoch=0, start_batch=0):
    src.set_epoch(epoch, start_batch)
    batches = list(src)
    for x, y in batches:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.ndim == 4 and x.shape[3] == 3 and y.shape == (x.shape[0],)
    return batches


def _identify(batches, pixels, tol):
    """Index into ``pixels`` of every yielded image: its nearest stored image, which must lie
    within ``tol`` levels everywhere (``tol=None``: within 2 levels on average)."""
    flat = torch.from_numpy(pixels.reshape(len(pixels), -1)).int()
    out = []
    for x, _ in batches:
        for img in x.cpu():
            diff = (flat - img.reshape(1, -1).int()).abs()  # (N, H*W*3)
            mean = diff.float().mean(dim=1)
            match = int(mean.argmin())
            if tol is None:
                assert mean[match] < 2.0
            else:
                assert int(diff[match].max()) <= tol
            out.append(match)
    return out


@pytest.mark.parametrize("kind,tol", [("dali", DALI_TOLERANCE), ("ffcv", 0)])
def test_every_image_once_with_its_label(data, kind, tol):
    root, pixels, labels = data
    src = _make(kind, root, drop_last=False, seed=3)
    assert len(src) == 4  # ceil(30 / 8)
    batches = _epoch(src)
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    ids = _identify(batches, pixels, tol)
    assert sorted(ids) == list(range(N_TRAIN))
    got_labels = torch.cat([y for _, y in batches]).numpy()
    np.testing.assert_array_equal(got_labels, labels[ids])
    assert ids != sorted(ids)  # shuffled


@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_order_is_a_function_of_seed_and_epoch(data, kind):
    root, pixels, _ = data
    tol = DALI_TOLERANCE if kind == "dali" else 0
    a = _make(kind, root, drop_last=True, seed=7)
    b = _make(kind, root, drop_last=True, seed=7)
    assert len(a) == 3
    order = lambda src, e, k=0: _identify(_epoch(src, e, k), pixels, tol)
    a1, a0 = order(a, 1), order(a, 0)  # a visits epoch 1 first, b epoch 0 first
    assert order(b, 0) == a0 and order(b, 1) == a1
    assert a0 != a1  # a new permutation per epoch
    assert order(b, 1, 2) == a1[16:]  # resume at batch 2 of epoch 1: the same tail
    assert order(_make(kind, root, drop_last=True, seed=8), 0) != a0
    unshuffled = order(_make(kind, root, drop_last=False, shuffle=False), 0)
    assert unshuffled == list(range(N_TRAIN))  # stored order


@pytest.mark.parametrize("kind,world", [("dali", 2), ("dali", 3), ("dali", 4), ("ffcv", 3)])
def test_ranks_are_disjoint_and_cover(data, kind, world):
    root, pixels, _ = data
    tol = DALI_TOLERANCE if kind == "dali" else 0
    per_rank = []
    for rank in range(world):
        src = _make(kind, root, drop_last=False, seed=5, rank=rank, world_size=world)
        assert len(src) == -(-(N_TRAIN // world) // 8)
        per_rank.append(_identify(_epoch(src, epoch=2), pixels, tol))
    assert [len(p) for p in per_rank] == [N_TRAIN // world] * world
    seen = sum(per_rank, [])
    assert len(set(seen)) == len(seen)  # disjoint
    if N_TRAIN % world == 0:
        assert sorted(seen) == list(range(N_TRAIN))  # and covering


def test_ffcv_epoch_order():
    from pipeline.sources.ffcv import epoch_order

    kw = dict(batch_size=4, seed=1, shuffle=True, drop_last=False)
    full = epoch_order(30, epoch=0, start_batch=0, rank=0, world_size=1, **kw)
    assert sorted(full.tolist()) == list(range(30))
    other = epoch_order(30, epoch=1, start_batch=0, rank=0, world_size=1, **kw)
    assert other.tolist() != full.tolist()
    # 4 ranks of 30: 7 each, disjoint, 2 samples left out per epoch
    ranks = [epoch_order(30, epoch=0, start_batch=0, rank=r, world_size=4, **kw).tolist()
             for r in range(4)]
    assert [len(r) for r in ranks] == [7] * 4 and len(set(sum(ranks, []))) == 28
    assert ranks[0] == full[:7].tolist()
    # drop_last cuts to whole batches; start_batch skips whole batches
    kw["drop_last"] = True
    assert len(epoch_order(30, epoch=0, start_batch=0, rank=1, world_size=4, **kw)) == 4
    tail = epoch_order(30, epoch=0, start_batch=5, rank=0, world_size=1, **kw)
    assert tail.tolist() == full[20:28].tolist()


@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_variable_size_split_needs_image_size(data, kind):
    root, _, _ = data
    with pytest.raises(UserError, match="--image-size"):
        _make(kind, root, split="val")
    src = _make(kind, root, split="val", image_size=16, drop_last=False, shuffle=False)
    batches = _epoch(src)
    assert [tuple(x.shape) for x, _ in batches] == [(8, 16, 16, 3), (4, 16, 16, 3)]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(12))


def test_dali_cpu_pixels_close_to_pil(data):
    root, pixels, _ = data
    src = _make("dali", root, drop_last=False, shuffle=False)
    x = torch.cat([x for x, _ in _epoch(src)]).numpy()
    diff = np.abs(x.astype(int) - pixels)
    assert diff.max() <= DALI_TOLERANCE
    assert diff.mean() < 0.5


def test_missing_split_and_format(data, tmp_path):
    root, _, _ = data
    for kind in ("dali", "ffcv"):
        with pytest.raises(UserError, match="no split 'test'"):
            _make(kind, root, split="test")
    with pytest.raises(UserError, match="no manifest"):
        _make("ffcv", tmp_path)


@pytest.mark.parametrize("kind,module,extra",
                         [("dali", "nvidia", "dali"), ("ffcv", "ffcv", "ffcv")])
def test_missing_library_is_one_line(data, monkeypatch, kind, module, extra):
    root, _, _ = data
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    if kind == "dali":
        from pipeline.sources.dali import DaliSource as cls
    else:
        from pipeline.sources.ffcv import FfcvSource as cls
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(UserError) as e:
        cls(root, "train", SourceOptions(batch_size=8))
    msg = str(e.value)
    assert msg.startswith(f"--source {kind}: ") and "\n" not in msg
    assert f"pip install -e '.[{extra}]'" in msg and "--source memory" in msg


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["dali", "ffcv"])
def test_on_cuda(request, kind):
    # skip (not error) where the library is missing, e.g. a GPU box without DALI/FFCV
    pytest.importorskip("nvidia.dali" if kind == "dali" else "ffcv")
    pytest.importorskip("ffcv", reason="the data fixture writes a .beton with ffcv")
    root, pixels, labels = request.getfixturevalue("data")
    src = _make(kind, root, device="cuda", drop_last=False, seed=3)
    batches = _epoch(src)
    assert all(x.is_cuda and y.is_cuda for x, y in batches)
    ids = _identify(batches, pixels, None if kind == "dali" else 0)  # nvJPEG: nearest match
    assert sorted(ids) == list(range(N_TRAIN))
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).cpu().numpy(), labels[ids])
