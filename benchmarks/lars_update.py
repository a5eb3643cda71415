"""The LARS update: today's foreach version against the previous one, side by side.

    python benchmarks/lars_update.py                       # CUDA when present, else CPU
    python benchmarks/lars_update.py --widths 64 --compiled --threads 1

For each encoder width (ResNet-18 + projector, the paper's 4096-4096-1024 at width 64) the
same random gradients are stepped by:

    previous  the update as of commit 5cb8833 (kept below as ``PreviousLARS``): one foreach
              pass per param group; per-parameter Python list comprehensions for the momentum
              buffers and the scale/decay casts; a separate multiply and add for the decay
    foreach   model.lars.LARS: one update over all groups sharing (lr, momentum, nesterov),
              one unbind for the per-parameter scalars, addcmul for the decay
    tensor_lr the same with the lr as a 0-dim device tensor (the compiled / CUDA-graph step)
    compiled  (--compiled) torch.compile of the tensor-lr update (inductor)

Reported per row: median milliseconds per update; the number of operators dispatched per
update (counted with a TorchDispatchMode: each one is at least a kernel launch on a GPU, and a
foreach op on a CPU or with mixed shapes is a loop of them); and the largest difference of the
parameters from the previous version after the timed updates. The previous version and today's
must agree to float rounding.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.common import environment, median_time, results_path, write_json  # noqa: E402
from model import EncoderConfig, build_encoder  # noqa: E402
from model.lars import LARS, lars_param_groups  # noqa: E402


class PreviousLARS(LARS):
    """The step of model/lars.py at commit 5cb8833 (the baseline), unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            if group["lars_exclude"]:
                steps = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
            else:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                local_lr = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                scale = torch.clamp(local_lr / lr, max=1.0) if group["clip"] else local_lr
                ok = (p_norm > 0) & (g_norm > 0)
                scale = torch.where(ok, scale, torch.ones_like(scale))
                decay = torch.where(ok, scale * wd, torch.zeros_like(scale))
                scale_l = [s.to(g.dtype) for s, g in zip(scale.unbind(0), grads)]
                decay_l = [s.to(p.dtype) for s, p in zip(decay.unbind(0), params)]
                steps = torch._foreach_mul(grads, scale_l)
                torch._foreach_add_(steps, torch._foreach_mul(params, decay_l))
            if mom:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, steps)
                if group["nesterov"]:
                    steps = torch._foreach_add(steps, bufs, alpha=mom)
                else:
                    steps = bufs
            torch._foreach_add_(params, steps, alpha=-lr)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def setup(width: int, projector: tuple, device, kind: str):
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(width=width, projector=projector)).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-2
    cls = PreviousLARS if kind == "previous" else LARS
    opt = cls(lars_param_groups(model), lr=0.3)
    lr_t = torch.tensor(0.3, device=device)
    if kind == "previous" or kind == "foreach":
        update = opt.step
    else:
        opt.init_state()
        update = lambda: opt.step(lr=lr_t)  # noqa: E731
        if kind == "compiled":
            update = torch.compile(update)
    return model, update


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--widths", default="16,64", help="encoder widths (64 = ResNet-18)")
    p.add_argument("--projector", default="4096,4096,1024",
                   type=lambda s: tuple(int(x) for x in s.split(",")), help="projector widths")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--updates", type=int, default=5, help="updates per timed repeat")
    p.add_argument("--compiled", action="store_true", help="also the torch.compile'd update")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kinds = ["previous", "foreach", "tensor_lr"] + (["compiled"] if args.compiled else [])
    out = args.json or results_path("lars_update")
    doc = {**environment(), "what": "LARS update, previous (5cb8833) vs foreach", "rows": []}
    for width in [int(w) for w in args.widths.split(",")]:
        ref = None
        for kind in kinds:
            model, update = setup(width, args.projector, device, kind)
            update()  # momentum buffers (and compilation)
            counter = OpCounter()
            with counter if kind != "compiled" else contextlib.nullcontext():
                update()  # counted (a compiled update runs as one graph: not counted)
            med, times = median_time(lambda: [update() for _ in range(args.updates)], args.repeats,
                                     warmup=1, device=device)
            params = [q.detach().clone() for q in model.parameters()]
            if ref is None:
                ref = params
            diff = max((a - b).abs().max().item() for a, b in zip(ref, params))
            row = {"width": width, "projector": list(args.projector), "kind": kind, "device": device.type,
                   "params": sum(q.numel() for q in model.parameters()),
                   "tensors": len(params), "ms_per_update": 1e3 * med / args.updates,
                   "ops_per_update": counter.ops if kind != "compiled" else None,
                   "max_param_diff_vs_previous": diff, "repeats_s": times}
            doc["rows"].append(row)
            prev = next(r for r in doc["rows"] if r["width"] == width and r["kind"] == "previous")
            row["speedup_vs_previous"] = prev["ms_per_update"] / row["ms_per_update"]
            write_json(out, doc)
            print(f"width {width:3d} {kind:10s} {row['ms_per_update']:9.2f} ms/update "
                  f"({row['speedup_vs_previous']:.2f}x) ops {row['ops_per_update']} "
                  f"max diff {diff:.1e}", flush=True)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, doc)
    print(f"lars_update: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
