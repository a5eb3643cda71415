"""tests/sample_images.py: the real-picture ImageFolder built from scikit-learn's two sample
photographs (the tests' data without ../shared) is what conftest.py promises: 4 classes, 500 +
100 pictures of 32x32 RGB, seeded (the same bytes from the same call), crops of the photograph
its class names, and PNG and JPEG copies of the same pixels."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

import sample_images


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _digest(root):
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in _files(root)}


def test_layout_counts_and_determinism(tmp_path):
    a = sample_images.build(tmp_path / "a", "png", train=5, test=2)
    for split, n in (("train", 5), ("test", 2)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(sample_images.CLASSES)
        for cls in sample_images.CLASSES:
            files = sorted((a / split / cls).iterdir())
            assert [f.name for f in files] == [f"{i:05d}.png" for i in range(n)]
            for f in files:
                with Image.open(f) as im:
                    assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    assert _digest(sample_images.build(tmp_path / "b", "png", train=5, test=2)) == _digest(a)
    other = _digest(sample_images.build(tmp_path / "c", "png", train=5, test=2, seed=1))
    assert other.keys() == _digest(a).keys() and other != _digest(a)
    # train and test are different crops
    assert (a / "train/china_lake/00000.png").read_bytes() != (a / "test/china_lake/00000.png").read_bytes()
    assert not list(a.rglob("*.tmp"))


def test_jpeg_copy_holds_the_same_pictures(tmp_path):
    png = sample_images.build(tmp_path / "png", "png", train=4, test=1)
    jpg = sample_images.build(tmp_path / "jpg", "jpeg", train=4, test=1)
    assert [f.replace(".png", ".jpg") for f in _files(png)] == _files(jpg)
    a = np.stack([np.asarray(Image.open(png / f), np.int16) for f in _files(png)])
    b = []
    for f in _files(jpg):
        with Image.open(jpg / f) as im:
            assert im.format == "JPEG" and im.size == (32, 32)
            b.append(np.asarray(im.convert("RGB"), np.int16))
    diff = np.abs(a[None] - np.stack(b)[:, None]).mean(axis=(2, 3, 4))  # (jpeg, png)
    # quality 75 on detailed 32 px crops: a few levels off, and nearest to its own PNG
    assert (diff.argmin(axis=1) == np.arange(len(a))).all() and 0 < diff.diagonal().max() < 16


def test_classes_are_distinct_regions_of_the_photographs():
    """Each class is a region of one of the two 427x640 photographs, large enough for the
    smallest crop; the classes' pictures differ in content (mean colour)."""
    photos = sample_images._photographs()
    assert {k: v.shape for k, v in photos.items()} == {"china.jpg": (427, 640, 3),
                                                       "flower.jpg": (427, 640, 3)}
    for cls, (photo, (x0, y0, x1, y1)) in sample_images.CLASSES.items():
        assert photo in photos and 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 427
        assert min(x1 - x0, y1 - y0) >= sample_images.MIN_SIDE
    got = list(sample_images.crops({"train": 3}, size=32))
    assert [(s, c, i) for s, c, i, _ in got] == [("train", c, i) for c in sample_images.CLASSES
                                                  for i in range(3)]
    # the classes differ in content: their mean colours are far apart
    means = {c: np.mean([px.reshape(-1, 3).mean(0) for s, cc, i, px in got if cc == c], 0)
             for c in sample_images.CLASSES}
    names = list(means)
    assert min(np.abs(means[a] - means[b]).max() for a in names for b in names if a < b) > 10
