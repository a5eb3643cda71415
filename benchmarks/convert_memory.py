"""Conversion at scale: peak resident memory and images/s of tools/convert_datasets.py on an
ImageFolder of N and then 10 N large JPEGs -- the peak must not grow with N.

    python benchmarks/convert_memory.py                                   # 3,000 and 30,000 images
    python benchmarks/convert_memory.py --sizes 3000,9000,30000 --baseline e05ae46 --baseline-max 9000

Images: the lossless CIFAR-10 train PNGs (--source, default ../shared/datasets/cifar10-png.tar.xz,
or any ImageFolder directory/archive) upscaled to --side (256) px, bicubic, saved as JPEG q90
(4:2:0), N/10 a class (N/classes for a directory), the first ones of each class: every size holds the images of the smaller
ones. Each size is converted by a fresh process (all three formats, --workers), which reports:

    peak_rss_main_mib     the converting process' peak resident memory (getrusage: exact). It
                          includes ~1 GB that importing FFCV (torch, numba, OpenCV) maps. (A
                          forked worker's own figure starts at its parent's peak -- Linux copies
                          the high-water mark at fork -- so it is not reported.)
    peak_pss_tree_mib     the largest sum over the process tree (converter + workers) of PSS,
                          shared pages split between the processes sharing them, sampled every
                          --poll s (so it may miss a short peak)
    images_per_s          images / the conversion's own wall time (tools' --timings-json total)
    images_bytes_mib      the decoded pixels + JPEGs of the split: what a converter that holds a
                          split in memory must hold (the baseline's design)

and growth_mib = peak(largest N) - peak(smallest N) per figure. --baseline REV converts the same
folders with the converter of git revision REV (git archive of pipeline/ and tools/) side by
side, up to --baseline-max images (a converter that holds a split needs its images' bytes).
Writes JSON to --json or benchmarks/results/convert_memory_<hostkind>_<date>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, results_path, write_json  # noqa: E402

SHARED_PNG = ROOT.parent / "shared" / "datasets" / "cifar10-png.tar.xz"
# The child: run a converter's CLI in this process, then report its own peak RSS (ru_maxrss,
# KiB on Linux) to the file named by $CONVERT_RUSAGE.
CHILD = """\
import json, os, resource, runpy, sys
tool = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(tool, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
with open(os.environ["CONVERT_RUSAGE"], "w") as f:
    json.dump({"exit": code, "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
sys.exit(code)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="3000,30000", help="images per conversion, comma-separated")
    p.add_argument("--side", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--source", default=str(SHARED_PNG),
                   help="ImageFolder directory or archive whose train/ images are upscaled")
    p.add_argument("--formats", default="memory,ffcv,dali")
    p.add_argument("--workers", type=int, default=2, help="decode workers of the converter")
    p.add_argument("--baseline", default="", metavar="REV",
                   help="also run the converter of this git revision on the same folders")
    p.add_argument("--baseline-max", type=int, default=0, metavar="N",
                   help="run the baseline only up to N images (it holds them all in memory); "
                        "0 = every size")
    p.add_argument("--work", default=str(ROOT / "data" / "convert_memory"),
                   help="scratch directory (the folders are kept for reruns; outputs are not)")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between PSS samples")
    p.add_argument("--json", default="", help="output path (default benchmarks/results/...)")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the image folders


def _upscale(job: tuple[bytes, str, int]) -> int:
    """Decode one image, upscale to side x side, write it as JPEG q90; its size in bytes."""
    from PIL import Image

    data, dst, side = job
    with Image.open(io.BytesIO(data)) as im:
        big = im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    Path(dst).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def _train_images(source: Path, per_class: int):
    """(class, name, bytes) of the first ``per_class`` train images of each class, class-major
    sorted by name, from an ImageFolder directory or a tar of one."""
    if source.is_dir():
        train = next(p for p in [source / "train", *source.glob("*/train")] if p.is_dir())
        for cls in sorted(p.name for p in train.iterdir() if p.is_dir()):
            for f in sorted((train / cls).iterdir())[:per_class]:
                yield cls, f.name, f.read_bytes()
        return
    taken: dict[str, list] = {}
    with tarfile.open(source, "r|*") as tf:  # one pass; members in archive order
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            got = taken.setdefault(parts[-2], [])
            if len(got) < per_class:
                got.append((parts[-1], tf.extractfile(m).read()))
    for cls in sorted(taken):
        for name, data in sorted(taken[cls]):
            yield cls, name, data


def make_folders(source: Path, sizes: list[int], side: int, work: Path,
                 workers: int) -> dict[int, tuple[Path, int]]:
    """ImageFolder per size (train/<class>/*.jpg), the smaller ones hard links into the
    largest; {size: (folder, JPEG bytes in it)}."""
    big = max(sizes)
    classes = 10  # CIFAR-10 in a tar; a directory says how many it holds
    if source.is_dir():
        train = next(p for p in [source / "train", *source.glob("*/train")] if p.is_dir())
        classes = sum(p.is_dir() for p in train.iterdir())
    root = work / f"jpeg{side}_{big}"
    done = root / ".complete"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        jobs = []
        for cls, name, data in _train_images(source, -(-big // classes)):
            dst = root / "full" / "train" / cls / (Path(name).stem + ".jpg")
            dst.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((data, str(dst), side))
        with Pool(workers) as pool:
            pool.map(_upscale, jobs, chunksize=64)
        done.write_text("ok\n")
    files = sorted((root / "full" / "train").glob("*/*.jpg"))
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(f.parent.name, []).append(f)
    if len(by_class) < classes or min(map(len, by_class.values())) * classes < big:
        raise SystemExit(f"convert_memory: {source} gives fewer than {big} images in "
                         f"{classes} classes")
    out = {}
    for n in sorted(sizes):
        d = root / f"n{n}"
        if not (d / ".complete").is_file():
            shutil.rmtree(d, ignore_errors=True)
            for cls, fs in by_class.items():
                (d / "train" / cls).mkdir(parents=True)
                for f in fs[:n // classes]:
                    os.link(f, d / "train" / cls / f.name)
            (d / ".complete").write_text("ok\n")
        out[n] = (d, sum(f.stat().st_size for f in d.glob("train/*/*.jpg")))
    return out


# --------------------------------------------------------------------------- measuring


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def tree_pss_kib(pid: int) -> int:
    """PSS of ``pid`` and all its descendants, KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _pss_kib(p)
        todo += _children(p)
    return total


def run_measured(tool: Path, args: list[str], cwd: Path, poll: float = 0.2) -> dict:
    """Run ``python tool args`` in a fresh process; its exit code, output, peak RSS (MiB), the
    peak PSS of its process tree (MiB, sampled every ``poll`` s), wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        rusage = Path(tmp) / "rusage.json"
        env = {**os.environ, "CONVERT_RUSAGE": str(rusage)}
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tool), *args], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_pss_kib(proc.pid))
                time.sleep(poll)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - t
        sampler.join()
        ru = json.loads(rusage.read_text()) if rusage.is_file() else {}
    return {"exit": proc.returncode, "stdout": out, "stderr": err, "wall_s": round(wall, 2),
            "peak_rss_main_mib": round(ru.get("main_kib", 0) / 1024, 1),
            "peak_pss_tree_mib": round(peak[0] / 1024, 1)}


def convert_once(tool: Path, cwd: Path, folder: Path, out: Path, a, n: int) -> dict:
    timings = out / "timings.json"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = [str(folder), "--name", "ds", "--out", str(out), "--formats", a.formats,
            "--workers", str(a.workers), "--no-progress", "--timings-json", str(timings)]
    r = run_measured(tool, args, cwd, a.poll)
    if r["exit"] != 0:
        raise SystemExit(f"convert_memory: {tool} failed on {folder} (exit {r['exit']}):\n"
                         f"{r['stderr'][-2000:]}")
    t = json.loads(timings.read_text())
    shutil.rmtree(out, ignore_errors=True)
    row = {k: v for k, v in r.items() if k not in ("stdout", "stderr", "exit")}
    row.update(images=t["dataset"]["images"], convert_s=t["seconds"]["total"],
               images_per_s=round(n / t["seconds"]["total"], 1),
               seconds={k: round(v, 2) for k, v in t["seconds"].items()})
    return row


def baseline_checkout(rev: str, work: Path) -> Path:
    """pipeline/ and tools/ of git revision ``rev``, unpacked under ``work``."""
    dest = work / f"rev_{rev}"
    if not (dest / "tools" / "convert_datasets.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        blob = subprocess.run(["git", "archive", rev, "pipeline", "tools"], cwd=ROOT,
                              capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            tf.extractall(dest, filter="data")
    return dest


def main(argv=None) -> int:
    a = parse_args(argv)
    sizes = sorted(int(x) for x in a.sizes.split(","))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(Path(a.source), sizes, a.side, work, a.workers)
    converters = [("streaming", ROOT)]
    if a.baseline:
        converters.append((f"baseline {a.baseline}", baseline_checkout(a.baseline, work)))
    rows = []
    for label, code in converters:
        for n in sizes:
            if label != "streaming" and a.baseline_max and n > a.baseline_max:
                continue
            folder, jpeg_bytes = folders[n]
            row = {"converter": label, "n": n, "side": a.side,
                   "images_bytes_mib": round((n * a.side * a.side * 3 + jpeg_bytes) / 2**20, 1),
                   **convert_once(code / "tools" / "convert_datasets.py", code, folder,
                                  work / "out", a, n)}
            rows.append(row)
            print(f"{label:>18} n={n:<6} peak RSS {row['peak_rss_main_mib']:7.1f} MiB  tree PSS "
                  f"{row['peak_pss_tree_mib']:7.1f} MiB  {row['images_per_s']:6.0f} img/s  "
                  f"(images+JPEGs {row['images_bytes_mib']:.0f} MiB)", flush=True)
    growth = {}
    for label, _ in converters:
        mine = [r for r in rows if r["converter"] == label]
        lo, hi = mine[0], mine[-1]
        growth[label] = {"from_n": lo["n"], "to_n": hi["n"], **{
            k: round(hi[k] - lo[k], 1) for k in
            ("peak_rss_main_mib", "peak_pss_tree_mib", "images_bytes_mib")}}
        print(f"{label:>18} growth {lo['n']} -> {hi['n']}: {growth[label]}")
    result = {**environment(), "what": "tools/convert_datasets.py peak memory and throughput vs "
              "the number of images (flat = streaming)", "source": a.source, "side": a.side,
              "formats": a.formats, "workers": a.workers, "sizes": sizes, "rows": rows,
              "growth_mib": growth}
    if not a.no_save:
        print(f"wrote {write_json(a.json or results_path('convert_memory'), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
