"""Convert a raw image dataset into data/NAME (memory .npy, FFCV .beton, DALI shards) or verify it.

    python tools/convert_datasets.py SOURCE --name NAME [--out data] [--formats memory,ffcv,dali]
        [--resize SIDE] [--workers N] [--overwrite] [--skip-bad] [--download] [--classes FILE]
        [--ffcv-encoding raw|jpg|auto] [--jpeg-quality Q] [--timings-json FILE] [--resume]
    python tools/convert_datasets.py --verify data/NAME

The library code is the package pipeline/convert/; this file is the command line. Bad input
prints `convert_datasets: error: <message>` and exits 2; --verify exits 1 when it finds
problems; Ctrl-C / SIGTERM / SIGHUP exit 130 / 143 / 129, keeping the finished chunks for
--resume.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.convert import (  # noqa: E402
    DEFAULT_JPEG_QUALITY, FFCV_RAW_MAX_SIDE, SAMPLES_PER_SHARD, ConvertOptions, Interrupted,
    convert, default_workers, download_cifar, read_classes_file, verify)
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import FORMATS, write_json_atomic  # noqa: E402

PROG = "convert_datasets"
EPILOG = """\
SOURCE layouts (a directory, or a .tar/.tar.gz/.tar.xz/.zip of one, read in place; one
wrapping top-level directory is fine):
  CIFAR-10/100 python pickles   cifar-10-batches-py/, cifar-100-python/
  Tiny ImageNet                 wnids.txt, train/<wnid>/images/*, val/val_annotations.txt
  ImageFolder                   <split>/<class>/<image>, splits train, val, test
Class order: sorted class directory names, or the dataset's own (CIFAR meta, wnids.txt).
Any PIL-readable image mode becomes RGB (16-bit scaled to 8, alpha dropped).

Writes OUT/NAME/: manifest.json, <split>.u8.npy + <split>.labels.npy (memory),
<split>.beton (ffcv), <split>/shard-*.tar + .idx (dali). Every format is written as images
are decoded (memory: workers x image size, not the number of images), into OUT/.NAME.tmp-*,
renamed to OUT/NAME once complete. A run stopped by a signal or a crash keeps its finished
chunks (--samples-per-shard images each) there; --resume continues them, to the same bytes an
uninterrupted run writes. Exit codes: 0 ok, 1 --verify found problems, 2 bad input (one line
on stderr), 128+N stopped by signal N.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="dataset directory or archive; with --download: cifar10 or cifar100")
    p.add_argument("--verify", metavar="DIR", type=Path,
                   help="re-read a converted data/NAME: checksums, counts, labels, and that the "
                        "formats decode to the same pixels (exact for raw, JPEG tolerance else)")
    g = p.add_argument_group("output")
    g.add_argument("--name", help="dataset name: writes OUT/NAME/")
    g.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    g.add_argument("--formats", default=",".join(FORMATS),
                   help="comma list of memory,ffcv,dali (default: all three)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME")
    g.add_argument("--timings-json", type=Path, metavar="FILE",
                   help="also write the timings (images/s per format), hardware, versions and "
                        "this command as JSON (with --verify: add the verify timing to FILE)")
    g = p.add_argument_group("images")
    g.add_argument("--resize", type=int, metavar="SIDE",
                   help="resize the shorter side to SIDE (bilinear, antialiased), then center "
                        "crop SIDE x SIDE; required by the memory format when sizes differ")
    g.add_argument("--ffcv-encoding", choices=("raw", "jpg", "auto"), default="auto",
                   help=f"how the .beton stores pixels; auto: raw when every side is <= "
                        f"{FFCV_RAW_MAX_SIDE} px, else jpg (default: auto)")
    g.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                   help="quality of JPEGs we encode (dali shards when a source image is not an "
                        "untouched baseline RGB JPEG; ffcv jpg) (default: %(default)s)")
    g.add_argument("--classes", type=Path, metavar="FILE",
                   help="keep only the classes listed in FILE (one name a line), in the "
                        "dataset's order; labels renumbered 0..k-1")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="decode processes (default: all cores, %(default)s)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip corrupt/non-image files (listed in manifest.skipped) instead of "
                        "stopping at the first")
    g.add_argument("--download", action="store_true",
                   help="SOURCE is cifar10 or cifar100: fetch it with torchvision into "
                        "OUT/.downloads first")
    g.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD,
                   help="images per DALI shard, and per checkpoint a --resume continues from "
                        "(default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue the partial conversion an interrupted or crashed run left in "
                        "OUT/.NAME.tmp-* (same SOURCE and flags; --skip-bad may be added); "
                        "finished chunks are not redone. Without one, starts from the beginning")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def hardware_and_versions() -> dict:
    from importlib import metadata

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    versions = {"python": platform.python_version()}
    for pkg in ("numpy", "pillow", "ffcv", "nvidia-dali-cuda130", "opencv-python", "tqdm"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "cpus_usable": default_workers(), "cpu_model": cpu,
            "ram_gib": round(mem, 1), "platform": platform.platform(), "versions": versions,
            "loadavg_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()]}


def peak_rss_mib() -> float:
    """This process' peak resident memory so far, MiB (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _command(argv: list[str]) -> str:
    return shlex.join(["python", "tools/convert_datasets.py", *argv])


def run_convert(args, argv: list[str]) -> int:
    if not args.source:
        raise UserError("SOURCE: missing; give a dataset path (or cifar10/cifar100 with "
                        "--download), or --verify DIR")
    if not args.name:
        raise UserError("--name: missing; the dataset is written to OUT/NAME")
    source, label = args.source, None
    if args.download:
        source = download_cifar(args.source, args.out / ".downloads")
        label = f"{args.source} (torchvision download, {source})"
    opts = ConvertOptions(
        name=args.name, out=args.out,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        resize=args.resize, workers=args.workers, overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        classes=read_classes_file(args.classes) if args.classes else None,
        classes_flag=f"--classes {args.classes}", ffcv_encoding=args.ffcv_encoding,
        jpeg_quality=args.jpeg_quality, samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress, source_label=label, resume=args.resume)
    res = convert(source, opts)
    m, s = res.manifest, res.seconds
    rates = res.images_per_s()
    counts = ", ".join(f"{k} {v.count}" for k, v in m.splits.items())
    print(f"converted {res.images} images ({counts}; {len(m.classes)} classes) from "
          f"{m.source_format} in {s['total']:.1f} s -> {res.root}")
    if res.decoded != res.images:
        done = ", ".join(f"{k} {v}" for k, v in res.resumed.items())
        print(f"  resumed: {res.images - res.decoded} images were done before ({done}); "
              f"{res.decoded} decoded now (rates below are for those)")
    print(f"  decode      {s['decode']:8.2f} s  {rates['decode']:10.0f} img/s  "
          f"({opts.workers} workers)")
    for fmt in m.formats:
        extra = ""
        if fmt == "ffcv":
            extra = f"  ({m.ffcv_encoding})"
        if fmt == "dali":
            extra = (f"  ({sum(res.passthrough.values())} of {res.images} JPEGs stored untouched, "
                     f"others encoded at quality {m.jpeg_quality})")
        print(f"  {fmt:<10}  {s[fmt]:8.2f} s  {rates[fmt + '_write']:10.0f} img/s write, "
              f"{rates[fmt + '_end_to_end']:8.0f} img/s with decode{extra}")
    print(f"  total       {s['total']:8.2f} s  {rates['total']:10.0f} img/s")
    for note in res.notes:
        print(f"  note: {note}")
    if m.skipped:
        print(f"  skipped {len(m.skipped)} bad files (listed in manifest.json 'skipped')")
    if args.timings_json:
        write_json_atomic(args.timings_json, {
            "command": _command(argv), "what": "tools/convert_datasets.py conversion throughput",
            "hardware": hardware_and_versions(), "workers": opts.workers,
            "dataset": {"source": m.source, "source_format": m.source_format,
                        "images": res.images,
                        "splits": {k: v.count for k, v in m.splits.items()},
                        "shape": next(iter(m.splits.values())).shape,
                        "formats": m.formats, "ffcv_encoding": m.ffcv_encoding,
                        "dali_jpegs_untouched": res.passthrough},
            "seconds": {k: round(v, 3) for k, v in s.items()},
            "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "images_decoded": res.decoded, "peak_rss_mib": peak_rss_mib(),
            "notes": "decode = read + decode (+ JPEG encode where needed) in a Pool, shared by "
                     "all formats; <fmt>_write = that writer alone; <fmt>_end_to_end = "
                     "plan + decode + that writer, i.e. converting to that format only"})
        print(f"  timings -> {args.timings_json}")
    return 0


def run_verify(args, argv: list[str]) -> int:
    import time

    t = time.perf_counter()
    problems = verify(args.verify, workers=args.workers, progress=not args.no_progress)
    wall = time.perf_counter() - t
    for p in problems:
        print(f"{PROG}: verify: {p}", file=sys.stderr)
    if args.timings_json:
        path = args.timings_json
        report = {}
        if path.is_file():
            try:
                report = json.loads(path.read_text())
            except ValueError:
                report = {}
        report["verify"] = {"command": _command(argv), "seconds": round(wall, 3),
                            "problems": len(problems)}
        write_json_atomic(path, report)
    if problems:
        print(f"{PROG}: verify: {args.verify}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"verify: {args.verify}: ok ({wall:.1f} s)")
    return 0


_SIGNALLED: list[int] = []  # SIGTERM / SIGHUP received (as a program)


def _on_signal(signum, frame):
    """SIGTERM or SIGHUP: stop where the program is, as on Ctrl-C (finished chunks are kept);
    a second one does not interrupt the clean-up (SIGKILL does)."""
    _SIGNALLED.append(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.verify is not None:
            if args.source:
                raise UserError("--verify DIR takes no SOURCE")
            return run_verify(args, argv)
        return run_convert(args, argv)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = _SIGNALLED[0] if _SIGNALLED else signal.SIGINT
        what = "interrupted" if not _SIGNALLED else f"stopped by {signal.Signals(signum).name}"
        kept = str(e) if isinstance(e, Interrupted) else "nothing was left behind under the output"
        print(f"{PROG}: {what}; {kept}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGHUP):  # stop cleanly on kill / a closed terminal
        signal.signal(_sig, _on_signal)
    sys.exit(main())
