"""tools/convert_datasets.py on real pictures (the CIFAR-10 subset or the sample-image crops of
conftest.py, PNG and JPEG) and generated ImageFolders: the outputs of
every format hold the same images and labels, the manifest says what they are, and --verify
passes on good data and catches tampering."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_tool
from pipeline.convert import ConvertOptions, convert, jpeg_tolerance, verify
from pipeline.errors import UserError
from pipeline.formats import (dali_shards, load_manifest, memory_images_path,
                              memory_labels_path, sha256_file)
from pipeline.shards import read_shards


def pil_rgb(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert("RGB"))


def run(source, out: Path, name: str = "ds", **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert(source, ConvertOptions(name=name, out=out, **kw))


def memory(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(memory_images_path(root, split)), np.load(memory_labels_path(root, split))


def shards(root: Path, split: str) -> list[tuple[bytes, int]]:
    return list(read_shards(root / split))


# ------------------------------------------------------------------ real pictures


@pytest.mark.parametrize("kind", ["default", "jpeg"])
def test_cifar_subset_all_formats_agree(kind, request, tmp_path):
    """The subset of the default (lossless PNG) archive, and of the JPEG copy: memory == the
    source files decoded by PIL; shards hold JPEG source files untouched and encode lossless
    ones once; ffcv raw is bit-exact."""
    if kind == "default":
        root, cifar_subset_dir = (request.getfixturevalue("cifar_subset_data"),
                                  request.getfixturevalue("cifar_subset_dir"))
    else:
        cifar_subset_dir = request.getfixturevalue("cifar_jpeg_subset_dir")
        root = run(cifar_subset_dir, tmp_path, name="cifar10-jpeg-subset", workers=2).root
    m = load_manifest(root)
    classes = sorted(p.name for p in (cifar_subset_dir / "train").iterdir())
    assert m.classes == classes and len(classes) >= 2
    assert m.formats == ["memory", "ffcv", "dali"] and m.source_format == "imagefolder"
    assert m.ffcv_encoding == "raw"  # 32 px <= 64: raw pixels by default
    counts = {split: [len(list((cifar_subset_dir / split / c).iterdir())) for c in classes]
              for split in ("train", "test")}
    assert {k: (v.count, v.shape, v.class_counts) for k, v in m.splits.items()} == {
        split: (sum(n), [32, 32, 3], n) for split, n in counts.items()}
    assert m.tool_version and m.skipped == [] and m.source == str(cifar_subset_dir.resolve())

    from pipeline.beton import read_beton
    for split in ("train", "test"):
        files = [f for c in classes for f in sorted((cifar_subset_dir / split / c).iterdir())]
        images, labels = memory(root, split)
        assert images.dtype == np.uint8 and images.shape == (len(files), 32, 32, 3)
        assert labels.dtype == np.int64
        assert labels.tolist() == [i for i, n in enumerate(counts[split]) for _ in range(n)]
        # memory == the source JPEGs decoded by PIL, exactly, in class-major sorted order
        assert np.array_equal(images, np.stack([pil_rgb(f) for f in files]))
        samples = shards(root, split)
        if files[0].suffix == ".jpg":  # dali: baseline RGB JPEGs are stored untouched
            assert [b for b, _ in samples] == [f.read_bytes() for f in files]
        else:  # lossless sources are JPEG-encoded once, at the converter's quality
            decoded = np.stack([pil_rgb(io.BytesIO(b)) for b, _ in samples]).astype(np.int64)
            assert 0 < np.abs(decoded - images).mean() < 4
        assert [l for _, l in samples] == labels.tolist()
        # ffcv raw: bit-exact
        fimages, flabels = read_beton(root / f"{split}.beton")
        assert np.array_equal(fimages, images) and np.array_equal(flabels, labels)

    train = memory(root, "train")[0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(m.mean, train.mean(0), atol=1e-9)
    np.testing.assert_allclose(m.std, train.std(0), atol=1e-9)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json"}
    assert all(sha256_file(root / rel) == h for rel, h in m.files.items())
    assert verify(root, workers=1, progress=False) == []


def test_verify_catches_tampering(cifar_subset_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cifar_subset_data, root)
    assert verify(root, workers=2, progress=False) == []

    images, _ = memory(root, "train")
    n = len(images)  # 500
    images[7] = 255 - images[7]  # one image replaced by its negative
    np.save(memory_images_path(root, "train"), images)
    (root / "test" / "stray.txt").write_text("x")
    problems = verify(root, workers=1, progress=False)
    text = "\n".join(problems)
    assert "train.u8.npy: sha256 differs" in text
    assert "stray.txt: not listed in the manifest" in text
    assert f"train.beton: 1 of {n} images differ from memory (must be equal; first image 7" in text
    assert f"train/ shards: 1 of {n} images differ from memory" in text
    assert all("\n" not in p for p in problems)

    (root / "test.labels.npy").unlink()
    assert any("test.labels.npy: listed in the manifest but missing" in p
               for p in verify(root, workers=1, progress=False))


def test_verify_labels_and_counts(cifar_subset_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cifar_subset_data, root, ignore=shutil.ignore_patterns("*.beton"))
    m = json.loads((root / "manifest.json").read_text())
    m["formats"] = ["memory", "dali"]
    m["files"] = {k: v for k, v in m["files"].items() if not k.endswith(".beton")}
    (root / "manifest.json").write_text(json.dumps(m))
    assert verify(root, workers=1, progress=False) == []
    _, labels = memory(root, "test")
    labels[0] = 3  # a wrong label: counts and cross-format labels no longer match
    np.save(memory_labels_path(root, "test"), labels)
    text = "\n".join(verify(root, workers=1, progress=False))
    assert "test.labels.npy: sha256 differs" in text
    assert "test.labels.npy: class counts" in text
    assert "test/ shards: 1 labels differ from memory" in text


# ------------------------------------------------------------------ generated ImageFolders


def _save(path: Path, img: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def _mixed_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """Solid-colour images in many modes, sizes and file types; file -> expected RGB."""
    expect = {}

    def add(rel, img, fmt, rgb, **kw):
        _save(root / rel, img, fmt, **kw)
        expect[rel] = rgb

    add("train/a/rgb.png", Image.new("RGB", (40, 30), (10, 200, 30)), "PNG", (10, 200, 30))
    add("train/a/l.png", Image.new("L", (30, 50), 77), "PNG", (77, 77, 77))
    add("train/a/la.png", Image.new("LA", (33, 33), (90, 10)), "PNG", (90, 90, 90))
    add("train/a/rgba.png", Image.new("RGBA", (64, 48), (1, 2, 3, 0)), "PNG", (1, 2, 3))
    p = Image.new("P", (20, 24), 1)
    p.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    add("train/b/p.png", p, "PNG", (250, 100, 5))
    add("train/b/p.gif", p, "GIF", (250, 100, 5))
    i16 = Image.fromarray(np.full((18, 26), 200 * 257, np.uint16))
    assert i16.mode.startswith("I;16")
    add("train/b/i16.png", i16, "PNG", (200, 200, 200))
    add("train/b/cmyk.tif", Image.new("CMYK", (24, 24), (55, 0, 255, 0)), "TIFF", (200, 255, 0))
    add("train/b/cmyk.jpg", Image.new("CMYK", (24, 24), (55, 0, 255, 0)), "JPEG", (200, 255, 0),
        quality=100)
    add("test/a/rgb.jpg", Image.new("RGB", (100, 60), (120, 60, 30)), "JPEG", (120, 60, 30),
        quality=100)
    add("test/b/gray.jpg", Image.new("L", (30, 45), 150), "JPEG", (150, 150, 150), quality=100)
    add("test/b/rgb.bmp", Image.new("RGB", (17, 17), (0, 0, 255)), "BMP", (0, 0, 255))
    return expect


def test_mixed_modes_and_sizes_with_resize(tmp_path):
    src = tmp_path / "src"
    expect = _mixed_folder(src)
    res = run(src, tmp_path / "out", formats=("memory", "dali"), resize=16, workers=2)
    root = res.root
    m = res.manifest
    assert m.classes == ["a", "b"] and m.resize == 16
    assert m.splits["train"].shape == [16, 16, 3] and m.splits["train"].class_counts == [4, 5]
    for split in ("train", "test"):
        files = sorted((k for k in expect if k.startswith(split + "/")),
                       key=lambda k: (k.split("/")[1], k))
        images, labels = memory(root, split)
        assert images.shape == (len(files), 16, 16, 3)
        assert labels.tolist() == [ord(f.split("/")[1]) - ord("a") for f in files]
        for img, f in zip(images, files):
            # solid colours stay solid through resize + crop; JPEG sources within a level or two
            tol = 3 if f.endswith(".jpg") else 0
            assert np.abs(img.astype(int) - expect[f]).max() <= tol, f
        samples = shards(root, split)
        mean_tol, max_tol = jpeg_tolerance(m.jpeg_quality)
        for (jpeg, label), img in zip(samples, images):
            d = np.abs(pil_rgb(jpeg).astype(int) - img)
            assert d.mean() <= mean_tol and d.max() <= max_tol
    assert sum(res.passthrough.values()) == 0  # everything resized: nothing stored untouched
    assert verify(root, workers=1, progress=False) == []


def test_resize_geometry_shorter_side_then_center_crop(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)  # (H, W, 3): wide, left half red, right half blue
    a[:, :32, 0] = 255
    a[:, 32:, 2] = 255
    a[:, 28:36] = (0, 255, 0)  # a green band around the middle: must survive the crop
    _save(tmp_path / "src/train/x/wide.png", Image.fromarray(a), "PNG")
    res = run(tmp_path / "src", tmp_path / "out", formats=("memory",), resize=16)
    (img,), _ = memory(res.root, "train")
    # shorter side 32 -> 16 makes it 32 x 16; the crop keeps columns 8..23 of that
    assert img.shape == (16, 16, 3)
    assert tuple(img[8, 1]) == (255, 0, 0) and tuple(img[8, 14]) == (0, 0, 255)
    assert img[8, 7, 1] == 255 and img[8, 8, 1] == 255


def test_dali_passthrough_only_for_untouched_baseline_rgb_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (32, 32, 3), np.uint8)
    src = tmp_path / "src"
    _save(src / "train/c/1_baseline.jpg", Image.fromarray(px), "JPEG", quality=80)
    _save(src / "train/c/2_progressive.jpg", Image.fromarray(px), "JPEG", quality=80,
          progressive=True)
    _save(src / "train/c/3_gray.jpg", Image.fromarray(px[..., 0]), "JPEG", quality=80)
    _save(src / "train/c/4_png.png", Image.fromarray(px), "PNG")
    res = run(src, tmp_path / "out", formats=("memory", "dali"), jpeg_quality=97)
    files = sorted((src / "train/c").iterdir())
    samples = shards(res.root, "train")
    images, _ = memory(res.root, "train")
    assert samples[0][0] == files[0].read_bytes()  # untouched
    assert all(s[0] != f.read_bytes() for s, f in zip(samples[1:], files[1:]))  # re-encoded
    assert res.passthrough == {"train": 1}
    assert np.array_equal(images[0], pil_rgb(files[0]))
    assert np.array_equal(images[3], px)  # PNG: lossless
    for (jpeg, _), img in zip(samples, images):
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.mode == "RGB" and not im.info.get("progressive")
        assert np.abs(pil_rgb(jpeg).astype(int) - img).mean() < 2


def test_variable_sizes_need_resize_for_memory_only(tmp_path):
    src = tmp_path / "src"
    _save(src / "train/c/a.png", Image.new("RGB", (10, 12), (1, 2, 3)), "PNG")
    _save(src / "train/c/b.png", Image.new("RGB", (20, 12), (4, 5, 6)), "PNG")
    with pytest.raises(UserError, match=r"b\.png: image is 20x12 but .*a\.png is 10x12; .*resize"):
        run(src, tmp_path / "out", formats=("memory", "dali"))
    assert not (tmp_path / "out" / "ds").exists()
    res = run(src, tmp_path / "out", formats=("dali",))
    assert res.manifest.splits["train"].shape is None
    assert [pil_rgb(j).shape for j, _ in shards(res.root, "train")] == [(12, 10, 3), (12, 20, 3)]
    assert verify(res.root, workers=1, progress=False) == []


def test_ffcv_jpg_encoding_for_large_images(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for i in range(3):
        base = rng.integers(0, 256, (10, 10, 3), np.uint8)
        img = Image.fromarray(base).resize((96, 96), Image.Resampling.BILINEAR)  # smooth
        _save(src / f"train/c{i % 2}/{i}.png", img, "PNG")
    res = run(src, tmp_path / "out")  # auto: 96 px > 64 -> jpg
    assert res.manifest.ffcv_encoding == "jpg"
    from pipeline.beton import read_beton
    fimages, flabels = read_beton(res.root / "train.beton")
    images, labels = memory(res.root, "train")
    assert np.array_equal(flabels, labels)
    assert 0 < np.abs(fimages.astype(int) - images).mean() < 3
    assert verify(res.root, workers=1, progress=False) == []


def test_cli_convert_then_verify(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _save(src / f"train/k{i % 2}/{i}.png", Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)), "PNG")
        _save(src / f"val/k{i % 2}/{i}.png", Image.new("RGB", (8, 8), (i, i, i)), "PNG")
    out = tmp_path / "data"
    proc = run_tool("tools/convert_datasets.py", str(src), "--name", "tiny", "--out", str(out),
                    "--formats", "memory,dali", "--workers", "2")
    assert "converted 8 images (train 4, val 4; 2 classes)" in proc.stdout
    assert "img/s" in proc.stdout and "memory" in proc.stdout and "dali" in proc.stdout
    assert sorted(load_manifest(out / "tiny").splits) == ["train", "val"]
    assert [p.name for p in out.iterdir()] == ["tiny"]  # no temp dir left
    assert len(dali_shards(out / "tiny", "val")) == 1
    ok = run_tool("tools/convert_datasets.py", "--verify", str(out / "tiny"))
    assert "ok" in ok.stdout
    np.save(memory_images_path(out / "tiny", "val"), np.zeros((4, 8, 8, 3), np.uint8) + 99)
    bad = run_tool("tools/convert_datasets.py", "--verify", str(out / "tiny"), check=False)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert any("val.u8.npy: sha256 differs" in l for l in lines)
    assert any("val/ shards: 4 of 4 images differ from memory" in l for l in lines)
    assert lines[-1].endswith("problem(s)")


@pytest.mark.slow
@pytest.mark.timeout(360)  # 84-99 s measured on a busy 2-core CPU
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_full_shared_cifar10_archive(tmp_path, kind):
    """Both shared archives convert whole; the lossless one holds the first 1,000 test images
    (86-112 per class), the JPEG copy all 10,000."""
    from conftest import NO_SHARED, SHARED_CIFAR_JPEG, SHARED_CIFAR_PNG
    archive = SHARED_CIFAR_PNG if kind == "png" else SHARED_CIFAR_JPEG
    if NO_SHARED or not archive.is_file():
        pytest.skip(f"about CIFAR-10 itself: needs ../shared/datasets/{archive.name}"
                    + (" (EMP_SSL_NO_SHARED is set)" if NO_SHARED else ""))
    res = run(archive, tmp_path, name="cifar10", workers=2)
    m = res.manifest
    test = 1000 if kind == "png" else 10000
    assert {k: v.count for k, v in m.splits.items()} == {"train": 50000, "test": test}
    assert m.splits["train"].class_counts == [5000] * 10 and sum(m.splits["test"].class_counts) == test
    if kind == "png":
        assert min(m.splits["test"].class_counts) >= 86 and max(m.splits["test"].class_counts) <= 112
    else:
        assert res.passthrough["train"] == 50000
    assert verify(res.root, progress=False) == []


def test_converted_files_have_a_plain_open_mode(cifar_subset_data):
    """Every writer (memory .npy, .beton, shards, manifest) leaves its file with the mode a
    plain open() gives, never a temp file's 0600."""
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in cifar_subset_data.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".npy", ".beton", ".tar", ".idx", ".json"}
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~mask}
