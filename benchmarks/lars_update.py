"""The LARS update: today's foreach version against a previous one, side by side.

    python benchmarks/lars_update.py                       # CUDA when present, else CPU
    python benchmarks/lars_update.py --widths 64 --compiled --threads 1
    python benchmarks/lars_update.py --baseline 238c45d    # any revision with model/lars.py

For each encoder width (ResNet-18 + projector, the paper's 4096-4096-1024 at width 64) the
same random gradients are stepped by:

    previous  the ``LARS`` of model/lars.py at ``--baseline REV`` (default 5cb8833: one
              foreach pass per param group; per-parameter Python list comprehensions for the
              momentum buffers and the scale/decay casts; a separate multiply and add for the
              decay), loaded from git history at run time: the tree at REV (``git archive``)
              goes into a temporary directory and its model/lars.py is imported from there
              under a module name of its own (``lars_baseline_<commit>``), with that tree first
              on sys.path and its own top-level packages (``model``, ...) in sys.modules only
              while it is imported; today's ``model`` is back in place afterwards
    foreach   model.lars.LARS: one update over all groups sharing (lr, momentum, nesterov),
              one unbind for the per-parameter scalars, addcmul for the decay
    tensor_lr the same with the lr as a 0-dim device tensor (the compiled / CUDA-graph step)
    compiled  (--compiled) torch.compile of the tensor-lr update (inductor)

Reported per row: median milliseconds per update; the number of operators dispatched per
update (counted with a TorchDispatchMode: each one is at least a kernel launch on a GPU, and a
foreach op on a CPU or with mixed shapes is a loop of them); and the largest difference of the
parameters from the previous version after the timed updates. The previous version and today's
must agree to float rounding. Without git, or where REV or its model/lars.py is missing (a
shallow clone), the script says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.common import environment, median_time, results_path, write_json  # noqa: E402
from model import EncoderConfig, build_encoder  # noqa: E402
from model.lars import LARS, lars_param_groups  # noqa: E402

DEFAULT_BASELINE = "5cb8833"
LARS_PATH = "model/lars.py"


class BaselineUnavailable(Exception):
    """The baseline revision, or its model/lars.py, cannot be read from git here."""


def _git(*args: str) -> bytes:
    """stdout of ``git ARGS`` in this repository; BaselineUnavailable with git's last stderr
    line when it fails or git cannot be run."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True)
    except OSError as e:  # no git executable
        raise BaselineUnavailable(f"git cannot be run ({e.strerror or e})") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BaselineUnavailable(lines[-1] if lines else "")
    return proc.stdout


def resolve_baseline(rev: str) -> str:
    """The full commit id of ``rev``, checked to hold model/lars.py."""
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except BaselineUnavailable as e:
        raise BaselineUnavailable(str(e) or f"no commit {rev!r} in this repository") from None
    try:
        _git("cat-file", "-e", f"{sha}:{LARS_PATH}")
    except BaselineUnavailable:
        raise BaselineUnavailable(f"commit {sha[:12]} has no {LARS_PATH}") from None
    return sha


def export_tree(sha: str, into: Path) -> Path:
    """The files of commit ``sha`` (git archive) under ``into``/tree."""
    tar_path = into / "tree.tar"
    tar_path.write_bytes(_git("archive", "--format=tar", sha))
    with tarfile.open(tar_path) as tf:
        tf.extractall(into / "tree", filter="data")
    tar_path.unlink()
    return into / "tree"


def import_baseline(sha: str, tree: Path) -> types.ModuleType:
    """``tree``/model/lars.py imported as module ``lars_baseline_<sha[:12]>``. While it runs,
    ``tree`` is first on sys.path and the top-level packages and modules of ``tree`` (``model``,
    ...) are taken out of sys.modules, so whatever the old file imports from the project comes
    from the same revision; afterwards sys.path and today's modules are as they were (the old
    modules stay reachable from the baseline module only)."""
    name = f"lars_baseline_{sha[:12]}"
    own = {p.stem if p.is_file() else p.name for p in tree.iterdir()
           if p.is_dir() or p.suffix == ".py"}
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.partition(".")[0] in own}
    sys.path.insert(0, str(tree))
    try:
        spec = importlib.util.spec_from_file_location(name, tree / LARS_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise BaselineUnavailable(f"{sha[:12]}:{LARS_PATH} fails to import here "
                                  f"({type(e).__name__}: {e})") from None
    finally:
        sys.path.remove(str(tree))
        for k in [k for k in sys.modules if k.partition(".")[0] in own]:
            del sys.modules[k]
        sys.modules.update(saved)
    if not (isinstance(getattr(module, "LARS", None), type)
            and issubclass(module.LARS, torch.optim.Optimizer)):
        raise BaselineUnavailable(f"{sha[:12]}:{LARS_PATH} has no LARS optimizer class")
    return module


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def setup(width: int, projector: tuple, device, kind: str, previous: type):
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(width=width, projector=projector)).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-2
    cls = previous if kind == "previous" else LARS
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
    p.add_argument("--baseline", default=DEFAULT_BASELINE, metavar="REV",
                   help=f"git revision whose {LARS_PATH} is the 'previous' update "
                        f"(default {DEFAULT_BASELINE})")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lars-baseline-") as tmp:
        try:
            sha = resolve_baseline(args.baseline)
            previous = import_baseline(sha, export_tree(sha, Path(tmp))).LARS
        except BaselineUnavailable as e:
            print(f"lars_update: --baseline {args.baseline} is not available ({e}): run in a "
                  f"git clone with its history ('git fetch --unshallow' in a shallow one) or "
                  f"pass --baseline REV naming a commit that has {LARS_PATH}", file=sys.stderr)
            return 2
        return run(args, sha, previous)


def run(args, sha: str, previous: type) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kinds = ["previous", "foreach", "tensor_lr"] + (["compiled"] if args.compiled else [])
    out = args.json or results_path("lars_update")
    doc = {**environment(), "what": f"LARS update, previous ({args.baseline}) vs foreach",
           "baseline": {"rev": args.baseline, "commit": sha, "path": LARS_PATH}, "rows": []}
    for width in [int(w) for w in args.widths.split(",")]:
        ref = None
        for kind in kinds:
            model, update = setup(width, args.projector, device, kind, previous)
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
