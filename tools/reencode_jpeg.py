"""A converted dataset re-encoded through JPEG at a chosen quality, as an ImageFolder .tar.

    python tools/reencode_jpeg.py data/cifar10 runs/cifar10_q50.tar --quality 50 \
        --convert-to data/cifar10_q50

(without --convert-to it stops at the .tar, which tools/convert_datasets.py converts).

What it is for: the only CIFAR-10 in this workplace is a JPEG re-encoding (quality 75, 4:2:0
chroma) of the lossless original the paper trained on, and our accuracies sit below the
paper's. Training the same recipe on copies degraded further (quality 50, 30, ...) gives the
accuracy's slope against JPEG loss: a dose-response that says whether the q75 copy alone can
explain the gap. Every image of every split in the manifest (or the first --max-per-class
of each class) is decoded from the memory format, encoded with PIL at --quality and
--subsampling, and stored as <split>/<class>/<index>.jpg in an uncompressed tar, written to a
temp file and renamed. The pixel error of the re-encoding (mean absolute and PSNR against
the input pixels) is printed per split, and kept in the JSON given by --stats. With
--convert-to DIR the tar is then converted (memory format only: what training reads) into
DIR, as tools/convert_datasets.py would, and removed (kept if the conversion fails).
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from pipeline.convert import (ConvertOptions, convert, decode_image, encode_jpeg,  # noqa: E402
                              validate_name)
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import atomic_path, load_manifest, write_json_atomic  # noqa: E402
from pipeline.sources.memory import load_memory_arrays  # noqa: E402

SUBSAMPLING = {"444": 0, "422": 1, "420": 2}  # PIL's codes


def jpeg_roundtrip(img: np.ndarray, quality: int, subsampling: str) -> tuple[bytes, np.ndarray]:
    """uint8 (H, W, 3) -> (JPEG bytes, the uint8 (H, W, 3) pixels they decode to), with the
    converter's own encoder and decoder."""
    data = encode_jpeg(img, quality, SUBSAMPLING[subsampling])
    return data, decode_image(data)[0]


def _selected(labels: np.ndarray, max_per_class: int) -> np.ndarray:
    if not max_per_class:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return np.flatnonzero(keep)


def reencode(src: Path, out: Path, quality: int, subsampling: str, max_per_class: int = 0) -> dict:
    """Write the tar; return per-split statistics {split: {images, mae, psnr_db, bytes}}."""
    manifest = load_manifest(src)
    stats = {}
    with atomic_path(out) as tmp, tarfile.open(tmp, "w") as tar:
        for split in manifest.splits:
            images, labels = load_memory_arrays(src, split)  # (N, H, W, 3) uint8, (N,)
            idx = _selected(labels, max_per_class)
            abs_err, sq_err, nbytes = 0.0, 0.0, 0
            for i in idx:
                img = np.asarray(images[i])
                data, back = jpeg_roundtrip(img, quality, subsampling)
                diff = back.astype(np.float64) - img
                abs_err += np.abs(diff).mean()
                sq_err += (diff ** 2).mean()
                nbytes += len(data)
                info = tarfile.TarInfo(f"{split}/{manifest.classes[labels[i]]}/{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            n = max(1, len(idx))
            mse = sq_err / n
            stats[split] = dict(images=int(len(idx)), mae=abs_err / n, bytes=nbytes,
                                psnr_db=None if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
            print(f"{split}: {len(idx)} images, quality {quality} {subsampling}: mean abs error "
                  f"{stats[split]['mae']:.2f}/255, PSNR {stats[split]['psnr_db'] or float('inf'):.1f} dB, "
                  f"{nbytes / n:.0f} B/image", flush=True)
    return stats


def _check_convert_to(src: Path, out: Path, dest: Path) -> None:
    """--convert-to must name a new dataset directory apart from SRC and from OUT's folders."""
    try:
        validate_name(dest.name)
    except UserError:
        raise UserError(f"--convert-to {dest}: its last part names the dataset; give a plain "
                        "directory name (no '/' or '\\', no leading '.', no surrounding spaces)") from None
    d, o, s = dest.resolve(), out.resolve(), src.resolve()
    if d == o or d in o.parents:
        raise UserError(f"--convert-to {dest}: would hold or be OUT ({out}); put the tar elsewhere")
    if d == s or d in s.parents:
        raise UserError(f"--convert-to {dest}: would replace SRC ({src}); choose another directory")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("src", type=Path, help="converted dataset dir with the memory format (data/cifar10)")
    ap.add_argument("out", type=Path, help="output .tar (an ImageFolder tools/convert_datasets.py reads)")
    ap.add_argument("--quality", type=int, required=True, help="JPEG quality, 1..100")
    ap.add_argument("--subsampling", default="420", choices=sorted(SUBSAMPLING),
                    help="chroma subsampling (default 420, as the q75 CIFAR-10 copy here)")
    ap.add_argument("--max-per-class", type=int, default=0, help="first K images per class (0: all)")
    ap.add_argument("--stats", type=Path, help="also write the per-split error statistics as JSON")
    ap.add_argument("--convert-to", type=Path, metavar="DIR",
                    help="then convert the tar into DIR (memory format; DIR's name is the dataset "
                         "name) and remove the tar")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT (and DIR) if they exist")
    args = ap.parse_args(argv[1:])
    try:
        if not 1 <= args.quality <= 100:
            raise UserError(f"--quality {args.quality}: must be in 1..100")
        if args.max_per_class < 0:
            raise UserError(f"--max-per-class {args.max_per_class}: must be >= 0")
        if args.out.suffix != ".tar":
            raise UserError(f"{args.out}: give a .tar path (an uncompressed ImageFolder archive)")
        for path, flag in ((args.out, "OUT"), (args.convert_to, "--convert-to")):
            if path is not None and (path.exists() or path.is_symlink()) and not args.overwrite:
                raise UserError(f"{flag} {path}: exists; pass --overwrite or choose another path")
        if args.convert_to is not None:
            _check_convert_to(args.src, args.out, args.convert_to)
        stats = reencode(args.src, args.out, args.quality, args.subsampling, args.max_per_class)
        if args.stats:
            write_json_atomic(args.stats, dict(src=str(args.src), quality=args.quality,
                                               subsampling=args.subsampling, splits=stats,
                                               **environment()))
        print(f"wrote {args.out}")
        if args.convert_to is not None:
            dest = args.convert_to
            label = (f"{args.src} re-encoded at JPEG quality {args.quality} {args.subsampling} "
                     "(tools/reencode_jpeg.py)")
            try:
                convert(args.out, ConvertOptions(name=dest.name, out=dest.parent, formats=("memory",),
                                                 overwrite=args.overwrite, progress=False,
                                                 source_label=label))
            except (UserError, OSError) as e:
                raise UserError(f"--convert-to {dest}: conversion failed ({e}); the re-encoded tar "
                                f"is kept at {args.out}") from None
            args.out.unlink()
            print(f"converted into {dest} (memory format); removed {args.out}")
    except UserError as e:
        print(f"reencode_jpeg: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
