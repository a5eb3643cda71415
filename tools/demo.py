"""The main job: convert CIFAR-10 if needed, train EMP-SSL, probe it next to a random-init encoder.

    python tools/demo.py [--source PATH|cifar10] [--data data/cifar10] [--out runs/demo] [--preset P]

On a CPU this trains the `demo` preset (narrow ResNet-18, 8 patches, a CIFAR-10 subset) in a few
minutes; on a CUDA GPU it runs the paper's 1-epoch recipe (configs/cifar10_n20_e1.yaml) on the
full training set. Either way it then runs probe.py's bag-of-features linear probe on the trained
encoder and on a randomly initialised one, and prints the two accuracies side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.runner import RunFailed, probe_command, read_probe, run_logged, train_command  # noqa: E402

SHARED_DIR = ROOT.parent / "shared" / "datasets"
SHARED = SHARED_DIR / "cifar10-png.tar.xz"  # the original, lossless pixels
SHARED_JPEG = SHARED_DIR / "cifar10-jpeg.tar.xz"  # a lossy copy, used only where the PNGs are missing

# Probe settings per scale: (test patches per image, probe epochs, train images cap); the test
# split is always probed whole (the lossless archive holds 1,000 test images)
CPU_PROBE = ("8", "30", "4000")
GPU_PROBE = ("128", "100", "0")


def default_source() -> str:
    """The shared lossless archive, else the shared JPEG copy, else torchvision's download."""
    for path in (SHARED, SHARED_JPEG):
        if path.is_file():
            return str(path)
    return "cifar10"


def stale_jpeg_copy(data: Path, source: str) -> bool:
    """True when ``data`` was converted by an older demo from the shared JPEG copy while the
    lossless archive is now the default source."""
    try:
        made_from = json.loads((data / "manifest.json").read_text()).get("source", "")
    except (OSError, ValueError):
        return False
    return source == str(SHARED) and Path(made_from).name == SHARED_JPEG.name


def run(cmd: list[str]) -> None:
    try:
        run_logged(cmd)
    except RunFailed as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(e.code)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="CIFAR-10 to convert when --data is missing: a path (pickles, "
                   "ImageFolder or archive) or `cifar10` (download); default: the shared lossless "
                   "archive (cifar10-png.tar.xz), else the shared JPEG copy, else download")
    p.add_argument("--data", default="data/cifar10", help="converted dataset dir (default data/cifar10)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--preset", help="config preset (default: demo on CPU, cifar10_n20_e1 on a GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available() and args.device != "cpu"
    py = sys.executable
    data = Path(args.data)
    t0 = time.perf_counter()
    src = args.source or default_source()
    stale = args.source is None and stale_jpeg_copy(data, src)
    if stale:
        print(f"demo: {data} holds the JPEG copy an older demo converted; re-converting it from "
              f"the lossless {SHARED.name}", flush=True)
    if stale or not (data / "manifest.json").is_file():
        cmd = [py, "tools/convert_datasets.py", src, "--name", data.name, "--out", str(data.parent),
               "--formats", "memory"] + (["--overwrite"] if stale else [])
        if src in ("cifar10", "cifar100"):
            cmd.append("--download")
        run(cmd)
    preset = args.preset or ("cifar10_n20_e1" if gpu else "demo")
    out = Path(args.out)
    train_cmd = train_command(f"configs/{preset}.yaml", data, out, "--device", args.device)
    if (out / "ckpt.pt").exists():
        train_cmd.append("--resume")
    t1 = time.perf_counter()
    run(train_cmd)
    t2 = time.perf_counter()
    patches, epochs, cap = GPU_PROBE if gpu else CPU_PROBE
    probe = ["--num-patches", patches, "--probe-epochs", epochs, "--device", args.device]
    if cap != "0":
        probe += ["--max-train-images", cap]
    run(probe_command(out / "ckpt.pt", data, out / "probe", *probe))
    run(probe_command(out / "ckpt.pt", data, out / "probe-random-init", *probe, "--no-plots", random_init=True))
    t3 = time.perf_counter()
    trained = read_probe(out / "probe")
    rand = read_probe(out / "probe-random-init")
    made_from = json.loads((data / "manifest.json").read_text()).get("source", "?")
    print(f"\nEMP-SSL demo ({preset}, {'GPU' if gpu else 'CPU'}): convert {t1 - t0:.0f}s, "
          f"train {t2 - t1:.0f}s, probe {t3 - t2:.0f}s")
    print(f"data: {data} (from {Path(made_from).name}); linear probe on {trained['num_train']} train "
          f"images, tested on {trained['num_test']} test images")
    print(f"{'encoder':<14}{'linear top-1':>14}{'kNN top-1':>12}")
    for name, r in (("EMP-SSL", trained), ("random init", rand)):
        print(f"{name:<14}{100 * r['linear_top1']:>13.2f}%{100 * r['knn_top1']:>11.2f}%")
    print(f"results: {out / 'probe' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
