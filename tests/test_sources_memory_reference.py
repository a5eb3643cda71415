"""The memory and reference sources, and build_source, on the real-CIFAR subset converted by
tools/convert_datasets.py (the cifar_subset_data fixture)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.formats import MANIFEST_NAME, memory_images_path, memory_labels_path
from pipeline.patches import AugmentParams, make_patches
from pipeline.sources import SOURCES, build_source
from pipeline.sources import memory as memory_mod
from pipeline.sources.base import SourceOptions
from pipeline.sources.ffcv import epoch_order
from pipeline.sources.memory import MemorySource, fits_in_memory
from pipeline.sources.reference import ReferenceSource


@pytest.fixture(scope="module")
def arrays(cifar_subset_data):
    return (np.load(memory_images_path(cifar_subset_data, "train")),
            np.load(memory_labels_path(cifar_subset_data, "train")))


def _index_of(images: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): i for i, img in enumerate(images)}


def _epoch(source, epoch=0, start_batch=0):
    source.set_epoch(epoch, start_batch)
    return [(x.clone(), y.clone()) for x, y in source]


def test_build_source_names(cifar_subset_data):
    assert SOURCES == ("memory", "dali", "torchvision", "ffcv", "reference")
    with pytest.raises(UserError, match="--source"):
        build_source("nope", cifar_subset_data, "train", SourceOptions(batch_size=10))
    src = build_source("memory", cifar_subset_data, "train", SourceOptions(batch_size=10))
    assert isinstance(src, MemorySource) and not getattr(src, "yields_patches", False)


def test_memory_epoch_is_a_permutation(cifar_subset_data, arrays):
    images, labels = arrays
    lookup = _index_of(images)
    assert len(lookup) == len(images) == 500  # the subset's images are distinct
    src = MemorySource(cifar_subset_data, "train", SourceOptions(batch_size=64, drop_last=False, seed=3))
    assert len(src) == 8  # ceil(500 / 64)
    batches = _epoch(src, epoch=0)
    seen = []
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (32, 32, 3) and y.dtype == torch.int64
        idx = [lookup[img.tobytes()] for img in x.numpy()]
        assert (labels[idx] == y.numpy()).all()
        seen += idx
    assert sorted(seen) == list(range(500))
    # the order is the ffcv source's: switching sources does not change the batches
    expected = epoch_order(500, 64, 0, 0, 3, True, 0, 1, False).astype(np.int64)
    assert seen == expected.tolist()
    # deterministic per (seed, epoch), different across epochs, resumable mid-epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, _epoch(src, epoch=0)))
    assert not torch.equal(batches[0][0], _epoch(src, epoch=1)[0][0])
    tail = _epoch(src, epoch=0, start_batch=5)
    assert len(tail) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches[5:], tail))


def test_memory_no_shuffle_drop_last_and_ranks(cifar_subset_data, arrays):
    images, _ = arrays
    lookup = _index_of(images)
    plain = MemorySource(cifar_subset_data, "train", SourceOptions(batch_size=64, shuffle=False))
    batches = _epoch(plain)
    assert len(plain) == len(batches) == 7 and all(len(y) == 64 for _, y in batches)
    assert np.array_equal(batches[0][0].numpy(), images[:64])
    per_rank = []
    for rank in range(3):
        src = MemorySource(cifar_subset_data, "train",
                           SourceOptions(batch_size=16, seed=1, rank=rank, world_size=3))
        assert len(src) == 166 // 16
        per_rank.append({lookup[img.tobytes()] for x, _ in _epoch(src, epoch=2) for img in x.numpy()})
    assert all(len(s) == 160 for s in per_rank)
    assert not (per_rank[0] & per_rank[1] or per_rank[0] & per_rank[2] or per_rank[1] & per_rank[2])


def test_memory_errors_and_fit(cifar_subset_data, tmp_path, monkeypatch):
    assert fits_in_memory(cifar_subset_data, "train", "cpu")
    monkeypatch.setattr(memory_mod, "_available_host_bytes", lambda: 1000)
    assert not fits_in_memory(cifar_subset_data, "train", "cpu")
    monkeypatch.undo()
    # converted without the memory format: a clear error, and auto does not pick memory
    root = tmp_path / "nomem"
    root.mkdir()
    manifest = json.loads((cifar_subset_data / MANIFEST_NAME).read_text())
    manifest["formats"] = ["ffcv"]
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not fits_in_memory(root, "train", "cpu")
    with pytest.raises(UserError, match="memory"):
        MemorySource(root, "train", SourceOptions(batch_size=10))
    with pytest.raises(UserError, match="split"):
        MemorySource(cifar_subset_data, "nosuch", SourceOptions(batch_size=10))
    # listed in the manifest but the file is gone
    manifest["formats"] = ["memory"]
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    shutil.copy(memory_labels_path(cifar_subset_data, "train"), memory_labels_path(root, "train"))
    with pytest.raises(UserError, match="u8.npy"):
        MemorySource(root, "train", SourceOptions(batch_size=10))


def _reference(root, n, p, s, augment, workers=0, batch=25, mean=(0.0,) * 3, std=(1.0,) * 3):
    return build_source("reference", root, "train",
                        SourceOptions(batch_size=batch, seed=3, num_workers=workers),
                        num_patches=n, patch_size=p, out_size=s, mean=mean, std=std, augment=augment)


def test_reference_crops_are_windows_in_the_same_order(cifar_subset_data, arrays):
    images, labels = arrays
    src = _reference(cifar_subset_data, 4, 16, 16, None)
    assert isinstance(src, ReferenceSource) and src.yields_patches
    src.set_epoch(0)
    patches, y = next(iter(src))  # (n, B, 3, 16, 16)
    assert patches.shape == (4, 25, 3, 16, 16) and patches.dtype == torch.float32
    order = epoch_order(500, 25, 0, 0, 3, True, 0, 1, True).astype(np.int64)[:25]
    assert (y.numpy() == labels[order]).all()  # the memory source's order
    for b in range(25):
        img = torch.from_numpy(images[order[b]]).permute(2, 0, 1).float() / 255  # (3, 32, 32)
        windows = img.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 17, 17, 16, 16)
        for i in range(4):
            d = (windows - patches[i, b][:, None, None]).abs().amax(dim=(0, 3, 4))
            assert d.min() < 1e-6


def test_reference_matches_make_patches_statistics(cifar_subset_data, arrays):
    """Same recipe, two implementations: the patch statistics agree (workers exercised).

    (Without augmentation the channel means differ by up to 0.12 and the within-patch std by
    0.05, so this does tell the recipes apart.)"""
    images, _ = arrays
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    src = _reference(cifar_subset_data, 8, 16, 32, AugmentParams(), workers=2, batch=100,
                     mean=mean, std=std)
    src.set_epoch(0)
    ref = torch.cat([p for p, _ in src], dim=1)  # (8, 500, 3, 32, 32)
    ours = make_patches(torch.from_numpy(images), num_patches=8, patch_size=16, out_size=32,
                        mean=mean, std=std, generator=torch.Generator().manual_seed(0))
    assert ref.shape == ours.shape
    for stat in (lambda t: t.mean(dim=(0, 1, 3, 4)), lambda t: t.std(dim=(0, 1, 3, 4)),
                 lambda t: t.flatten(2).std(-1).mean()):  # per channel; within-patch contrast
        torch.testing.assert_close(stat(ref), stat(ours), atol=0.03, rtol=0.03)


@pytest.mark.parametrize("name", SOURCES)
def test_more_ranks_than_images_is_a_clear_error(cifar_subset_data, name):
    """Every source refuses a world larger than the split (500 train images) in one line."""
    if name in ("dali", "ffcv"):
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[name])
    extra = dict(num_patches=2, patch_size=16, out_size=32, mean=(0.5,) * 3, std=(0.5,) * 3) \
        if name == "reference" else {}
    with pytest.raises(UserError, match="has 500 images, fewer than the 501 ranks"):
        build_source(name, cifar_subset_data, "train",
                     SourceOptions(batch_size=1, rank=0, world_size=501), **extra)
