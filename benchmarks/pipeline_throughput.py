"""Data pipeline throughput: every source + the patch step, against the paper's reference path.

    python benchmarks/pipeline_throughput.py --data data/cifar10            # ~2 min on 2 CPU cores

One measured step = the next batch from the source + make_patches(train augmentation) with the
patches materialised (CUDA synchronized); the reference source builds its patches itself (PIL,
per patch, in DataLoader workers), so its step is the next batch alone. For every device x n x
source: patches/s and images/s, the median over --repeats windows of --steps steps, after
warm-up, and the best window (steadier where other jobs share the machine). All sources run
with the same thread budget (--threads: torch intra-op threads, and the worker count of the
dali/torchvision/ffcv/reference sources), each in a fresh process. The ratio to the reference
measured in the same run is printed and saved.

Fair timing of worker pools: the reference hands each whole batch to one worker, so W workers
deliver W batches at a time; its warm-up and window lengths are rounded up to multiples of W
so no window starts or ends between the batches of such a group. The others' warm-up (default
5 batches) also drains their prefetch queues.

Writes {"hardware", "versions", "command", "git_commit", "date", "settings", "rows":
[{"source", "device", "n", "patches_per_s", "images_per_s", "patches_per_s_best",
"vs_reference", ...}]} to --json or benchmarks/results/pipeline_<hostkind>_<date>.json. A
source whose library or data format is missing is a row with "skipped": reason.

``--model-step`` adds, per device and n, the row ``model_step``: the training step train.py
runs (model.step.EmpStep: ResNet-18 forward, the EMP-SSL loss, backward, LARS update; fp32 on
a CPU, bf16 autocast on CUDA, eager) on a fixed patch tensor of the same geometry and batch, and
to every source row ``share_of_step`` = t_pipeline / (t_pipeline + t_model) per patch: the
fraction of a serial step (data, then model) the pipeline takes. At 224 px on a CPU use a small
batch (the width-64 model step is slow there):

    python benchmarks/pipeline_throughput.py --data data/imagewoof --num-patches 20 --patch-size 112 \
        --out-size 224 --batch-size 8 --model-step --model-width 64 --model-steps 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import endless, environment, renamed, results_path, sync, write_json  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import default_workers, load_manifest, require_split  # noqa: E402
from pipeline.patches import AugmentParams, make_patches  # noqa: E402
from pipeline.sources import SOURCES, build_source  # noqa: E402
from pipeline.sources.base import SourceOptions  # noqa: E402

TARGET_PATCHES = 20_000  # per timed window when --steps 0 (auto)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/cifar10", help="a converted dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--sources", default=",".join(SOURCES), help="comma-separated")
    p.add_argument("--num-patches", dest="n", default="20,200", help="patches per image, comma-separated")
    p.add_argument("--batch-size", type=int, default=100, help="images per step")
    p.add_argument("--patch-size", type=int, default=0, help="P; 0 = half the image side")
    p.add_argument("--out-size", type=int, default=0, help="S; 0 = the image side")
    p.add_argument("--steps", type=int, default=0,
                   help=f"steps per timed window; 0 = enough for ~{TARGET_PATCHES} patches")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (reference: its "
                   "worker count)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads and source workers for every source; 0 = usable cores")
    p.add_argument("--device", dest="devices", default="", help="comma-separated; default cpu, plus cuda if present")
    p.add_argument("--image-size", type=int, default=0,
                   help="dali/torchvision/ffcv: center-crop size for variable-size datasets")
    p.add_argument("--json", default="", help="output path (default benchmarks/results/...)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--model-step", action="store_true",
                   help="also time the training step (EmpStep) on the same patch batch: row "
                        "model_step, and share_of_step on every source row")
    p.add_argument("--model-width", type=int, default=64, help="ResNet-18 base width (paper: 64)")
    p.add_argument("--model-stem", default="auto", choices=("auto", "cifar", "imagenet"),
                   help="auto: imagenet when the patch output is >= 64 px (the presets' choice)")
    p.add_argument("--model-steps", type=int, default=3, help="timed model steps per repeat")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # SOURCE,DEVICE,N: one row, as JSON
    return p.parse_args(renamed(argv, {"--n": "--num-patches", "--devices": "--device"}, "pipeline_throughput"))


def round_up(x: int, m: int) -> int:
    return max(m, math.ceil(x / m) * m)


def measure(name: str, root, split: str, device: torch.device, n: int, a, geom: dict) -> dict:
    """One row: build the source, warm up, time --repeats windows of steps."""
    row = {"source": name, "device": device.type, "n": n,
           "loadavg_1min_at_start": round(os.getloadavg()[0], 2)}
    opts = SourceOptions(batch_size=a.batch_size, device=device, shuffle=True, drop_last=True,
                         seed=0, num_workers=a.threads)
    kwargs = {}
    if name == "reference":
        kwargs = dict(num_patches=n, patch_size=geom["p"], out_size=geom["s"], mean=geom["mean"],
                      std=geom["std"], augment=AugmentParams())
    elif name in ("dali", "torchvision", "ffcv") and a.image_size:
        kwargs = dict(image_size=a.image_size)
    try:
        source = build_source(name, root, split, opts, **kwargs)
    except (ImportError, UserError, RuntimeError, OSError) as e:
        row["skipped"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return row
    gen = torch.Generator(device=device).manual_seed(0)
    makes_patches = not source.yields_patches
    batches = endless(source)
    aug = AugmentParams()

    def step():
        images, labels = next(batches)
        if makes_patches:
            images = make_patches(images, num_patches=n, patch_size=geom["p"], out_size=geom["s"],
                                  mean=geom["mean"], std=geom["std"], generator=gen, augment=aug)
        return images

    steps = a.steps or max(1, math.ceil(TARGET_PATCHES / (n * a.batch_size)))
    warmup = a.warmup
    if name == "reference":  # whole batches per worker: count in groups of W
        w = max(1, source.num_workers)
        steps, warmup = round_up(steps, w), w
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 3)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            for _ in range(steps):
                out = step()
            sync(device)
            times.append(time.perf_counter() - t)
            assert out.shape[:2] == (n, a.batch_size), out.shape
    except StopIteration:
        row["skipped"] = "fewer batches than warmup + steps"
        return row
    finally:
        batches.close()
        source.close()
    t, best = statistics.median(times), min(times)
    row.update(steps=steps, repeats=a.repeats, seconds=[round(x, 4) for x in times],
               patches_per_s=round(steps * n * a.batch_size / t, 1),
               images_per_s=round(steps * a.batch_size / t, 1),
               patches_per_s_best=round(steps * n * a.batch_size / best, 1))
    return row


def measure_model(device: torch.device, n: int, a, geom: dict) -> dict:
    """The model_step row: EmpStep on a fixed (n, B, 3, S, S) tensor, as make_patches lays it out."""
    from model import LARS, EncoderConfig, build_encoder, lars_param_groups
    from model.step import EmpStep, configure_cuda

    cuda = device.type == "cuda"
    if cuda:
        configure_cuda()
    stem = a.model_stem if a.model_stem != "auto" else ("imagenet" if geom["s"] >= 64 else "cifar")
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(width=a.model_width, stem=stem)).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    opt = LARS(lars_param_groups(model), lr=0.3)
    step_fn = EmpStep(model, model, opt, amp="bf16" if cuda else "fp32")
    b, size = a.batch_size, geom["s"]
    x = torch.rand(n * b, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last).view(n, b, 3, size, size)
    row = {"source": "model_step", "device": device.type, "n": n, "width": a.model_width,
           "stem": stem, "amp": "bf16" if cuda else "fp32",
           "loadavg_1min_at_start": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    step_fn(x, 0.3)
    sync(device)
    row["warmup_s"] = round(time.perf_counter() - t0, 3)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for _ in range(a.model_steps):
            step_fn(x, 0.3)
        sync(device)
        times.append(time.perf_counter() - t)
    t, best = statistics.median(times), min(times)
    per = a.model_steps * n * b
    row.update(steps=a.model_steps, repeats=a.repeats, seconds=[round(x, 4) for x in times],
               patches_per_s=round(per / t, 2), images_per_s=round(a.model_steps * b / t, 3),
               patches_per_s_best=round(per / best, 2))
    return row


def add_shares(rows: list[dict]) -> None:
    """share_of_step on every source row that has a model_step row of the same device and n."""
    for r in rows:
        m = next((x for x in rows if x["source"] == "model_step" and x["device"] == r["device"]
                  and x["n"] == r["n"] and "patches_per_s" in x), None)
        if m and r["source"] != "model_step" and "patches_per_s" in r:
            tp, tm = 1 / r["patches_per_s"], 1 / m["patches_per_s"]
            r["share_of_step"] = round(tp / (tp + tm), 4)
            r["pipeline_over_model"] = round(tp / tm, 4)


def measure_in_subprocess(name: str, dev: str, n: int, argv: list[str]) -> dict:
    """Each row in a fresh process: no threads, JIT state or caches left over by another source
    (DALI's and FFCV's thread pools would otherwise slow down whatever runs after them)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", f"{name},{dev},{n}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"source": name, "device": dev, "n": n,
            "skipped": f"crashed (exit {proc.returncode}): {tail}"[:300]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    a.threads = a.threads or default_workers()
    torch.set_num_threads(a.threads)
    root = Path(a.data)
    try:
        manifest = load_manifest(root)
        info = require_split(manifest, root, a.split)
    except UserError as e:
        print(f"pipeline_throughput: error: {e}", file=sys.stderr)
        return 2
    side = min(info.shape[:2]) if info.shape else a.image_size
    if not side and not a.patch_size:
        print("pipeline_throughput: error: --patch-size/--out-size: variable-size images; give "
              "them (or --image-size)", file=sys.stderr)
        return 2
    geom = dict(p=a.patch_size or side // 2, s=a.out_size or side, mean=manifest.mean, std=manifest.std)
    sources = [s for s in a.sources.split(",") if s]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        print(f"pipeline_throughput: error: --sources {','.join(unknown)}: unknown; choose from "
              f"{','.join(SOURCES)}", file=sys.stderr)
        return 2
    devices = [d for d in a.devices.split(",") if d] or (["cpu", "cuda"] if torch.cuda.is_available()
                                                          else ["cpu"])
    ns = [int(x) for x in a.n.split(",")]
    if a.one:
        name, dev, n = a.one.split(",")
        row = (measure_model(torch.device(dev), int(n), a, geom) if name == "model_step" else
               measure(name, root, a.split, torch.device(dev), int(n), a, geom))
        print("ROW " + json.dumps(row))
        return 0
    print(f"{root} [{a.split}]: {info.count} images {info.shape}, patches {geom['p']}->{geom['s']}, "
          f"batch {a.batch_size}, threads {a.threads}, devices {devices}", flush=True)

    rows = []
    for dev in devices:
        for n in ns:
            for name in sources + (["model_step"] if a.model_step else []):
                row = measure_in_subprocess(name, dev, n, argv)
                rows.append(row)
                if "skipped" in row:
                    print(f"  {dev:5s} n={n:<4d} {name:10s} skipped: {row['skipped']}", flush=True)
                else:
                    print(f"  {dev:5s} n={n:<4d} {name:10s} {row['patches_per_s']:>11,.0f} patches/s "
                          f"{row['images_per_s']:>9,.0f} images/s", flush=True)
            add_shares(rows)
            for r in rows:
                if r["device"] == dev and r["n"] == n and "share_of_step" in r:
                    print(f"    {r['source']:10s} share of a serial step: {100 * r['share_of_step']:.1f}%",
                          flush=True)
            ref = next((r for r in rows if r["source"] == "reference" and r["device"] == dev
                        and r["n"] == n and "patches_per_s" in r), None)
            for r in rows:
                if (ref and r["device"] == dev and r["n"] == n and "patches_per_s" in r
                        and r["source"] != "model_step"):
                    r["vs_reference"] = round(r["patches_per_s"] / ref["patches_per_s"], 2)
                    r["vs_reference_best"] = round(r["patches_per_s_best"] / ref["patches_per_s_best"], 2)
            if ref:
                print("    vs reference (median; best window): " + ", ".join(
                    f"{r['source']} {r['vs_reference']:.1f}x; {r['vs_reference_best']:.1f}x" for r in rows
                    if r["device"] == dev and r["n"] == n and "vs_reference" in r
                    and r["source"] != "reference"), flush=True)

    result = {**environment(), "what": "data pipeline throughput: source + make_patches (train "
              "augmentation) vs the reference PIL path", "dataset": str(root), "split": a.split,
              "settings": {"batch_size": a.batch_size, "patch_size": geom["p"], "out_size": geom["s"],
                           "threads": a.threads, "warmup": a.warmup, "repeats": a.repeats,
                           "model_step": a.model_step and {"width": a.model_width, "stem": a.model_stem,
                                                           "steps": a.model_steps},
                           "steps": a.steps or f"auto (~{TARGET_PATCHES} patches per window)"},
              "rows": rows}
    if not a.no_save:
        path = write_json(a.json or results_path("pipeline"), result)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
