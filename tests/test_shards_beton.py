"""The DALI shard and FFCV .beton writers/readers, on real JPEGs (conftest.py's JPEG pictures)."""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.formats import dali_index_name, dali_shard_name
from pipeline.shards import INDEX_VERSION, index_count, read_shards, sample_key, write_shards


@pytest.fixture(scope="module")
def real_samples(cifar_jpeg_subset_dir) -> list[tuple[bytes, int]]:
    """30 real JPEGs (jpeg_bytes, label), class-major, as even across the classes as 30 allows:
    3 of each of CIFAR-10's 10 classes, or 8, 8, 8 and 6 of the sample images' 4."""
    classes = sorted(p.name for p in (cifar_jpeg_subset_dir / "train").iterdir())
    out = []
    for label, name in enumerate(classes):
        k = 30 // len(classes) + (label < 30 % len(classes))
        for f in sorted((cifar_jpeg_subset_dir / "train" / name).iterdir())[:k]:
            out.append((f.read_bytes(), label))
    assert len(out) == 30
    return out


def _pil(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- shards


def test_shards_round_trip_and_layout(tmp_path, real_samples):
    paths = write_shards(tmp_path, iter(real_samples), samples_per_shard=8)  # 8 + 8 + 8 + 6
    assert [p.name for p in paths] == [dali_shard_name(i) for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [dali_shard_name(i) for i in range(4)] + [dali_index_name(i) for i in range(4)])
    assert list(read_shards(tmp_path)) == real_samples

    # members are <key>.jpg, <key>.cls with the global index as key, label in ASCII
    import tarfile
    with tarfile.open(paths[1]) as tf:
        names = tf.getnames()
        assert names[:2] == [f"{sample_key(8)}.jpg", f"{sample_key(8)}.cls"]
        assert tf.extractfile(names[1]).read() == str(real_samples[8][1]).encode()
    lines = (tmp_path / dali_index_name(3)).read_text().splitlines()
    assert lines[0] == f"{INDEX_VERSION} 6" and len(lines) == 7
    assert [index_count(tmp_path / dali_index_name(i)) for i in range(4)] == [8, 8, 8, 6]


def test_index_offsets_point_at_the_member_bytes(tmp_path, real_samples):
    (tar,) = write_shards(tmp_path, real_samples, samples_per_shard=100)
    blob = tar.read_bytes()
    lines = tar.with_suffix(".idx").read_text().splitlines()[1:]
    for (jpeg, label), line in zip(real_samples, lines):
        ext1, off1, size1, _, ext2, off2, size2, _ = line.split()
        assert (ext1, ext2) == ("jpg", "cls")
        assert blob[int(off1):int(off1) + int(size1)] == jpeg
        assert blob[int(off2):int(off2) + int(size2)] == str(label).encode()


def test_index_equals_dalis_wds2idx(tmp_path, real_samples):
    wds2idx = pytest.importorskip("wds2idx", reason="nvidia-dali (ships wds2idx) not installed")
    for tar in write_shards(tmp_path, real_samples, samples_per_shard=11):
        ref = tmp_path / (tar.stem + ".ref")
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_text() == ref.read_text()


def test_dali_reader_accepts_the_shards(tmp_path, real_samples):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")
    from nvidia.dali import fn, pipeline_def, types

    tars = write_shards(tmp_path, real_samples, samples_per_shard=7)

    @pipeline_def(batch_size=len(real_samples), num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "cls"], dtypes=[types.UINT8, types.UINT8], random_shuffle=False,
            missing_component_behavior="error", name="reader")
        return jpg, cls

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == len(real_samples)
    jpgs, clss = pipe.run()
    got = [(bytes(np.array(jpgs[i])), int(bytes(np.array(clss[i])))) for i in range(len(jpgs))]
    assert got == real_samples


def test_shards_reproducible_and_atomic(tmp_path, real_samples):
    a = write_shards(tmp_path / "a", real_samples, samples_per_shard=10)
    b = write_shards(tmp_path / "b", real_samples, samples_per_shard=10)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert [digest(p) for p in a] == [digest(p) for p in b]

    def failing_after(k):
        yield from real_samples[:k]
        raise RuntimeError("source died")

    # mid-shard (15) and right after a full one (10): the finished shard stays, the unfinished
    # one left no tar, idx or temp file
    for k in (15, 10):
        out = tmp_path / f"failed{k}"
        with pytest.raises(RuntimeError, match="source died"):
            write_shards(out, failing_after(k), samples_per_shard=10)
        assert sorted(p.name for p in out.iterdir()) == [dali_index_name(0), dali_shard_name(0)]
        assert list(read_shards(out)) == real_samples[:10]
    # exact multiples and a short last shard
    assert [p.name for p in write_shards(tmp_path / "e", real_samples[:20], samples_per_shard=10)] \
        == [dali_shard_name(0), dali_shard_name(1)]
    assert list(read_shards(tmp_path / "e")) == real_samples[:20]
    assert write_shards(tmp_path / "f", [], samples_per_shard=10) == []


def test_shards_bad_input(tmp_path, real_samples):
    with pytest.raises(UserError, match="samples_per_shard"):
        write_shards(tmp_path, real_samples, samples_per_shard=0)
    with pytest.raises(UserError, match="no shard"):
        list(read_shards(tmp_path / "empty"))
    (tmp_path / "bad.idx").write_text("v1.1 3\n")
    with pytest.raises(UserError, match="not a DALI webdataset index"):
        index_count(tmp_path / "bad.idx")


# ---------------------------------------------------------------- beton


@pytest.fixture(scope="module")
def beton_mod():
    pytest.importorskip("ffcv", reason="ffcv not installed")
    from pipeline import beton
    return beton


def test_beton_raw_round_trip_exact(tmp_path, real_samples, beton_mod):
    images = np.stack([_pil(j) for j, _ in real_samples])  # (30, 32, 32, 3)
    labels = np.array([l for _, l in real_samples], dtype=np.int64)
    path = tmp_path / "train.beton"
    beton_mod.write_beton(path, images, labels, encoding="raw", num_workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.beton"]  # no temp left
    got_images, got_labels = beton_mod.read_beton(path)
    assert isinstance(got_images, np.ndarray) and got_images.shape == images.shape
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_beton_jpg_variable_size(tmp_path, real_samples, beton_mod):
    # variable sizes: crops of real images; jpg is lossy, so compare with a tolerance
    images = [_pil(j)[: 20 + i % 7, : 32 - i % 5] for i, (j, _) in enumerate(real_samples[:12])]
    labels = np.arange(12)
    path = tmp_path / "v.beton"
    beton_mod.write_beton(path, images, labels, encoding="jpg", jpeg_quality=95)
    got_images, got_labels = beton_mod.read_beton(path)
    assert isinstance(got_images, list)
    assert [g.shape for g in got_images] == [im.shape for im in images]
    for g, im in zip(got_images, images):
        assert np.abs(g.astype(int) - im).mean() < 4.0  # q95 JPEG of real 32px images
    np.testing.assert_array_equal(got_labels, labels)


def test_beton_bad_input(tmp_path, beton_mod):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(UserError, match="--ffcv-encoding"):
        beton_mod.write_beton(tmp_path / "x.beton", images, np.zeros(2), encoding="png")
    with pytest.raises(ValueError, match="uint8"):
        beton_mod.write_beton(tmp_path / "x.beton", images.astype(np.float32), np.zeros(2))
    with pytest.raises(UserError, match="no such"):
        beton_mod.read_beton(tmp_path / "missing.beton")
    assert list(tmp_path.iterdir()) == []


def test_beton_missing_ffcv_is_one_line(tmp_path, monkeypatch):
    import builtins

    from pipeline import beton
    real_import = builtins.__import__

    def no_ffcv(name, *args, **kwargs):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError("No module named 'ffcv'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffcv)
    with pytest.raises(UserError, match=r"pip install -e '\.\[ffcv\]'") as e:
        beton.write_beton(tmp_path / "x.beton", np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1))
    assert "\n" not in str(e.value)


def test_atomic_path_renames_on_success_and_leaves_nothing_on_error(tmp_path):
    from pathlib import Path

    from pipeline.formats import atomic_path, write_bytes_atomic

    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half of the new")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"                      # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp left
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    # the mode a plain open() gives, not mkstemp's 0600
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
