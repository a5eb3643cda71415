"""Training patches/s and model-FLOPs utilisation per step option, model-only and fed by a source.

    python benchmarks/train_throughput.py --data data/cifar10                 # defaults per device
    python benchmarks/train_throughput.py --data data/cifar10 --num-patches 200,20 \
        --options eager,compiled,graphs,compiled_graphs                      # every option, GPU

Each row times full EMP-SSL steps (model.step.EmpStep: encode, fused loss, backward, LARS) fed
either by a real source (source iteration + pipeline.patches.make_patches on the device) or by
"synthetic": a fixed patch tensor already on the device (the model-only step). Both run in the
same process on the same step object, so `pipeline_overhead = 1 - source / synthetic` is the
share of step time the data path costs. Options:

    eager            op by op (train.py's default)
    compiled         torch.compile of forward + loss (one graph) and of the LARS update (--compile)
    graphs           the whole step captured as a CUDA graph and replayed (--run.cuda_graphs)
    compiled_graphs  both (--compile --run.cuda_graphs)
    chunked          eager, --patch-chunk n/4
    compiled_model   torch.compile of the encoder module only (what --compile did before)

Every row carries the model FLOPs per patch (model.flops, counted once per n), the achieved
TFLOP/s and, where the GPU's peak is known (or --peak-tflops), the MFU; and first_step_s, the
first step's time (compilation, cuDNN autotuning, graph capture). Defaults: on CUDA ResNet-18
(width 64), bf16, batch 100, n=200 and 20, every option but chunked (about 6-8 minutes on an
H100, most of it compiling); on a CPU a width-16 net, fp32, batch 20, n=8, eager and chunked
(minutes). Graph options are CUDA-only (skipped on a CPU). Medians over repeats of --steps
steps each after warm-up. The JSON is rewritten after every row, so a time limit keeps what
is done.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import endless, environment, renamed, median_time, results_path, sync, write_json  # noqa: E402
from model.encoder import EncoderConfig, build_encoder  # noqa: E402
from model.flops import achieved_tflops, peak_tflops, step_flops_per_patch  # noqa: E402
from model.lars import LARS, lars_param_groups  # noqa: E402
from model.step import EmpStep, configure_cuda  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import load_manifest  # noqa: E402
from pipeline.patches import AugmentParams, make_patches  # noqa: E402
from pipeline.sources import build_source  # noqa: E402
from pipeline.sources.base import SourceOptions  # noqa: E402

OPTIONS = {  # name -> EmpStep keywords (chunked: patch_chunk set from n)
    "eager": {}, "compiled": {"compile": True}, "graphs": {"cuda_graphs": True},
    "compiled_graphs": {"compile": True, "cuda_graphs": True}, "chunked": {},
    "compiled_model": {},  # torch.compile of the encoder module alone (--compile until issue 16)
}


def make_step(option: str, n: int, args, device) -> EmpStep:
    torch.manual_seed(0)
    torch._dynamo.reset()  # each option compiles for itself (the inductor cache still helps)
    cfg = EncoderConfig(stem=args.stem, width=args.width, projector=tuple(args.projector))
    model = build_encoder(cfg).to(device).to(memory_format=torch.channels_last)
    opt = LARS(lars_param_groups(model), lr=0.3)
    net = torch.compile(model) if option == "compiled_model" else model
    return EmpStep(net, model, opt, amp=args.amp, **OPTIONS[option],
                   patch_chunk=max(1, n // 4) if option == "chunked" else 0)


def batches(src_name: str, args, device, n: int, man, gen):
    """An endless iterator of patch tensors (n, B, 3, S, S) for one source."""
    geo = dict(num_patches=n, patch_size=args.patch_size, out_size=args.out_size, mean=man.mean,
               std=man.std)
    if src_name == "synthetic":
        h, w = man.splits["train"].shape[:2]
        images = torch.randint(0, 256, (args.batch_size, h, w, 3), dtype=torch.uint8, device=device)
        fixed = make_patches(images, generator=gen, **geo)  # made once
        while True:
            yield fixed
    opts = SourceOptions(batch_size=args.batch_size, device=device, seed=0, num_workers=args.workers)
    extra = dict(**geo, augment=AugmentParams()) if src_name == "reference" else {}
    source = build_source(src_name, args.data, "train", opts, **extra)
    for images, _ in endless(source):
        yield images if source.yields_patches else make_patches(images, generator=gen, **geo)


def bench(step: EmpStep, args, device, n: int, src_name: str, man, first: bool) -> dict:
    """One row; ``first``: this is the step's first use, whose first call is timed alone
    (compilation, cuDNN autotuning, graph capture)."""
    gen = torch.Generator(device=device).manual_seed(0)
    it = batches(src_name, args, device, n, man, gen)
    extra = {}
    if first:
        patches = next(it)
        sync(device)
        t = time.perf_counter()
        step(patches, 0.1)
        sync(device)
        extra["first_step_s"] = time.perf_counter() - t

    def run_steps():
        for _ in range(args.steps):
            step(next(it), 0.1)

    for _ in range(args.warmup):
        step(next(it), 0.1)
    med, times = median_time(run_steps, repeats=args.repeats, warmup=0, device=device)
    patches = args.steps * args.batch_size * n
    return {"source": src_name, "n": n, "patches_per_s": patches / med,
            "images_per_s": args.steps * args.batch_size / med, "step_ms": 1e3 * med / args.steps,
            "repeats_s": times, **extra}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--sources", default="memory", help="comma list of memory,dali,ffcv,reference "
                   "(synthetic is always measured); 'none' for the model-only rows")
    p.add_argument("--options", default="eager,compiled,graphs,compiled_graphs" if cuda else "eager,chunked",
                   help=f"comma list of {', '.join(OPTIONS)}")
    p.add_argument("--num-patches", dest="n", default="200,20" if cuda else "8")
    p.add_argument("--batch-size", type=int, default=100 if cuda else 20)
    p.add_argument("--width", type=int, default=64 if cuda else 16)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--projector", default="4096,4096,1024" if cuda else "512,128",
                   type=lambda s: [int(x) for x in s.split(",")], help="projector widths")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--out-size", type=int, default=32)
    p.add_argument("--amp", default="bf16" if cuda else "fp32", choices=("bf16", "fp32"))
    p.add_argument("--steps", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s of one device for the MFU (0: from the GPU's name)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--json", help="output (default benchmarks/results/train_throughput_<host>_<date>.json)")
    args = p.parse_args(renamed(argv, {"--n": "--num-patches"}, "train_throughput"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = args.options.split(",")
    if unknown := [o for o in options if o not in OPTIONS]:
        p.error(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    if device.type == "cuda":
        configure_cuda()  # as train.py runs
    try:
        man = load_manifest(args.data)
    except UserError as e:
        print(f"train_throughput: error: {e}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(gpu, args.amp, args.peak_tflops)
    out = Path(args.json) if args.json else results_path("train_throughput")
    doc = {**environment(), "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "peak_tflops": peak.tflops if peak else None, "peak": peak.source if peak else None,
           "rows": []}
    rows = doc["rows"]
    sources = [] if args.sources == "none" else args.sources.split(",")
    for n in [int(x) for x in args.n.split(",")]:
        fpp = step_flops_per_patch(EncoderConfig(stem=args.stem, width=args.width,
                                                 projector=tuple(args.projector)),
                                   num_patches=n, batch=args.batch_size, out_size=args.out_size)
        for option in options:
            base = {"option": option, "n": n, "device": device.type, "amp": args.amp,
                    "width": args.width, "batch_size": args.batch_size, "flops_per_patch": fpp}
            if "graphs" in option and device.type != "cuda":
                rows.append({**base, "skipped": "CUDA graphs need a CUDA device"})
                continue
            step = make_step(option, n, args, device)
            synthetic = None
            for src in ["synthetic", *sources]:
                if src == "reference" and option != "eager":
                    continue
                t = time.perf_counter()
                try:
                    row = {**base, **bench(step, args, device, n, src, man, src == "synthetic")}
                except UserError as e:
                    print(f"skip {src}: {e}")
                    rows.append({**base, "source": src, "skipped": str(e)})
                    continue
                row["tflops"] = achieved_tflops(row["patches_per_s"], fpp)
                if peak is not None:
                    row["mfu"] = row["tflops"] / peak.tflops
                if synthetic is not None:
                    row["pipeline_overhead"] = 1 - row["patches_per_s"] / synthetic["patches_per_s"]
                else:
                    synthetic = row
                row["row_s"] = time.perf_counter() - t
                rows.append(row)
                write_json(out, doc)  # every number on disk the moment it exists
                extra = (f"  overhead {100 * row['pipeline_overhead']:5.1f}%"
                         if "pipeline_overhead" in row else "")
                util = f" {100 * row['mfu']:5.1f}% MFU" if "mfu" in row else ""
                print(f"n={n:<4} {option:<15} {src:<10} {row['patches_per_s']:>11,.0f} patches/s "
                      f"{row['tflops']:8.3g} TFLOP/s{util}{extra}  ({row['row_s']:.0f} s)", flush=True)
            del step
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next option starts with the memory free
    write_json(out, doc)
    print(f"train_throughput: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
