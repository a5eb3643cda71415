"""Small real-image ImageFolders cut from the two photographs scikit-learn ships
(``sklearn.datasets.load_sample_images()``: china.jpg and flower.jpg, 427x640 RGB), for the
tests that need real pictures in a clone without ``../shared`` (no CIFAR-10 beside it).

Each class is a region of one photograph; a picture is a square crop of that region at a random
position and a random side, resized to 32x32 (the CIFAR presets and patch geometry apply
unchanged). The default is 4 classes of 125 train and 25 test pictures: 500 + 100, as many as
the CIFAR-10 subset the tests take from ``../shared``, so epochs and steps count the same. The
crops are drawn from a seeded generator: the same call writes the same pixels on every machine
(the PNG files are byte-identical; the JPEG files are as libjpeg encodes them, quality 75,
4:2:0, as the shared CIFAR-10 JPEG copy is).

    python tests/sample_images.py OUT [--format png|jpeg] [--train N] [--test N] [--seed S]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

# class -> (photograph, (left, top, right, bottom) in pixels of the 640x427 photograph)
CLASSES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "china_pagoda": ("china.jpg", (40, 0, 330, 427)),     # the tower: tiled roofs, red beams
    "china_lake": ("china.jpg", (330, 0, 640, 290)),      # sky, haze, water, far shore
    "flower_bloom": ("flower.jpg", (180, 80, 450, 370)),   # the dahlia's petals
    "flower_leaves": ("flower.jpg", (0, 0, 180, 427)),     # the dark green background
}
MIN_SIDE, MAX_SIDE = 40, 160  # crop side in pixels, before the resize
SIZE = 32
JPEG_QUALITY = 75


def _photographs() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).name: img for f, img in zip(data.filenames, data.images)}


def crops(per_split: dict[str, int], seed: int = 0, size: int = SIZE):
    """Yield (split, class, index, HxWx3 uint8) for ``per_split[split]`` crops of each class."""
    photos = _photographs()
    for s, (split, n) in enumerate(per_split.items()):
        for c, (cls, (photo, (x0, y0, x1, y1))) in enumerate(CLASSES.items()):
            rng = np.random.default_rng([seed, s, c])
            img = Image.fromarray(photos[photo])
            hi = min(MAX_SIDE, x1 - x0, y1 - y0)
            for i in range(n):
                side = int(rng.integers(MIN_SIDE, hi + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                y = int(rng.integers(y0, y1 - side + 1))
                crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
                yield split, cls, i, np.asarray(crop)


def build(out: Path, fmt: str = "png", train: int = 125, test: int = 25, seed: int = 0,
          size: int = SIZE) -> Path:
    """Write the ImageFolder ``out/{train,test}/<class>/<index>.{png,jpg}`` and return ``out``."""
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"format {fmt!r}: png or jpeg")
    out = Path(out)
    for split, cls, i, px in crops({"train": train, "test": test}, seed, size):
        dst = out / split / cls / f"{i:05d}.{'png' if fmt == 'png' else 'jpg'}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        if fmt == "png":
            Image.fromarray(px).save(tmp, "PNG")
        else:
            Image.fromarray(px).save(tmp, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
        os.replace(tmp, dst)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", choices=("png", "jpeg"), default="png")
    ap.add_argument("--train", type=int, default=125, help="train pictures per class")
    ap.add_argument("--test", type=int, default=25, help="test pictures per class")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.out, a.format, a.train, a.test, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
