"""Where a run's wall-clock goes outside its training loop: this tree against a baseline commit.

    python benchmarks/startup.py --data data/cifar10                        # CPU-sized defaults
    python benchmarks/startup.py --data data/cifar10 --config configs/cifar10_n20_e1.yaml \
        --train-args "" --probe-args "" --baseline none                     # a GPU, full sizes

Runs ``train.py`` and then ``probe.py`` on its checkpoint as separate processes, for this tree
and for ``--baseline`` (a commit, exported with ``git archive`` into a temporary directory;
``none`` skips it), alternating, ``--repeats`` times each. Per process: the wall-clock from
spawn to exit (what a user waits for), the training loop's own time (metrics.jsonl summary
``wall_s``) and so the time outside the loop, and where this tree reports them the time to the
first step and its start-up breakdown (imports, data, model, flop_count, first_step,
final_checkpoint, ...); for the probe its ``timings_s`` (extraction, linear_probe, knn, total).
Medians over the repeats; the JSON keeps every run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, results_path, write_json  # noqa: E402

CPU_TRAIN = ("--num-patches 4 --data.batch_size 20 --run.max_steps 3 --model.projector 512,128 "
             "--run.tensorboard false --device cpu")
CPU_PROBE = "--max-images 200 --num-patches 2 --probe-epochs 5 --no-plots --quiet --device cpu"


def export_tree(commit: str, into: Path) -> Path:
    """The files of ``commit`` (git archive) under ``into``."""
    data = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                          capture_output=True).stdout
    tar_path = into / "tree.tar"
    tar_path.write_bytes(data)
    with tarfile.open(tar_path) as tf:
        tf.extractall(into / "tree", filter="data")
    return into / "tree"


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Seconds from spawn to exit of ``cmd`` (its output to ``log``); raises on failure."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return wall


def one_run(tree: Path, args, work: Path) -> dict:
    """train.py then probe.py from ``tree``: process walls and what the run files report."""
    py = sys.executable
    out = work / "run"
    train_cmd = [py, "train.py", "--config", args.config, "--data", str(Path(args.data).resolve()),
                 "--out", str(out), *shlex.split(args.train_args)]
    train_wall = timed(train_cmd, tree, work / "train.log")
    summary = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    row = {"train_process_s": train_wall, "train_loop_s": summary["wall_s"],
           "outside_loop_s": train_wall - summary["wall_s"]}
    for key in ("time_to_first_step_s", "startup_s", "patches_per_s"):
        if key in summary:
            row[key] = summary[key]
    if args.probe_args is not None:
        probe_cmd = [py, "probe.py", "--checkpoint", str(out / "ckpt.pt"), "--data",
                     str(Path(args.data).resolve()), "--out", str(work / "probe"),
                     "--cache-dir", str(work / "features"), *shlex.split(args.probe_args)]
        row["probe_process_s"] = timed(probe_cmd, tree, work / "probe.log")
        res = json.loads((work / "probe" / "results.json").read_text())
        row["probe_timings_s"] = res["timings_s"]
        row["probe_outside_total_s"] = row["probe_process_s"] - res["timings_s"]["total"]
    return row


def medians(runs: list[dict]) -> dict:
    out = {}
    for key in ("train_process_s", "train_loop_s", "outside_loop_s", "time_to_first_step_s",
                "probe_process_s", "probe_outside_total_s"):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = statistics.median(vals)
    for key in ("startup_s", "probe_timings_s"):
        parts = {k for r in runs for k in r.get(key, {})}
        if parts:
            out[key] = {k: statistics.median(r[key][k] for r in runs if k in r.get(key, {}))
                        for k in sorted(parts)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--train-args", default=CPU_TRAIN, help="extra train.py arguments (one string)")
    p.add_argument("--probe-args", default=CPU_PROBE,
                   help="extra probe.py arguments (one string); 'skip' for no probe")
    p.add_argument("--baseline", default="5cb8833", help="commit to compare with; 'none' to skip")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.probe_args == "skip":
        args.probe_args = None
    out = args.json or results_path("startup")
    doc = {**environment(), "settings": vars(args) | {"json": str(out)}, "runs": {}, "median": {}}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        trees = {"current": ROOT}
        if args.baseline != "none":
            trees[f"baseline_{args.baseline}"] = export_tree(args.baseline, Path(tmp))
        for rep in range(args.repeats):
            for name, tree in trees.items():
                work = Path(tmp) / f"{name}_{rep}"
                work.mkdir()
                row = one_run(tree, args, work)
                doc["runs"].setdefault(name, []).append(row)
                doc["median"][name] = medians(doc["runs"][name])
                write_json(out, doc)
                print(f"{name:22s} #{rep}: train process {row['train_process_s']:6.1f} s "
                      f"(loop {row['train_loop_s']:.1f} s, outside {row['outside_loop_s']:.1f} s)"
                      + (f", probe process {row['probe_process_s']:.1f} s" if "probe_process_s" in row else ""),
                      flush=True)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, doc)
    print(f"startup: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
