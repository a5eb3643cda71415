"""The fused EMP-SSL loss against the naive per-patch loop, and the model's training step.

    python benchmarks/loss_and_model.py                 # CUDA when present; CPU: ~8 min on 2 cores
    python benchmarks/loss_and_model.py --quick         # loss part + eager rows only
    python benchmarks/loss_and_model.py --skip-loss --modes compiled --json out.json

(1) Loss, forward + backward, b=100, d=1024, n in {20, 200}, fp32:
      naive   : the reference formula, one patch group at a time, logdet of the d x d matrix
                I + d/(b eps) Z_i^T Z_i (LU), invariance by a loop over patches
      batched : all groups at once on the b x b Gram matrix, Cholesky, autograd backward
      fused   : model.loss.emp_ssl_loss (batched + closed-form backward)
(2) Training step (model.step.EmpStep, what train.py runs: forward, loss, backward, LARS step,
    with train.py's CUDA backend settings) in patches/s for fp32 vs bf16
    autocast, contiguous vs channels_last, eager vs torch.compile: on CPU 20 images x 4
    patches at 32 px (width 64, plus width 16 rows); on CUDA 100 images x 20 patches at
    32 px, width 64.
Figures are medians over repeats after warm-up; ratios are to the baseline measured in the
same run. JSON in benchmarks/results/ (hardware, versions, command and load average inside).

What it measured: docs/performance.md ("The loss", "The training step"), generated from the
result files by benchmarks/report.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import environment, renamed, median_time, results_path, write_json  # noqa: E402
from model import LARS, EncoderConfig, build_encoder, emp_ssl_loss, lars_param_groups  # noqa: E402
from model.loss import invariance, logdet_spd  # noqa: E402
from model.step import EmpStep, configure_cuda  # noqa: E402


# ---------------------------------------------------------------- (1) the loss
def naive_loss(z: torch.Tensor, lam: float = 200.0, eps: float = 0.2) -> torch.Tensor:
    """Reference-style objective: a Python loop over the n patch groups, d x d logdet."""
    n, b, d = z.shape
    eye = torch.eye(d, device=z.device, dtype=z.dtype)
    r = sum(0.5 * torch.logdet(eye + d / (b * eps) * z[i].T @ z[i]) for i in range(n)) / n
    zbar = z.mean(0)                                                    # (b, d)
    inv = sum(F.cosine_similarity(z[i], zbar, dim=1).mean() for i in range(n)) / n
    return -r - lam * inv


def batched_autograd_loss(z: torch.Tensor, lam: float = 200.0, eps: float = 0.2) -> torch.Tensor:
    """All groups at once on the b x b Gram matrix, backward by autograd through Cholesky."""
    n, b, d = z.shape
    gram = z @ z.transpose(1, 2)                                        # (n, b, b)
    m = torch.eye(b, device=z.device) + d / (b * eps) * gram
    r = 0.5 * logdet_spd(m, check=False).mean()
    return -r - lam * invariance(z)


def bench_loss(device: str, ns: list[int], b: int, d: int, quick: bool) -> list[dict]:
    cuda = device == "cuda"
    rows = []
    for n in ns:
        g = torch.Generator(device=device).manual_seed(0)
        z0 = F.normalize(torch.randn(n, b, d, device=device, generator=g), dim=-1)  # (n, b, d)

        def run(loss_fn):
            z = z0.clone().requires_grad_()
            loss_fn(z).backward()

        fns = {"naive": naive_loss, "batched_autograd": batched_autograd_loss,
               "fused": lambda z: emp_ssl_loss(z, check=False)[0]}
        # the naive loop is slow on a CPU: fewer repeats there (it is not noisy at that scale)
        reps = {"naive": 1 if (n >= 200 and not cuda) else 3, "batched_autograd": 5, "fused": 10}
        if quick:
            reps = {k: max(1, v // 3) for k, v in reps.items()}
        res = {}
        for name, fn in fns.items():
            med, times = median_time(lambda: run(fn), reps[name],
                                     warmup=0 if (name == "naive" and n >= 200 and not cuda) else 1,
                                     device=device)
            res[name] = dict(median_s=med, repeats=len(times), times_s=times)
            print(f"loss {device} n={n:4d} b={b} d={d} {name:17s} {med * 1e3:10.2f} ms "
                  f"({len(times)} reps)", flush=True)
        # the three give the same loss (checked here so the figures compare like with like)
        with torch.no_grad():
            ref = naive_loss(z0.double()).item()
            fused = emp_ssl_loss(z0, check=False)[0].item()
        rows.append(dict(part="loss", device=device, n=n, b=b, d=d,
                         naive_over_fused=res["naive"]["median_s"] / res["fused"]["median_s"],
                         fused_ms=1e3 * res["fused"]["median_s"],
                         naive_ms=1e3 * res["naive"]["median_s"],
                         batched_autograd_ms=1e3 * res["batched_autograd"]["median_s"],
                         batched_autograd_over_fused=res["batched_autograd"]["median_s"]
                         / res["fused"]["median_s"],
                         dtype="float32", loss_fp64_naive=ref, loss_fused=fused, timings=res))
        print(f"loss {device} n={n}: naive / fused = {rows[-1]['naive_over_fused']:.1f}x, "
              f"batched_autograd / fused = {rows[-1]['batched_autograd_over_fused']:.2f}x",
              flush=True)
    return rows


# ---------------------------------------------------------------- (2) the training step
def bench_step(device: str, width: int, images: int, patches: int, size: int, bf16: bool,
               channels_last: bool, compiled: bool, repeats: int, warmup: int) -> dict:
    """model.step.EmpStep, the step train.py runs, on a fixed random patch tensor."""
    cuda = device == "cuda"
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = build_encoder(EncoderConfig(width=width)).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = LARS(lars_param_groups(model), lr=0.3)
    step_fn = EmpStep(torch.compile(model) if compiled else model, model, opt,
                      amp="bf16" if bf16 else "fp32")
    n, b = patches, images
    # (n, b, 3, S, S) with the strides make_patches gives in the chosen layout: no per-step copy
    x = torch.rand(n * b, 3, size, size, device=device).contiguous(memory_format=fmt).view(
        n, b, 3, size, size)

    def step():
        return step_fn(x, 0.3)[0]                                      # detached loss

    t = time.perf_counter()
    step()                                                              # compile happens here
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    med, times = median_time(step, repeats, warmup=warmup - 1, device=device)
    loss = step().item()
    row = dict(part="train_step", device=device, width=width,
               dtype="bf16-autocast" if bf16 else "float32",
               layout="channels_last" if channels_last else "contiguous",
               mode="compiled" if compiled else "eager", patches_per_s=n * b / med,
               median_ms=1e3 * med, images=b, patches=n, size=size, first_step_s=first_s,
               times_s=times, final_loss=loss)
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"step {device} w={width:3d} {b}x{n}@{size} {row['dtype']:13s} {row['layout']:13s} "
          f"{row['mode']:8s} {med * 1e3:9.1f} ms  {row['patches_per_s']:9.1f} patches/s "
          f"(first step {first_s:.1f} s)", flush=True)
    return row


def step_grid(device: str, modes: list[str]) -> list[dict]:
    rows = []
    if device == "cpu":
        shape = dict(images=20, patches=4, size=32, repeats=3, warmup=1)
        widths = [(64, [(bf, cl) for bf in (False, True) for cl in (False, True)]),
                  (16, [(False, False), (False, True), (True, True)])]
    else:
        shape = dict(images=100, patches=20, size=32, repeats=10, warmup=3)
        widths = [(64, [(bf, cl) for bf in (False, True) for cl in (False, True)])]
    for width, combos in widths:
        for compiled in [m == "compiled" for m in modes]:
            for bf16, cl in combos:
                # CPU compile takes minutes per variant: two compiled rows, at width 64
                if compiled and device == "cpu" and (width != 64 or bf16 != cl):
                    continue
                rows.append(bench_step(device, width, bf16=bf16, channels_last=cl,
                                       compiled=compiled, **shape))
    base = [r for r in rows if r["dtype"] == "float32" and r["layout"] == "contiguous"
            and r["mode"] == "eager" and r["width"] == 64]
    for r in rows if base else []:
        r["speedup_vs_fp32_contiguous_eager_w64"] = r["patches_per_s"] / base[0]["patches_per_s"]
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None,
                    help="output file (default benchmarks/results/loss_and_model_<host>_<date>.json)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, eager rows only")
    ap.add_argument("--modes", default="eager,compiled",
                    help="training-step modes to run: eager, compiled or both (comma list)")
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--num-patches", dest="ns", default="20,200", help="patch counts n for the loss part")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); on a shared CPU, 1 avoids "
                         "OpenMP threads spinning against other jobs")
    args = ap.parse_args(renamed(argv[1:], {"--ns": "--num-patches"}, "loss_and_model"))
    if args.threads:
        torch.set_num_threads(args.threads)

    out = dict(what="fused EMP-SSL loss vs naive loop; training-step throughput",
               **environment())
    rows = []
    if not args.skip_loss:                  # loss part: plain fp32 matmuls (no TF32)
        rows += bench_loss(args.device, [int(v) for v in args.ns.split(",")], 100, 1024,
                                 args.quick)
    if args.device == "cuda":               # step part: the backend settings train.py uses
        configure_cuda()
        out["cuda_backends"] = dict(cudnn_benchmark=torch.backends.cudnn.benchmark,
                                    cudnn_tf32=torch.backends.cudnn.allow_tf32,
                                    matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    if not args.skip_step:
        modes = ["eager"] if args.quick else args.modes.split(",")
        if not set(modes) <= {"eager", "compiled"}:
            ap.error(f"--modes: unknown mode in {args.modes!r}")
        rows += step_grid(args.device, modes)
    out["rows"] = rows
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json(args.json or results_path("loss_and_model"), out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv)
