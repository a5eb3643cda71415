"""Map which convolutions hit oneDNN's broken AVX2 1x1 weight backward (docs/troubleshooting.md).

    .venv/bin/python tools/onednn_sweep.py                        # ~20 min on 2 cores
    .venv/bin/python tools/onednn_sweep.py --isa ALL --trials 2     # no cap: the CPU's own kernels
    .venv/bin/python tools/onednn_sweep.py --isa SSE41 --quick --trials 2

Each trial is a child process (``ONEDNN_MAX_CPU_ISA=AVX2`` unless ``--isa``) that runs one
conv's forward + backward ``--passes`` times on fresh random input and compares the weight
gradient with a float64 NCHW reference; a trial is "ok" (relative error < 1e-4), "wrong"
(larger), "hang" (no result after ``--hang-s`` seconds; killed) or "crash" (killed by a signal
or a non-zero exit). The outcome is random from run to run, so every case runs ``--trials``
times. Writes docs/results/onednn_<isa>_sweep.{json,md} (``native`` for ALL; atomically) with
the versions (``torch.__config__.show()``'s oneDNN line), the CPU model and its vector flags.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.formats import write_bytes_atomic, write_json_atomic  # noqa: E402

CHILD = """
import sys, torch
cin, cout, k, stride, fmt, batch, hw, passes = sys.argv[1:9]
cin, cout, k, stride, batch, hw, passes = map(int, (cin, cout, k, stride, batch, hw, passes))
pad = k // 2
torch.manual_seed(0)
conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)
ref = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False).double()
ref.weight.data.copy_(conv.weight.data)
mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
conv = conv.to(memory_format=mf)
print("ready", flush=True)   # imported and built: a timeout from here on is a hang
worst = 0.0
for _ in range(passes):
    x = torch.randn(batch, cin, hw, hw)
    conv.weight.grad = ref.weight.grad = None
    y = conv(x.contiguous(memory_format=mf).requires_grad_())
    y.backward(g := torch.randn_like(y))
    ref(x.double().requires_grad_()).backward(g.double())
    gr = ref.weight.grad
    worst = max(worst, ((conv.weight.grad.double() - gr).norm() / gr.norm()).item())
print(worst)
"""

# (in channels, out channels, kernel, stride, memory format, batch, side): the issue's
# reproduction is (4, 8, 1, 2, channels_last, 24, 32); each group varies one thing
BASE = (4, 8, 1, 2, "channels_last", 24, 32)


def cases(quick: bool) -> list[tuple[str, tuple]]:
    out = [("in channels", BASE[:0] + (c,) + BASE[1:]) for c in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16)]
    out += [("batch", BASE[:5] + (b,) + BASE[6:]) for b in (1, 2, 4, 8, 64)]
    out += [("out channels", BASE[:1] + (c,) + BASE[2:]) for c in (4, 16, 64)]
    out += [("side", BASE[:6] + (s,)) for s in (8, 16, 31)]
    out += [("stride", BASE[:3] + (s,) + BASE[4:]) for s in (1, 3)]
    out += [("kernel 3x3", BASE[:2] + (3,) + BASE[3:])]
    out += [("layout", BASE[:4] + ("nchw",) + BASE[5:])]
    out += [("width-16 shortcut", (16, 32, 1, 2, "channels_last", 24, 32))]
    if quick:
        keep = {1, 2, 4, 7, 8}
        out = [(g, c) for g, c in out if g != "in channels" or c[0] in keep][:12]
    return out


def trial(case: tuple, passes: int, hang_s: float, isa: str) -> tuple[str, float | None]:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, *map(str, case), str(passes)],
                           env=env, capture_output=True, text=True, timeout=hang_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return ("hang" if "ready" in out else "slow start (no verdict)"), None
    if p.returncode != 0:
        if p.returncode < 0:
            return f"crash ({signal.Signals(-p.returncode).name})", None
        last = (p.stderr.strip().splitlines() or [""])[-1][:60]
        return f"crash ({last or f'exit {p.returncode}'})", None
    err = float(p.stdout.split()[-1])
    return ("ok" if err < 1e-4 else "wrong"), err


def versions() -> dict:
    import torch
    cfg = torch.__config__.show()
    m = re.search(r"MKL-DNN (v[\d.]+) \(Git Hash (\w+)\)", cfg)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    return {"torch": torch.__version__,
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags], "onednn": m.group(1) if m else None,
            "onednn_commit": m.group(2) if m else None, "cpu": cpu, "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5, help="forward + backward passes per trial")
    ap.add_argument("--hang-s", type=float, default=30.0, help="a trial still running after this is a hang")
    ap.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA for the children")
    ap.add_argument("--quick", action="store_true", help="a dozen cases")
    ap.add_argument("--out", type=Path, default=None,
                    help="path without suffix; default docs/results/onednn_<isa>_sweep")
    a = ap.parse_args()
    if a.out is None:
        tag = "native" if a.isa.upper() == "ALL" else a.isa.lower()
        a.out = ROOT / "docs" / "results" / f"onednn_{tag}_sweep"
    t0 = time.time()
    trial((8, 8, 1, 1, "nchw", 1, 8), 1, 120, a.isa)  # warm the file cache: torch's first import is slow
    rows = []
    for group, case in cases(a.quick):
        outcomes = [trial(case, a.passes, a.hang_s, a.isa) for _ in range(a.trials)]
        rows.append({"group": group, "case": dict(zip(
            ("in_channels", "out_channels", "kernel", "stride", "layout", "batch", "side"), case)),
            "trials": [{"outcome": o, "rel_err": e} for o, e in outcomes]})
        print(group, case, [o for o, _ in outcomes], flush=True)
    res = {"isa_cap": a.isa, "trials": a.trials, "passes": a.passes, "hang_s": a.hang_s,
           "threads": os.environ.get("OMP_NUM_THREADS", "default"), **versions(),
           "wall_s": round(time.time() - t0), "rows": rows}
    write_json_atomic(a.out.with_suffix(".json"), res)
    write_bytes_atomic(a.out.with_suffix(".md"), table(res).encode())
    print(table(res))


def table(res: dict) -> str:
    head = (f"<!-- generated by tools/onednn_sweep.py from the .json beside it; "
            "do not edit -->\n"
            f"ONEDNN_MAX_CPU_ISA={res['isa_cap']}; torch {res['torch']}, oneDNN {res['onednn']} "
            f"({res['onednn_commit']}); {res['cpu']}"
            + (f" ({', '.join(res['cpu_flags'])})" if res.get("cpu_flags") else "")
            + f", {res['cpus']} CPUs; "
            f"{res['trials']} trials per case, each {res['passes']} forward + backward passes "
            f"(a trial is a hang after {res['hang_s']:.0f} s).\n\n"
            "| varied | in ch | out ch | kernel | stride | layout | batch | side | outcomes |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in res["rows"]:
        c = r["case"]
        outs = [t["outcome"] for t in r["trials"]]
        errs = [t["rel_err"] for t in r["trials"] if t["outcome"] == "wrong"]
        summary = ", ".join(f"{o} x{outs.count(o)}" for o in dict.fromkeys(outs))
        if errs:
            summary += f" (rel. error up to {max(errs):.2g})"
        lines.append(f"| {r['group']} | {c['in_channels']} | {c['out_channels']} | {c['kernel']}x{c['kernel']} "
                     f"| {c['stride']} | {c['layout']} | {c['batch']} | {c['side']} | {summary} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
