"""The converter's inputs: archives read in place, CIFAR pickles, Tiny ImageNet, --classes."""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert import ConvertOptions, convert, jpeg_tolerance, read_classes_file, verify
from pipeline.errors import UserError
from pipeline.formats import load_manifest, memory_images_path, memory_labels_path
from pipeline.shards import read_shards


def run(source, out: Path, name: str = "ds", **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("formats", ("memory", "dali"))
    return convert(source, ConvertOptions(name=name, out=out, **kw))


def memory(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(memory_images_path(root, split)), np.load(memory_labels_path(root, split))


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _folder(root: Path, classes=("cat", "ant", "bee"), per_class=3, size=12) -> None:
    """A small ImageFolder of random JPEGs (train) and PNGs (test)."""
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(per_class):
            for split, fmt in (("train", "JPEG"), ("test", "PNG")):
                p = root / split / c / f"{i}.{fmt.lower()}"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(p, fmt)


# ------------------------------------------------------------------ archives


def _tar(src: Path, path: Path, mode: str, arcroot: str) -> Path:
    with tarfile.open(path, mode) as tf:
        tf.add(src, arcname=arcroot)
    return path


def _zip(src: Path, path: Path, arcroot: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f"{arcroot}/{f.relative_to(src).as_posix()}")
    return path


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.xz", "zip", "zip-flat"])
def test_archive_equals_directory(tmp_path, kind):
    src = tmp_path / "src"
    _folder(src)
    ref = run(src, tmp_path / "ref")
    archive = tmp_path / f"ds.{kind.split('-')[0]}"
    if kind == "zip":
        _zip(src, archive, "wrapper")  # one top-level directory around the splits
    elif kind == "zip-flat":
        _zip(src, archive, ".")
    else:
        _tar(src, archive, "w" + {"tar": "", "tar.gz": ":gz", "tar.xz": ":xz"}[kind], "wrapper")
    res = run(archive, tmp_path / "out")
    assert res.manifest.classes == ["ant", "bee", "cat"]  # sorted directory names
    for split in ("train", "test"):
        a, la = memory(ref.root, split)
        b, lb = memory(res.root, split)
        assert np.array_equal(a, b) and np.array_equal(la, lb)
        assert la.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert list(read_shards(ref.root / "train")) == list(read_shards(res.root / "train"))
    assert res.manifest.source == str(archive.resolve())
    assert not (tmp_path / "out" / "wrapper").exists()  # nothing was extracted


# ------------------------------------------------------------------ CIFAR pickles


def _cifar_batch(n: int, seed: int, labels_key: bytes) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)  # (N, H, W, 3)
    labels = rng.integers(0, 3, n).tolist()
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # the real layout: R plane, G, B
    return {b"batch_label": b"x", labels_key: labels, b"data": data,
            b"filenames": [b"f.png"] * n}, images, labels


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = root / "cifar-10-batches-py"
    names = [b"zebra", b"ant", b"moose"]  # not sorted: the meta order must be kept
    _dump({b"label_names": names, b"num_vis": 3072}, d / "batches.meta")
    expect = {"train": ([], []), "test": ([], [])}
    for i, n in ((1, 5), (2, 4), (10, 3)):  # data_batch_10 sorts after 2 numerically
        batch, im, lab = _cifar_batch(n, i, b"labels")
        _dump(batch, d / f"data_batch_{i}")
        expect["train"][0].append(im)
        expect["train"][1].extend(lab)
    batch, im, lab = _cifar_batch(6, 99, b"labels")
    _dump(batch, d / "test_batch")
    expect["test"] = ([im], lab)
    (d / "readme.html").write_text("<html></html>")
    return {k: (np.concatenate(v[0]), v[1]) for k, v in expect.items()}


def test_cifar10_pickles(tmp_path):
    expect = _fake_cifar10(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-python.tar.gz").write_bytes(b"")  # as torchvision leaves it
    res = run(tmp_path / "raw", tmp_path / "out", formats=("memory", "dali"), workers=2)
    m = res.manifest
    assert m.classes == ["zebra", "ant", "moose"] and m.source_format == "cifar10-pickle"
    mean_tol, max_tol = jpeg_tolerance(m.jpeg_quality)
    for split, (images, labels) in expect.items():
        got, got_labels = memory(res.root, split)
        assert np.array_equal(got, images) and got_labels.tolist() == labels
        assert m.splits[split].class_counts == np.bincount(labels, minlength=3).tolist()
        shards = list(read_shards(res.root / split))
        assert [l for _, l in shards] == labels
        for (jpeg, _), img in zip(shards, images):  # encoded at q95: close, not exact
            d = np.abs(pil_rgb(jpeg).astype(int) - img)
            assert d.mean() <= mean_tol and d.max() <= max_tol
    np.testing.assert_allclose(m.mean, expect["train"][0].reshape(-1, 3).mean(0) / 255)
    assert verify(res.root, workers=1, progress=False) == []


def test_cifar10_pickles_resized(tmp_path):
    expect = _fake_cifar10(tmp_path / "raw")
    res = run(tmp_path / "raw", tmp_path / "out", formats=("memory",), resize=16, workers=2)
    got, labels = memory(res.root, "test")
    assert got.shape == (6, 16, 16, 3) and labels.tolist() == expect["test"][1]
    small = np.asarray(Image.fromarray(expect["test"][0][0]).resize((16, 16),
                                                                   Image.Resampling.BILINEAR))
    assert np.abs(got[0].astype(int) - small).max() <= 1


def test_symlinked_dirs_followed_without_loops(tmp_path):
    _folder(tmp_path / "elsewhere", classes=("x", "y"), per_class=1)
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "train" / "x").symlink_to(tmp_path / "elsewhere" / "train" / "x")
    (src / "train" / "y").symlink_to(tmp_path / "elsewhere" / "train" / "y")
    (src / "train" / "y" / "loop").symlink_to(src / "train" / "y")  # a cycle
    res = run(src, tmp_path / "out", formats=("memory",))
    assert res.manifest.classes == ["x", "y"] and res.manifest.splits["train"].count == 2


def test_cifar10_pickles_in_targz_like_the_official_download(tmp_path):
    expect = _fake_cifar10(tmp_path / "raw")
    archive = _tar(tmp_path / "raw" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz",
                   "w:gz", "cifar-10-batches-py")
    res = run(archive, tmp_path / "out", formats=("memory",))
    assert np.array_equal(memory(res.root, "train")[0], expect["train"][0])


def test_cifar100_pickles(tmp_path):
    d = tmp_path / "cifar-100-python"
    names = [f"c{i}".encode() for i in range(3)]
    _dump({b"fine_label_names": names, b"coarse_label_names": [b"x"]}, d / "meta")
    train, tim, tlab = _cifar_batch(7, 1, b"fine_labels")
    test, sim, slab = _cifar_batch(2, 2, b"fine_labels")
    _dump(train, d / "train")
    _dump(test, d / "test")
    res = run(d, tmp_path / "out", formats=("memory",))
    assert res.manifest.classes == ["c0", "c1", "c2"]
    assert res.manifest.source_format == "cifar100-pickle"
    got, labels = memory(res.root, "train")
    assert np.array_equal(got, tim) and labels.tolist() == tlab
    got, labels = memory(res.root, "test")
    assert np.array_equal(got, sim) and labels.tolist() == slab


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    _fake_cifar10(tmp_path / "raw")
    meta = tmp_path / "raw/cifar-10-batches-py/batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [Evil()]}, protocol=2))
    with pytest.raises(UserError, match=r"batches\.meta: not a CIFAR python pickle \(refusing"):
        run(tmp_path / "raw", tmp_path / "out", formats=("memory",))
    assert not (tmp_path / "pwned").exists()


def test_cifar_pickle_with_wrong_shape(tmp_path):
    _fake_cifar10(tmp_path / "raw")
    bad = tmp_path / "raw/cifar-10-batches-py/data_batch_2"
    _dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, bad)
    with pytest.raises(UserError, match=r"data_batch_2: not a CIFAR batch"):
        run(tmp_path / "raw", tmp_path / "out", formats=("memory",))


# ------------------------------------------------------------------ Tiny ImageNet


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n09", "n01", "n05"]  # the file's order, not sorted
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tthing\n")
    rng = np.random.default_rng(3)

    def img(path: Path, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (16, 16, 3), np.uint8)
        Image.fromarray(a).convert(mode).save(path, "JPEG")

    for w in wnids:
        for i in range(2):
            img(root / "train" / w / "images" / f"{w}_{i}.JPEG", "L" if i else "RGB")
        (root / "train" / w / f"{w}_boxes.txt").write_text("box\n")
    ann = []
    for i, w in enumerate(["n05", "n09", "n05", "n01"]):
        img(root / "val" / "images" / f"val_{i}.JPEG")
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    img(root / "test" / "images" / "test_0.JPEG")
    archive = tmp_path / "tiny.zip"
    _zip(root, archive, "tiny-imagenet-200")

    res = run(archive, tmp_path / "out")
    m = res.manifest
    assert m.classes == wnids and m.source_format == "tiny-imagenet"
    assert sorted(m.splits) == ["train", "val"]  # test/ has no labels
    assert any("test/ has no labels" in n for n in res.notes)
    assert memory(res.root, "train")[1].tolist() == [0, 0, 1, 1, 2, 2]
    assert m.splits["val"].class_counts == [1, 1, 2]
    # grey JPEGs become RGB with equal channels, and are re-encoded for DALI (not passed through)
    gray = memory(res.root, "train")[0][1]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert res.passthrough == {"train": 3, "val": 4}
    assert verify(res.root, workers=1, progress=False) == []


# ------------------------------------------------------------------ --classes


def test_classes_subset_keeps_dataset_order(tmp_path):
    _folder(tmp_path / "src", classes=("d", "a", "c", "b"), per_class=2)
    cls = tmp_path / "keep.txt"
    cls.write_text("# keep these\nc\n\na   \n")
    res = run(tmp_path / "src", tmp_path / "out", classes=read_classes_file(cls))
    assert res.manifest.classes == ["a", "c"]
    assert memory(res.root, "train")[1].tolist() == [0, 0, 1, 1]
    assert load_manifest(res.root).splits["test"].class_counts == [2, 2]

    expect = _fake_cifar10(tmp_path / "raw")  # pickles: the dataset's order, not the file's
    cls.write_text("moose\nzebra\n")
    res = run(tmp_path / "raw", tmp_path / "out", name="c", formats=("memory",),
              classes=read_classes_file(cls))
    assert res.manifest.classes == ["zebra", "moose"]
    keep = np.isin(expect["train"][1], [0, 2])
    got, labels = memory(res.root, "train")
    assert np.array_equal(got, expect["train"][0][keep])
    assert labels.tolist() == [{0: 0, 2: 1}[l] for l in np.asarray(expect["train"][1])[keep]]


def test_classes_file_errors(tmp_path):
    _folder(tmp_path / "src", per_class=1)
    cls = tmp_path / "keep.txt"
    cls.write_text("cat\nwolf\n")
    with pytest.raises(UserError, match=r"--classes: wolf not among the dataset's 3 classes"):
        run(tmp_path / "src", tmp_path / "out", classes=read_classes_file(cls))
    cls.write_text("\n# nothing\n")
    with pytest.raises(UserError, match=r"keep\.txt: no class names"):
        read_classes_file(cls)
    cls.write_text("cat\ncat\n")
    with pytest.raises(UserError, match=r"listed twice: cat"):
        read_classes_file(cls)
    with pytest.raises(UserError, match=r"nope\.txt: cannot read it"):
        read_classes_file(tmp_path / "nope.txt")
