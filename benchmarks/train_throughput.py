"""Training patches/s per data source and per option, next to the model-only step.

    python benchmarks/train_throughput.py --data data/cifar10                 # defaults per device
    python benchmarks/train_throughput.py --data data/cifar10 --n 200 --options eager,compiled,chunked

Each row times full EMP-SSL steps (model.step.EmpStep: encode, fused loss, backward, LARS) fed
either by a real source (source iteration + pipeline.patches.make_patches on the device) or by
"synthetic": a fixed patch tensor already on the device (the model-only step). Both run in the
same process, same settings, so `pipeline_overhead = 1 - source / synthetic` is the share of
step time the data path costs (goal on a GPU: <= 5%). Options: eager | compiled (torch.compile)
| chunked (--patch-chunk n/4). Defaults: on CUDA ResNet-18 (width 64), bf16, batch 100, n=20 and
200; on a CPU a width-16 net, fp32, batch 20, n=8 (minutes, for smoke tests).
Median over repeats of --steps steps each, after warm-up (compilation excluded).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import endless, environment, median_time, results_path, write_json  # noqa: E402
from model.encoder import EncoderConfig, build_encoder  # noqa: E402
from model.lars import LARS, lars_param_groups  # noqa: E402
from model.step import EmpStep, configure_cuda  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import load_manifest  # noqa: E402
from pipeline.patches import AugmentParams, make_patches  # noqa: E402
from pipeline.sources import build_source  # noqa: E402
from pipeline.sources.base import SourceOptions  # noqa: E402


def make_step(option: str, n: int, width: int, stem: str, projector, amp: str, device) -> EmpStep:
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(stem=stem, width=width, projector=tuple(projector))).to(device).to(memory_format=torch.channels_last)
    opt = LARS(lars_param_groups(model), lr=0.3)
    net = torch.compile(model) if option == "compiled" else model
    return EmpStep(net, model, opt, amp=amp, patch_chunk=max(1, n // 4) if option == "chunked" else 0)


def bench(args, device, n: int, option: str, src_name: str, man) -> dict:
    step = make_step(option, n, args.width, args.stem, args.projector, args.amp, device)
    gen = torch.Generator(device=device).manual_seed(0)
    geo = dict(num_patches=n, patch_size=args.patch_size, out_size=args.out_size, mean=man.mean, std=man.std)
    if src_name == "synthetic":
        images = torch.randint(0, 256, (args.batch_size, man.splits["train"].shape[0],
                                        man.splits["train"].shape[1], 3), dtype=torch.uint8, device=device)
        fixed = make_patches(images, generator=gen, **geo)  # (n, B, 3, S, S), made once

        def one():
            step(fixed, 0.1)
    else:
        opts = SourceOptions(batch_size=args.batch_size, device=device, seed=0, num_workers=args.workers)
        extra = dict(**geo, augment=AugmentParams()) if src_name == "reference" else {}
        source = build_source(src_name, args.data, "train", opts, **extra)
        it = endless(source)

        def one():
            images, _ = next(it)
            p = images if source.yields_patches else make_patches(images, generator=gen, **geo)
            step(p, 0.1)

    def run_steps():
        for _ in range(args.steps):
            one()

    for _ in range(args.warmup):
        one()
    med, times = median_time(run_steps, repeats=args.repeats, warmup=0, device=device)
    patches = args.steps * args.batch_size * n
    return {"source": src_name, "option": option, "n": n, "device": device.type, "amp": args.amp,
            "width": args.width, "batch_size": args.batch_size, "patches_per_s": patches / med,
            "images_per_s": args.steps * args.batch_size / med, "step_ms": 1e3 * med / args.steps,
            "repeats_s": times}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--sources", default="memory", help="comma list of memory,dali,ffcv,reference "
                   "(synthetic is always measured)")
    p.add_argument("--options", default="eager,compiled" if cuda else "eager,chunked")
    p.add_argument("--n", default="20,200" if cuda else "8")
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
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--json", help="output (default benchmarks/results/train_throughput_<host>_<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        configure_cuda()  # as train.py runs
    try:
        man = load_manifest(args.data)
    except UserError as e:
        print(f"train_throughput: error: {e}", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for n in [int(x) for x in args.n.split(",")]:
        for option in args.options.split(","):
            for src in ["synthetic", *args.sources.split(",")]:
                if src == "reference" and option != "eager":
                    continue
                try:
                    row = bench(args, device, n, option, src, man)
                except UserError as e:
                    print(f"skip {src}: {e}")
                    rows.append({"source": src, "option": option, "n": n, "device": device.type,
                                 "skipped": str(e)})
                    continue
                base = next((r for r in rows if r["source"] == "synthetic" and r["option"] == option
                             and r["n"] == n and "skipped" not in r), None)
                if base is not None and src != "synthetic":
                    row["pipeline_overhead"] = 1 - row["patches_per_s"] / base["patches_per_s"]
                rows.append(row)
                extra = f"  overhead {100 * row['pipeline_overhead']:5.1f}%" if "pipeline_overhead" in row else ""
                print(f"n={n:<4} {option:<9} {src:<10} {row['patches_per_s']:>11,.0f} patches/s "
                      f"{row['images_per_s']:>9,.0f} images/s{extra}", flush=True)
    out = Path(args.json) if args.json else results_path("train_throughput")
    write_json(out, {**environment(), "rows": rows})
    print(f"train_throughput: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
