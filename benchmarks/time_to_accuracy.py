"""Accuracy vs epochs and vs wall-clock minutes for one training run (the paper's Figs. 3/4).

    python benchmarks/time_to_accuracy.py --config configs/cifar10_n20_e10.yaml --data data/cifar10 \
        --points 0.25,0.5,1,2,5,10 [--out runs/tta] [--probe-args "--test-patches 128"]
    python benchmarks/time_to_accuracy.py --smoke          # demo scale on a CPU, a few minutes

One run with the preset's full schedule (the cosine spans --epochs, default the preset's) is
trained up to each point in turn (train.py --run.max_steps, then --resume: the same run,
bit-exactly, as if uninterrupted), and the checkpoint at each point is probed with probe.py.
Training and probing wall-clock time are recorded separately; minutes on the x-axis are
cumulative training minutes. Writes JSON (default benchmarks/results/) and a PNG with the
paper's published CIFAR-10 numbers as target lines.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, results_path, write_json  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from pipeline.formats import save_figure_atomic  # noqa: E402

# Tong et al. 2023, CIFAR-10, ResNet-18, n=200 patches: linear probe top-1 after E epochs.
PAPER_CIFAR10 = {1: 0.851, 10: 0.915, 30: 0.934}
SMOKE = dict(config="configs/demo.yaml", points="0.25,0.5,1", epochs=1.0,
             train_args="--num-patches 4 --data.max_images 1000 --model.projector 128,32",
             probe_args="--test-patches 4 --epochs 5 --max-images 500 --no-plots")


def run(cmd: list[str]) -> float:
    """Run a command from the repo root; return its wall time. Stops on failure."""
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print(f"time_to_accuracy: error: {cmd[1]} exited {proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode)
    return time.perf_counter() - t


def summary_of(run_dir: Path) -> dict:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("summary")][-1]


def steps_per_epoch(run_dir: Path) -> tuple[int, int]:
    """(steps per epoch, total steps) from the run's checkpoint."""
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    return ckpt["steps_per_epoch"], ckpt["total_steps"]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "epoch", "epochs"), (axes[1], "train_minutes", "training minutes")):
        ax.plot([p[key] for p in pts], [100 * p["linear_top1"] for p in pts], "o-", label="ours (linear)")
        ax.plot([p[key] for p in pts], [100 * p["knn_top1"] for p in pts], "s--", alpha=0.6, label="ours (kNN)")
        if result["dataset_name"].startswith("cifar10") and not result["smoke"]:
            for e, acc in PAPER_CIFAR10.items():
                ax.axhline(100 * acc, color="gray", lw=0.8, ls=":")
                ax.text(ax.get_xlim()[0], 100 * acc, f" paper, n=200, {e} ep: {100 * acc:.1f}%", fontsize=7,
                        va="bottom", color="gray")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    hw = result["environment"]["hardware"]
    fig.suptitle(f"{result['config']} on {result['dataset_name']} ({hw.get('gpu') or hw.get('cpu_model', '?')})",
                 fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10_n20_e10.yaml")
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--out", default="runs/time_to_accuracy")
    p.add_argument("--points", default="0.25,0.5,1,2,5,10", help="epochs at which to probe")
    p.add_argument("--epochs", type=float, help="schedule length (default: the largest point)")
    p.add_argument("--train-args", default="", help="extra train.py arguments")
    p.add_argument("--probe-args", default="", help="extra probe.py arguments")
    p.add_argument("--json", help="output JSON (default benchmarks/results/time_to_accuracy_<...>.json)")
    p.add_argument("--smoke", action="store_true", help="demo scale for a CPU (minutes)")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            if k == "epochs":
                a.epochs = a.epochs or v
            elif k in ("train_args", "probe_args"):
                setattr(a, k, f"{v} {getattr(a, k)}".strip())
            elif getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    points = sorted(float(x) for x in a.points.split(","))
    epochs = a.epochs or points[-1]
    if points[-1] > epochs + 1e-9:
        p.error(f"--points: {points[-1]} is beyond the schedule (--epochs {epochs})")
    out = Path(a.out)
    py = sys.executable
    base = [py, "train.py", "--config", a.config, "--data", a.data, "--out", str(out / "run"),
            "--epochs", str(epochs), *shlex.split(a.train_args)]
    result = {"config": a.config, "data": a.data, "epochs": epochs, "smoke": a.smoke,
              "train_args": a.train_args, "probe_args": a.probe_args,
              "command": " ".join(shlex.quote(x) for x in [py, *sys.argv]), "points": [],
              "environment": environment()}
    done_steps, train_s, process_s = 0, 0.0, 0.0
    for e in points:
        if not (out / "run" / "ckpt.pt").exists():  # create the run; learn steps/epoch from it
            process_s += run(base + ["--run.max_steps", "1"])
            train_s += summary_of(out / "run")["wall_s"]
            done_steps = 1
        spe, total = steps_per_epoch(out / "run")
        target = min(total, max(1, math.ceil(e * spe - 1e-9)))
        if target > done_steps:  # resume the same run up to the point
            process_s += run(base + ["--resume", "--run.max_steps", str(target - done_steps)])
            train_s += summary_of(out / "run")["wall_s"]
            done_steps = target
        probe_dir = out / f"probe_e{e:g}"
        probe_wall = run([py, "probe.py", "--checkpoint", str(out / "run" / "ckpt.pt"), "--data", a.data,
                          "--out", str(probe_dir), *shlex.split(a.probe_args)])
        r = json.loads((probe_dir / "results.json").read_text())
        result["dataset_name"] = r.get("dataset", {}).get("name", Path(a.data).name) \
            if isinstance(r.get("dataset"), dict) else Path(a.data).name
        result["points"].append({"epoch": done_steps / spe, "step": done_steps,
                                 "train_minutes": train_s / 60, "train_process_minutes": process_s / 60,
                                 "probe_minutes": probe_wall / 60,
                                 "linear_top1": r["linear_top1"], "knn_top1": r["knn_top1"],
                                 "num_test": r.get("num_test")})
        print(f"epoch {done_steps / spe:.3g}: linear {100 * r['linear_top1']:.2f}% kNN "
              f"{100 * r['knn_top1']:.2f}% after {train_s / 60:.2f} training minutes", flush=True)
    tag = "smoke" if a.smoke else Path(a.config).stem
    path = Path(a.json) if a.json else results_path(f"time_to_accuracy_{tag}")
    write_json(path, result)
    plot(result, path.with_suffix(".png"))
    print(f"time_to_accuracy: wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
