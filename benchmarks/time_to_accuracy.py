"""Accuracy vs epochs and vs wall-clock minutes for one training run (the paper's Figs. 3/4).

    python benchmarks/time_to_accuracy.py --config configs/cifar10_n20_e10.yaml --data data/cifar10 \
        --points 0.25,0.5,1,2,5,10 [--out runs/tta] [--probe-args "--num-patches 128"]
    python benchmarks/time_to_accuracy.py --config configs/cifar10_n20_e30.yaml --data data/cifar10 \
        --stop-at 0.90 --points ""            # time to 90%: the monitor curve only, one run
    python benchmarks/time_to_accuracy.py --smoke          # demo scale on a CPU, a few minutes

One run with the preset's full schedule (the cosine spans --epochs, default the preset's) and
train.py's accuracy monitor on (``--monitor-every``, default every half epoch: kNN and linear
top-1 on a fixed set of M train and M test images, see train.py's Monitor) gives the
accuracy curve at every monitor point. The paper's full probe (probe.py) runs only at
``--points``: the run is trained up to each point in turn (train.py --run.max_steps, then
--resume: the same run, bit-exactly, as if uninterrupted; the monitor does not change it) and
the checkpoint there is probed. ``--stop-at ACC`` ends the run when the monitor reaches ACC;
its checkpoint is then probed as the last point. Minutes on the x-axis are the run's training
minutes (train.py's clock: the loop's wall time without the monitor's, summed over the resumed
pieces); probing time is recorded separately. Writes JSON (default benchmarks/results/) and a
PNG with both curves and, for CIFAR-10 runs that come within 30 points of them, the paper's
published numbers as target lines.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, results_path, write_json  # noqa: E402
from benchmarks.runner import RunFailed, probe_command, read_probe, run_logged, train_command  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from pipeline.formats import save_figure_atomic  # noqa: E402

# Tong et al. 2023, CIFAR-10, ResNet-18, n=200 patches: linear probe top-1 after E epochs.
PAPER_CIFAR10 = {1: 0.851, 10: 0.915, 30: 0.934}
SMOKE = dict(config="configs/demo.yaml", points="0.25,0.5,1", epochs=1.0,
             train_args="--num-patches 4 --data.max_images 1000 --model.projector 128,32 "
                        "--monitor.images 200 --monitor.patches 4 --monitor.epochs 10",
             probe_args="--num-patches 4 --probe-epochs 5 --max-images 500 --no-plots")


def run(cmd: list[str]) -> float:
    """Run a command from the repo root; return its wall time. Stops on failure."""
    try:
        return run_logged(cmd)
    except RunFailed as e:
        print(f"time_to_accuracy: error: {e}", file=sys.stderr)
        sys.exit(e.code)


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary_of(run_dir: Path) -> dict:
    return [r for r in metrics_of(run_dir) if r.get("summary")][-1]


def monitor_curve(run_dir: Path) -> list[dict]:
    """The run's monitor records (one per evaluation; a step evaluated twice, as after a
    resume, keeps its last record)."""
    by_step = {r["step"]: r for r in metrics_of(run_dir) if r.get("monitor") is True}
    keys = ("step", "epoch", "train_s", "knn_top1", "linear_top1", "monitor_s", "train_images",
            "test_images", "patches", "feature")
    return [{k: by_step[s].get(k) for k in keys} for s in sorted(by_step)]


def steps_per_epoch(run_dir: Path) -> tuple[int, int]:
    """(steps per epoch, total steps) from the run's checkpoint."""
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    return ckpt["steps_per_epoch"], ckpt["total_steps"]


def plot(result: dict, path: Path) -> None:
    """Accuracy vs epochs and vs training minutes: the monitor's curve (lines) and the full
    probe at the asked points (markers), both linear and kNN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, mon = result["points"], result.get("monitor", [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "epoch", "epochs"), (axes[1], "train_minutes", "training minutes")):
        if mon:
            xs = [m["epoch"] if key == "epoch" else m["train_s"] / 60 for m in mon]
            what = f"monitor ({mon[-1]['test_images']} test imgs, {mon[-1]['patches']} patches)"
            ax.plot(xs, [100 * m["linear_top1"] for m in mon], ".-", color="C0", lw=1.2,
                    label=f"{what}, linear")
            ax.plot(xs, [100 * m["knn_top1"] for m in mon], ".--", color="C1", lw=1.2,
                    label=f"{what}, kNN")
        if pts:
            ax.plot([p[key] for p in pts], [100 * p["linear_top1"] for p in pts], "o", color="C0",
                    ms=7, label="probe.py, linear")
            ax.plot([p[key] for p in pts], [100 * p["knn_top1"] for p in pts], "s", color="C1",
                    ms=6, alpha=0.8, label="probe.py, kNN")
        stop = result.get("stop")
        if stop and stop.get("reached"):
            ax.axvline(stop["epoch"] if key == "epoch" else stop["train_s"] / 60, color="C3", lw=0.8, ls=":")
            ax.axhline(100 * stop["stop_at"], color="C3", lw=0.8, ls=":")
        best = max([p["linear_top1"] for p in pts] + [m["linear_top1"] for m in mon] + [0.0])
        if result.get("dataset_name", "").startswith("cifar10") and not result["smoke"] \
                and best >= min(PAPER_CIFAR10.values()) - 0.30:  # else they squash the curves
            for e, acc in PAPER_CIFAR10.items():
                ax.axhline(100 * acc, color="gray", lw=0.8, ls=":")
                ax.text(ax.get_xlim()[0], 100 * acc, f" paper, n=200, {e} ep: {100 * acc:.1f}%", fontsize=7,
                        va="bottom", color="gray")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    hw = result["environment"]["hardware"]
    fig.suptitle(f"{result['config']} on {result.get('dataset_name', '?')} "
                 f"({hw.get('gpu') or hw.get('cpu_model', '?')})", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10_n20_e10.yaml")
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--out", default="runs/time_to_accuracy")
    p.add_argument("--points", default="0.25,0.5,1,2,5,10",
                   help="epochs at which to run the full probe; \"\" for none (the monitor curve only)")
    p.add_argument("--epochs", type=float, help="schedule length (default: the largest point)")
    p.add_argument("--monitor-every", default="0.5",
                   help="train.py --monitor.every: steps (>= 1) or a fraction of an epoch; 0 = no monitor")
    p.add_argument("--stop-at", type=float, help="end the run when the monitor reaches this accuracy "
                                                 "(fraction); its checkpoint is probed as the last point")
    p.add_argument("--stop-metric", default="linear", choices=("linear", "knn"))
    p.add_argument("--train-args", default="", help="extra train.py arguments (--monitor.images 2000 ...)")
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
    try:
        points = sorted(float(x) for x in a.points.split(",") if x.strip())
        monitor_every = float(a.monitor_every)
    except ValueError:
        p.error(f"--points {a.points!r} / --monitor-every {a.monitor_every!r}: numbers, e.g. 0.5,1 and 0.25")
    if not points and not a.epochs:
        p.error("--points \"\": give --epochs (the schedule length) for a run without probe points")
    if not points and not monitor_every:
        p.error("--points \"\" with --monitor-every 0: nothing would be measured")
    if a.stop_at is not None and not monitor_every:
        p.error("--stop-at needs the monitor (--monitor-every > 0)")
    epochs = a.epochs or points[-1]
    if points and points[-1] > epochs + 1e-9:
        p.error(f"--points: {points[-1]} is beyond the schedule (--epochs {epochs})")
    out = Path(a.out)
    py = sys.executable
    monitor = ["--monitor.every", a.monitor_every] if monitor_every else []
    if a.stop_at is not None:
        monitor += ["--stop-at", str(a.stop_at), "--stop-metric", a.stop_metric]
    base = train_command(a.config, a.data, out / "run", "--epochs", str(epochs), *monitor,
                         *shlex.split(a.train_args))
    result = {"config": a.config, "data": a.data, "epochs": epochs, "smoke": a.smoke,
              "train_args": a.train_args, "probe_args": a.probe_args,
              "monitor_every": monitor_every, "stop_at": a.stop_at, "stop_metric": a.stop_metric,
              "command": " ".join(shlex.quote(x) for x in [py, *sys.argv]), "points": [],
              "environment": environment()}
    done_steps, process_s, stop = 0, 0.0, None
    for e in points or [epochs]:
        if not points:  # the monitor curve only: the whole schedule in one train.py call
            resume = ["--resume"] if (out / "run" / "ckpt.pt").exists() else []
            process_s += run(base + resume)
        elif not (out / "run" / "ckpt.pt").exists():  # create the run; learn steps/epoch from it
            process_s += run(base + ["--run.max_steps", "1"])
            done_steps = 1
        spe, total = steps_per_epoch(out / "run")
        target = min(total, max(1, math.ceil(e * spe - 1e-9)))
        if points and target > done_steps:  # resume the same run up to the point
            process_s += run(base + ["--resume", "--run.max_steps", str(target - done_steps)])
        summary = summary_of(out / "run")
        done_steps = load_checkpoint(out / "run" / "ckpt.pt")["step"]
        train_s = summary["train_s"]  # the run's training clock, all pieces, monitor excluded
        stop = summary.get("stop")
        reached = bool(stop and stop.get("reached"))
        if not points and not reached:
            break
        probe_dir = out / (f"probe_e{e:g}" if not reached else f"probe_stop_s{done_steps}")
        probe_wall = run(probe_command(out / "run" / "ckpt.pt", a.data, probe_dir, *shlex.split(a.probe_args)))
        r = read_probe(probe_dir)
        result["dataset_name"] = r.get("dataset", {}).get("name", Path(a.data).name) \
            if isinstance(r.get("dataset"), dict) else Path(a.data).name
        result["points"].append({"epoch": done_steps / spe, "step": done_steps,
                                 "train_minutes": train_s / 60, "train_process_minutes": process_s / 60,
                                 "probe_minutes": probe_wall / 60,
                                 "linear_top1": r["linear_top1"], "knn_top1": r["knn_top1"],
                                 "num_test": r.get("num_test")})
        print(f"epoch {done_steps / spe:.3g}: linear {100 * r['linear_top1']:.2f}% kNN "
              f"{100 * r['knn_top1']:.2f}% after {train_s / 60:.2f} training minutes"
              + (" (the monitor reached --stop-at)" if reached else ""), flush=True)
        if reached:
            result["points"][-1]["at_stop"] = True  # probed where --stop-at ended the run
            break
    result.setdefault("dataset_name", Path(a.data).name)
    result["monitor"] = monitor_curve(out / "run")
    result["stop"] = stop
    if stop and stop.get("reached"):
        print(f"time to {stop['metric']} {100 * stop['stop_at']:.1f}% (monitor): step {stop['step']}, "
              f"epoch {stop['epoch']:.3g}, {stop['train_s'] / 60:.2f} training minutes")
    tag = "smoke" if a.smoke else Path(a.config).stem
    path = Path(a.json) if a.json else results_path(f"time_to_accuracy_{tag}")
    write_json(path, result)
    plot(result, path.with_suffix(".png"))
    print(f"time_to_accuracy: wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
