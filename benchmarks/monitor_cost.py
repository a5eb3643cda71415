"""The accuracy monitor's cost: its share of training time, measured side by side in one run.

    python benchmarks/monitor_cost.py --config configs/cifar10_n20_e1.yaml --data data/cifar10
    python benchmarks/monitor_cost.py --config configs/cifar10_n20_e1.yaml --data data/cifar10 \
        --train-args "--model.width 16 --model.projector 1024,256" --steps 3 --repeats 3   # a CPU

Builds train.py's Trainer (the preset, then --train-args; the monitor at its defaults unless
--train-args sets monitor.* keys) and alternates, --repeats times: --steps training steps
(Trainer.train_step on the real source, the device synchronized after them) and one monitor
evaluation (Monitor.evaluate: the bag-of-features of M train + M test images x patches, kNN,
linear classifier), after one untimed step and evaluation of warm-up. From the medians t_step
and t_eval, for the run's epoch (its steps per epoch S) and each --every (a fraction of an
epoch, rounded to whole steps k as train.py does):

    evals per epoch = S / k,   overhead = (S / k) t_eval / (S t_step) = t_eval / (k t_step)
    share of the wall time = overhead / (1 + overhead)

Interleaving the two keeps them under the same machine load. Writes JSON (hardware, versions,
command, commit, date) to benchmarks/results/monitor_cost_<host>_<date>.json.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.common import endless, environment, results_path, sync, write_json  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

import train  # noqa: E402


def measure(tr: "train.Trainer", steps: int, repeats: int) -> dict:
    """Median seconds per training step and per monitor evaluation, interleaved."""
    batches = endless(tr.source)
    step = 0

    def train_steps(k: int) -> float:
        nonlocal step
        sync(tr.device)
        t = time.perf_counter()
        for _ in range(k):
            tr.train_step(next(batches), step)
            step += 1
        sync(tr.device)
        return (time.perf_counter() - t) / k

    def evaluate() -> dict:
        sync(tr.device)
        t = time.perf_counter()
        r = tr.monitor.evaluate(tr.model)
        return {**r, "eval_s": time.perf_counter() - t}

    tr.model.train()
    train_steps(1), evaluate()  # warm-up: allocator, cudnn autotuning of both shapes
    step_s, evals = [], []
    for _ in range(repeats):
        step_s.append(train_steps(steps))
        evals.append(evaluate())
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"step_s": med(step_s), "eval_s": med([e["eval_s"] for e in evals]),
            "features_s": med([e["features_s"] for e in evals]),
            "heads_s": med([e["heads_s"] for e in evals]),
            "step_s_all": step_s, "eval_s_all": [e["eval_s"] for e in evals],
            "last_knn_top1": evals[-1]["knn_top1"], "last_linear_top1": evals[-1]["linear_top1"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10_n20_e1.yaml")
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--train-args", default="", help="extra train.py overrides (--model.width 16 ...)")
    p.add_argument("--every", default="0.25,0.5", help="monitor intervals to report (fractions of an epoch)")
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="output (default benchmarks/results/monitor_cost_<host>_<date>.json)")
    a = p.parse_args(argv)
    try:
        everies = [float(x) for x in a.every.split(",")]
    except ValueError:
        p.error(f"--every {a.every!r}: fractions of an epoch, e.g. 0.25,0.5")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg, _ = train.parse_args(["--config", a.config, "--data", a.data, "--out", str(Path(tmp) / "run"),
                                       "--run.tensorboard", "false", "--monitor.every", "1",
                                       *shlex.split(a.train_args)])
            tr = train.Trainer(cfg, resume=False)
        except UserError as e:
            print(f"monitor_cost: error: {e}", file=sys.stderr)
            return 2
        try:
            m = measure(tr, a.steps, a.repeats)
        finally:
            tr.source.close()
    d, mc = cfg.data, cfg.monitor
    S = tr.steps_per_epoch
    rows = []
    for e in everies:
        k = max(1, round(e * S))
        overhead = m["eval_s"] / (k * m["step_s"])
        rows.append({"every_epochs": e, "every_steps": k, "evals_per_epoch": S / k,
                     "overhead": overhead, "share_of_wall": overhead / (1 + overhead)})
        print(f"every {e:g} epoch ({k} steps): {S / k:.1f} evaluations per epoch, monitor time "
              f"{100 * overhead:.2f}% of training time ({100 * overhead / (1 + overhead):.2f}% of the wall)")
    result = {**environment(), "config": a.config, "data": a.data, "train_args": a.train_args,
              "device": str(tr.device), "amp": tr.amp, "num_patches": d.num_patches,
              "batch_size": d.batch_size, "width": cfg.model.width, "projector": list(cfg.model.projector),
              "steps_per_epoch": S, "monitor": {"images": tr.monitor.counts, "patches": mc.patches,
                                                "feature": mc.feature, "epochs": mc.epochs,
                                                "knn_k": mc.knn_k, "images_per_call": tr.monitor.batch},
              "steps_per_repeat": a.steps, "repeats": a.repeats, **m,
              "eval_in_steps": m["eval_s"] / m["step_s"], "rows": rows}
    print(f"monitor_cost: {d.num_patches} patches x {d.batch_size} images per step: {m['step_s']:.3f}s; "
          f"one evaluation ({mc.images} + {mc.images} images x {mc.patches} patches): {m['eval_s']:.3f}s "
          f"(features {m['features_s']:.3f}s, kNN + linear {m['heads_s']:.3f}s) = "
          f"{result['eval_in_steps']:.1f} training steps")
    out = Path(a.json) if a.json else results_path("monitor_cost")
    write_json(out, result)
    print(f"monitor_cost: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
