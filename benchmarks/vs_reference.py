"""The authors' code beside ours: same data, same machine, same schedule, same probe.

    git clone https://github.com/tsb0601/EMP-SSL ../EMP-SSL            # their code, never copied here
    python benchmarks/vs_reference.py --ref-dir ../EMP-SSL --data data/cifar10                # GPU: their README's "1 epoch"
    python benchmarks/vs_reference.py --ref-dir ../EMP-SSL --data data/cifar10 --smoke        # CPU, minutes
    python benchmarks/vs_reference.py --ref-dir ../EMP-SSL --data data/cifar10 --batch-size 4 --steps 300 \\
        --repeats 3 --device cpu --probe-args "--num-patches 4 --probe-epochs 10 --max-images 1000"
                                                # the committed CPU measurement: ~1 h on 2 cores

Per repeat r (seed = --seed + r on both sides; the side that goes first alternates):

    theirs  their main.py, unchanged, with its own argv (--data cifar10 --epoch E --patch_sim 200
            --arch resnet18-cifar --num_patches n --lr 0.3 --bs B), run by
            benchmarks/ref_bootstrap.py, which substitutes their dataset constructor with one
            reading our converted split through their own PIL transform (dataset/aug.py), makes
            their .cuda() calls work on a CPU, seeds, and stops after the checkpoint of epoch
            ``--keep-epochs`` (their README's "1 epoch" = --epoch 2, checkpoint 0). Their
            checkpoint is converted to ours (model/reference_ckpt.py).
    ours    train.py --config configs/cifar10_n20_e1.yaml with the same n, batch, lr, data,
            seed and schedule, stopped after the same number of steps (--run.max_steps).
    both    probed by probe.py with the same --probe-args and probe seed (so the same patches),
            then compared paired on the same test pictures (tools/compare_probes.py:
            A = ours, B = theirs; the difference is ours - theirs).

Schedule: their cosine spans T = (50000 // B) * E steps (main.py's formula, whatever the data
size); ours is given --epochs T / steps_per_epoch so its cosine spans the same T steps. With
``--steps K`` each side trains K steps per epoch on K * B images: theirs on a seeded random
subset of the split, ours on a fresh random subset each epoch (--data.max_images); without it
both train on the whole split.

Measured per side: training wall-clock (theirs: first batch request of epoch 0 to the end of the
kept checkpoint's torch.save; ours: train.py's loop time, final checkpoint included),
patches/s = steps * B * n / wall, steady patches/s over the steps after the first
``--warmup-steps``, the share of time spent waiting for data, the loop's CPU seconds (user +
system; theirs with its DataLoader workers) and patches per CPU second (on a shared machine the
steadier figure), peak memory (process max RSS; theirs also the largest DataLoader worker's,
shared pages included; on CUDA torch's peak allocated), and the probe's accuracies.
Their tracked files are hashed before and after (sha256), and a checkout whose tracked files
differ from its commit is refused. JSON: <out>/vs_reference.json, updated after every side and
probe (hardware, versions, command, both commits, load average); probe results beside it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import compare_probes  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, host_kind, renamed  # noqa: E402
from benchmarks.runner import (RunFailed, log_tail as _tail, probe_command, read_probe, run_logged,
                               train_command)  # noqa: E402
from model.checkpoint import CheckpointError  # noqa: E402
from emp_ssl.checkpoints import convert_reference_checkpoint  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import load_manifest, require_format, require_split, sha256_file, write_json_atomic  # noqa: E402
from pipeline.patches import AugmentParams  # noqa: E402

REPO = "github.com/tsb0601/EMP-SSL"
# the files their training imports; their presence identifies a checkout
REQUIRED = ("main.py", "dataset/datasets.py", "dataset/aug.py", "model/model.py", "lars.py",
            "loss.py", "func.py")
THEIR_DATASET_SIZE = 50000  # main.py: num_converge = (50000 // bs) * epoch
# their dataset/aug.py recipe in this project's terms: RandomResizedCrop(32, scale=(0.25, 0.25),
# ratio=1) of a 32px image = a 16px crop resized to 32; flip 0.5; ColorJitter(0.4, 0.4, 0.4, 0.2)
# with p 0.8 (op order random per call); grayscale 0.2; PIL Gaussian blur sigma ~ U(0.1, 2.0)
# with p 0.1; solarize (threshold 128) with p 0.1; Normalize(0.5, 0.5)
THEIR_PATCH = {"patch_size": 16, "out_size": 32}
THEIR_AUGMENT = AugmentParams(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                              hue=0.2, gray_p=0.2, blur_p=0.1, blur_sigma=(0.1, 2.0), solarize_p=0.1,
                              solarize_threshold=128 / 255, jitter_order="random")
SIDES = ("theirs", "ours")


# --------------------------------------------------------------------------- their checkout

def _git(ref: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(ref), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def check_ref_dir(ref: Path) -> None:
    missing = [f for f in REQUIRED if not (ref / f).is_file()]
    if missing:
        raise UserError(f"--ref-dir {ref}: not a checkout of {REPO} (missing {', '.join(missing)}); "
                        f"get it with `git clone https://{REPO} {ref}`")


def ref_files(ref: Path) -> list[str]:
    """Their files, relative: git's tracked files when ``ref`` is a git checkout, else every file
    except .git, __pycache__ and *.pyc."""
    listed = _git(ref, "ls-files", "-z") if (ref / ".git").exists() else None
    if listed is not None:
        return sorted(f for f in listed.split("\0") if f and (ref / f).is_file())
    return sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()
                  and ".git" not in p.parts and "__pycache__" not in p.parts and p.suffix != ".pyc")


def ref_hashes(ref: Path) -> dict:
    """sha256 of each of their files and of the whole list ("tree")."""
    files = {f: sha256_file(ref / f) for f in ref_files(ref)}
    tree = hashlib.sha256("".join(f"{f}\0{h}\n" for f, h in files.items()).encode()).hexdigest()
    return {"tree_sha256": tree, "files": files}


def ref_commit(ref: Path, given: str | None) -> tuple[str, str]:
    """(commit, where it came from): the checkout's git HEAD, else --ref-commit, else main.py's hash."""
    if (ref / ".git").exists():
        head = _git(ref, "rev-parse", "HEAD")
        if head:
            dirty = _git(ref, "status", "--porcelain", "--untracked-files=no")
            if dirty and dirty.strip():
                raise UserError(f"--ref-dir {ref}: its tracked files differ from commit "
                                f"{head.strip()[:12]} ({dirty.strip().splitlines()[0].strip()}); the "
                                f"comparison runs their code unchanged: `git -C {ref} stash` or a "
                                f"fresh clone")
            return head.strip(), "git HEAD of --ref-dir"
    if given:
        return given, "--ref-commit"
    return "sha256:main.py:" + sha256_file(ref / "main.py"), "no .git and no --ref-commit: main.py's sha256"


def one_gpu(device: str, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for both sides: none for the CPU (their nn.DataParallel would take
    any GPU it sees), else the one GPU ``device`` names (cuda = cuda:0) among those visible, so
    their DataParallel runs on one GPU as ours does."""
    if device == "cpu":
        return ""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    shown = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    if shown is None:
        return str(index)
    if index >= len(shown):
        raise UserError(f"--device {device}: CUDA_VISIBLE_DEVICES={visible} shows {len(shown)} GPU(s)")
    return shown[index]


# --------------------------------------------------------------------------- one side

def run_side(spec: dict, log: Path, env: dict) -> tuple[int, dict, float]:
    """Run benchmarks/ref_bootstrap.py on ``spec`` (output to ``log``): (exit code, stats, s)."""
    spec_path = Path(spec["stats"]).with_name("spec.json")
    write_json_atomic(spec_path, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.call([sys.executable, str(ROOT / "benchmarks" / "ref_bootstrap.py"),
                                str(spec_path)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t
    stats_path = Path(spec["stats"])
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return code, stats, seconds


def their_timing(stats: dict, batch: int, n: int, warmup: int) -> dict:
    """Wall clock, steps, patches/s, steady patches/s and data wait from the bootstrap's hooks."""
    req = stats.get("requests") or []
    saves = stats.get("saves") or []
    starts = stats.get("epoch_starts") or []
    if not req or not saves or not starts:
        raise RuntimeError("the reference run recorded no steps or no checkpoint")
    steps = []  # (start, end, data wait) per step: from its batch request to the next request
    for (t0, t1), (t_next, _) in zip(req, req[1:]):
        if t1 is not None:
            steps.append((t0, t_next, t1 - t0))
    wall = saves[-1]["end"] - starts[0]
    after = steps[warmup:] or steps
    steady_s = sum(e - s for s, e, _ in after)
    return {"steps": len(steps), "wall_s": wall, "patches_per_s": len(steps) * batch * n / wall,
            **_cpu(stats.get("cpu_at_start"), saves[-1].get("cpu"), len(steps) * batch * n),
            "steady_patches_per_s": len(after) * batch * n / steady_s,
            "data_wait_frac": sum(w for _, _, w in steps) / wall,
            "checkpoint_save_s": saves[-1]["end"] - saves[-1]["start"],
            "start_up_s": starts[0] - stats.get("t_start", starts[0])}


def _cpu(start, end, patches: int) -> dict:
    """CPU seconds of the training loop (main process + reaped DataLoader workers) and patches
    per CPU second: on a shared machine far less sensitive to other jobs than the wall clock."""
    if not start or not end:
        return {}
    main_s, workers_s = end[0] - start[0], end[1] - start[1]
    return {"cpu_s": main_s + workers_s, "cpu_main_s": main_s, "cpu_workers_s": workers_s,
            "patches_per_cpu_s": patches / max(main_s + workers_s, 1e-9)}


def our_timing(run: Path, batch: int, n: int, warmup: int, stats: dict) -> dict:
    """The same figures from train.py's metrics.jsonl (records every --warmup-steps steps)."""
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = [r for r in recs if r.get("summary")][-1]
    logged = [r for r in recs if "step" in r and not r.get("summary")]
    first = next((r for r in logged if r["step"] >= warmup), logged[0])
    last = logged[-1]
    steady = ((last["step"] - first["step"]) * batch * n / (last["time"] - first["time"])
              if last["step"] > first["step"] else summary["patches_per_s"])
    return {"steps": summary["steps"], "wall_s": summary["wall_s"],
            "patches_per_s": summary["patches_per_s"], "steady_patches_per_s": steady,
            **_cpu(stats.get("cpu_at_start"), stats.get("cpu_at_end"), summary["steps"] * batch * n),
            "data_wait_frac": summary["data_wait_frac"], "final_loss": last.get("loss")}


# --------------------------------------------------------------------------- the comparison

class Comparison:
    def __init__(self, a, manifest):
        self.a, self.manifest = a, manifest
        self.out, self.runs = Path(a.out).resolve(), Path(a.runs).resolve()  # the sides chdir
        self.ref = Path(a.ref_dir).resolve()
        self.commit, self.commit_from = ref_commit(self.ref, a.ref_commit)  # refuses a modified one
        self.hashes_before = ref_hashes(self.ref)
        self.data = Path(a.data).resolve()
        count = manifest.splits["train"].count
        self.images_per_epoch = min(count, a.steps * a.bs) if a.steps else count
        self.steps_per_epoch = self.images_per_epoch // a.bs
        if self.steps_per_epoch < 1:
            raise UserError(f"--batch-size {a.bs}: more than the {count} train images of --data {a.data}")
        self.schedule_steps = (THEIR_DATASET_SIZE // a.bs) * a.epochs
        self.kept_steps = a.keep_epochs * self.steps_per_epoch
        self.warmup = min(a.warmup_steps, max(0, self.kept_steps - 1))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg",
                        CUDA_VISIBLE_DEVICES=one_gpu(a.device, os.environ.get("CUDA_VISIBLE_DEVICES")))
        self.device = "cpu" if a.device == "cpu" else "cuda"
        self.rows: list[dict] = []
        self.json_path = Path(a.json).resolve() if a.json else self.out / "vs_reference.json"

    # -- argv of each side
    def their_argv(self, repeat: int) -> list[str]:
        a = self.a
        return ["--data", self.manifest.name, "--epoch", str(a.epochs), "--patch_sim", "200",
                "--arch", "resnet18-cifar", "--num_patches", str(a.num_patches), "--lr", f"{a.lr:g}",
                "--bs", str(a.bs), "--dir", "vs_reference", "--msg", f"r{repeat}"]

    def our_argv(self, run: Path, seed: int) -> list[str]:
        """train.py's arguments, from the runner every accuracy driver uses (without the
        interpreter and script: ref_bootstrap.py calls train.main in its own process, measured
        by the same hooks as their side)."""
        a = self.a
        extra = ["--seed", str(seed), "--epochs", f"{self.schedule_steps / self.steps_per_epoch:.12g}",
                 "--num-patches", str(a.num_patches), "--batch-size", str(a.bs),
                 "--optim.lr", f"{a.lr:g}", "--loss.lam", "200", "--device", self.device,
                 "--run.max_steps", str(self.kept_steps), "--run.log_every", str(max(1, self.warmup)),
                 "--run.tensorboard", "false"]
        if a.steps:
            extra += ["--data.max_images", str(self.images_per_epoch)]
        cmd = train_command(ROOT / a.ours_config, self.data, run, *extra, *shlex.split(a.ours_args))
        assert cmd[1] == "train.py", cmd
        return cmd[2:]

    # -- sides
    def run_theirs(self, repeat: int, seed: int) -> dict:
        a, run = self.a, self.runs / f"r{repeat}_theirs"
        shutil.rmtree(run, ignore_errors=True)
        spec = {"side": "reference", "ref_dir": str(self.ref), "argv": self.their_argv(repeat),
                "cwd": str(run / "cwd"), "data": str(self.data), "max_images": self.images_per_epoch if a.steps else 0,
                "seed": seed, "device": self.device, "keep_epochs": a.keep_epochs,
                "stats": str(run / "stats.json")}
        code, stats, seconds = run_side(spec, run / "log.txt", self.env)
        if code != 0 or not stats.get("saves"):
            what = f"exited {code}" if code else "saved no save_models/<epoch>.pt checkpoint"
            raise RuntimeError(f"their main.py {what} (log {run / 'log.txt'}): {_tail(run / 'log.txt')}")
        row = {"side": "theirs", "repeat": repeat, "seed": seed, "process_s": seconds,
               **their_timing(stats, a.bs, a.num_patches, self.warmup),
               **{k: v for k, v in stats.items() if k.startswith("peak_")},  # + largest worker's
               "dataloader": stats.get("loader"), "patches": stats.get("patches"),
               "argv": stats.get("argv"), "log": str(run / "log.txt")}
        kept = stats["saves"][-1]
        ckpt = convert_reference_checkpoint(
            kept["path"], run / "ckpt.pt",
            data={"name": self.manifest.name, "classes": list(self.manifest.classes),
                  "image_shape": self.manifest.splits["train"].shape},
            patch=THEIR_PATCH, augment=asdict(THEIR_AUGMENT), seed=seed, epoch=kept["epoch"] + 1,
            step=row["steps"], source={"repo": REPO, "commit": self.commit, "file": kept["path"],
                                       "sha256": sha256_file(kept["path"])})
        row["checkpoint"] = str(ckpt)
        row["their_checkpoint"] = kept["path"]
        return row

    def run_ours(self, repeat: int, seed: int) -> dict:
        a, run = self.a, self.runs / f"r{repeat}_ours"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        spec = {"side": "ours", "argv": self.our_argv(run / "train", seed), "stats": str(run / "stats.json")}
        code, stats, seconds = run_side(spec, run / "log.txt", self.env)
        if code != 0:
            raise RuntimeError(f"train.py exited {code} (log {run / 'log.txt'}): {_tail(run / 'log.txt')}")
        return {"side": "ours", "repeat": repeat, "seed": seed, "process_s": seconds,
                **our_timing(run / "train", a.bs, a.num_patches, self.warmup, stats),
                **{k: v for k, v in stats.items() if k.startswith("peak_") and k != "peak_child_rss_mib"},
                "argv": stats.get("argv"), "log": str(run / "log.txt"),
                "checkpoint": str(run / "train" / "ckpt.pt")}

    def probe(self, row: dict) -> None:
        out = Path(row["checkpoint"]).parent / "probe"
        cmd = probe_command(row["checkpoint"], self.data, out, "--device", self.device, "--quiet",
                            "--no-plots", *shlex.split(self.a.probe_args))
        log = Path(row["log"]).with_name("probe_log.txt")
        log.unlink(missing_ok=True)
        t = time.perf_counter()
        try:
            run_logged(cmd, log, self.env)
        except RunFailed as e:
            raise RuntimeError(f"probe.py exited {e.code} on {row['checkpoint']} (log {log}): {_tail(log)}") from None
        res = read_probe(out, relative_source=False)
        dest = self.out / f"probe_{row['side']}_r{row['repeat']}.json"
        write_json_atomic(dest, res)
        row["probe"] = {"linear_top1": res["linear_top1"], "knn_top1": res["knn_top1"],
                        "num_test": res["num_test"], "file": str(dest), "seconds": time.perf_counter() - t,
                        "command": " ".join(shlex.quote(c) for c in cmd[1:])}

    # -- results
    def summary(self) -> dict:
        out: dict = {}
        by = {s: {r["repeat"]: r for r in self.rows if r["side"] == s} for s in SIDES}
        for s in SIDES:
            rs = list(by[s].values())
            if rs:
                out[s] = {k: _spread([r[k] for r in rs]) for k in
                          ("patches_per_s", "steady_patches_per_s", "wall_s", "data_wait_frac",
                           "patches_per_cpu_s") if all(k in r for r in rs)}
                out[s]["peak_rss_mib"] = max(r.get("peak_rss_mib", 0) for r in rs)
                if any("peak_cuda_allocated_mib" in r for r in rs):
                    out[s]["peak_cuda_allocated_mib"] = max(r.get("peak_cuda_allocated_mib", 0) for r in rs)
        both = sorted(set(by["theirs"]) & set(by["ours"]))
        for key, name in (("patches_per_s", "speedup_ours_over_theirs"),
                          ("steady_patches_per_s", "steady_speedup_ours_over_theirs"),
                          ("patches_per_cpu_s", "cpu_efficiency_ours_over_theirs")):
            ratios = [by["ours"][r][key] / by["theirs"][r][key] for r in both
                      if key in by["ours"][r] and key in by["theirs"][r]]
            if ratios:
                out[name] = {**_spread(ratios), "per_repeat": ratios}
        probed = [r for r in both if "probe" in by["ours"][r] and "probe" in by["theirs"][r]]
        if probed:
            res = compare_probes.compare([Path(by["ours"][r]["probe"]["file"]) for r in probed],
                                         [Path(by["theirs"][r]["probe"]["file"]) for r in probed])
            out["paired_accuracy"] = {"a": "ours", "b": "theirs", **res}
        return out

    def write(self, done: bool = False) -> None:
        a = self.a
        doc = {
            "what": "theirs vs ours: the authors' main.py and our train.py, same data, machine, "
                    "schedule and probe",
            "complete": done,
            "reference": {"repo": REPO, "dir": str(self.ref), "commit": self.commit,
                          "commit_from": self.commit_from,
                          "tree_sha256": self.hashes_before["tree_sha256"],
                          "files_sha256": self.hashes_before["files"],
                          "unchanged_after_runs": self.hashes_after_ok if done else None},
            "setting": {"data": str(self.data), "data_name": self.manifest.name,
                        "data_source": self.manifest.source, "num_patches": a.num_patches,
                        "batch_images": a.bs, "lr": a.lr, "schedule_epochs": a.epochs,
                        "schedule_steps": self.schedule_steps, "kept_epochs": a.keep_epochs,
                        "steps_per_epoch": self.steps_per_epoch, "kept_steps": self.kept_steps,
                        "images_per_epoch": self.images_per_epoch, "steps_cap": a.steps or None,
                        "warmup_steps": self.warmup, "repeats": a.repeats, "device": a.device,
                        "seed_policy": f"repeat r: seed {a.seed} + r on both sides (theirs: "
                                       f"random/numpy/torch seeded before main.py; ours: --seed)",
                        "order": "sides alternate: repeat r runs " + ", ".join(self.order(0)) +
                                 " for even r, reversed for odd r",
                        "ours_config": a.ours_config, "ours_args": a.ours_args,
                        "probe_args": a.probe_args, "their_patch": THEIR_PATCH,
                        "their_augment": asdict(THEIR_AUGMENT)},
            "runs": self.rows, "summary": self.summary(),
            **environment()}
        write_json_atomic(self.json_path, doc)

    def order(self, repeat: int) -> list[str]:
        first = [s.strip() for s in self.a.first.split(",")]
        return first if repeat % 2 == 0 else first[::-1]

    def run(self) -> int:
        a = self.a
        self.hashes_after_ok = None
        self.out.mkdir(parents=True, exist_ok=True)
        failures = []
        for repeat in range(a.repeats):
            seed = a.seed + repeat
            for side in self.order(repeat):
                print(f"vs_reference: repeat {repeat} seed {seed}: {side} ({self.kept_steps} steps of "
                      f"{a.bs} images x {a.num_patches} patches, load {os.getloadavg()[0]:.1f})", flush=True)
                load_before = [round(x, 2) for x in os.getloadavg()]
                try:
                    row = self.run_theirs(repeat, seed) if side == "theirs" else self.run_ours(repeat, seed)
                except (RuntimeError, CheckpointError, UserError) as e:
                    failures.append(f"{side} r{repeat}: {e}")
                    print(f"vs_reference: FAILED {failures[-1]}", file=sys.stderr, flush=True)
                    continue
                row["loadavg_before"] = load_before  # 1/5/15-minute load averages
                row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                self.rows.append(row)
                print(f"vs_reference:   {side}: {row['steps']} steps in {row['wall_s']:.1f} s, "
                      f"{row['patches_per_s']:.1f} patches/s (steady {row['steady_patches_per_s']:.1f})",
                      flush=True)
                self.write()
                if a.probe:
                    try:
                        self.probe(row)
                        print(f"vs_reference:   {side} probe: linear {100 * row['probe']['linear_top1']:.2f}% "
                              f"kNN {100 * row['probe']['knn_top1']:.2f}%", flush=True)
                    except RuntimeError as e:
                        failures.append(f"{side} r{repeat} probe: {e}")
                        print(f"vs_reference: FAILED {failures[-1]}", file=sys.stderr, flush=True)
                    self.write()
        after = ref_hashes(self.ref)
        self.hashes_after_ok = after == self.hashes_before
        self.write(done=True)
        print(format_summary(json.loads(self.json_path.read_text())))
        print(f"vs_reference: wrote {self.json_path}")
        if not self.hashes_after_ok:
            print(f"vs_reference: error: files of --ref-dir {self.ref} changed during the run",
                  file=sys.stderr)
            return 1
        return 1 if failures else 0


def _spread(values: list[float]) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v),
            "sd": statistics.stdev(v) if len(v) > 1 else None, "n": len(v), "values": v}


def format_summary(doc: dict) -> str:
    s, lines = doc["summary"], []
    for side in SIDES:
        if side in s:
            p = s[side]["patches_per_s"]
            lines.append(f"  {side:<6} {p['median']:,.1f} patches/s (median of {p['n']}; "
                         f"{p['min']:,.1f}-{p['max']:,.1f}), steady {s[side]['steady_patches_per_s']['median']:,.1f}, "
                         f"wall {s[side]['wall_s']['median']:.1f} s")
    for key, what in (("speedup_ours_over_theirs", "patches/s"),
                      ("cpu_efficiency_ours_over_theirs", "patches per CPU second")):
        if key in s:
            r = s[key]
            lines.append(f"  ours / theirs, {what}: {r['median']:.2f}x (per repeat "
                         f"{', '.join(f'{x:.2f}' for x in r['per_repeat'])})")
    pa = s.get("paired_accuracy")
    if pa:
        for p in pa["pairs"]:
            lin = p["linear"]
            lines.append(f"  seed {p['train_seed_a']}: linear ours {100 * lin['acc_a']:.2f}% theirs "
                         f"{100 * lin['acc_b']:.2f}% (ours - theirs {100 * lin['diff']:+.2f}, 95% CI "
                         f"[{100 * lin['ci95'][0]:+.2f}, {100 * lin['ci95'][1]:+.2f}], {lin['pairs']} pictures)")
    return "\n".join(["vs_reference:", *lines])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--ref-dir", type=Path, required=True,
                   help=f"a checkout of {REPO} (git clone https://{REPO} DIR); never modified")
    p.add_argument("--ref-commit", help="their commit, recorded when DIR has no .git")
    p.add_argument("--data", type=Path, default=Path("data/cifar10"),
                   help="converted 32px dataset (memory format), e.g. the lossless CIFAR-10")
    p.add_argument("--out", type=Path, help="results dir (default benchmarks/results/vs_reference_<host>_<date>)")
    p.add_argument("--json", type=Path, help="result file (default <out>/vs_reference.json)")
    p.add_argument("--runs", type=Path, default=Path("runs/vs_reference"), help="run dirs and logs")
    p.add_argument("--num-patches", type=int, default=20, help="n patches per image (their --num_patches)")
    p.add_argument("--batch-size", dest="bs", type=int, default=100, help="images per step (their --bs)")
    p.add_argument("--lr", type=float, default=0.3, help="peak lr (their --lr)")
    p.add_argument("--epochs", type=int, default=2,
                   help="their --epoch: the cosine spans (50000 // bs) * epochs steps (default 2: "
                        "their README's '1 epoch' command)")
    p.add_argument("--keep-epochs", type=int, default=1,
                   help="train and probe this many epochs (their checkpoint <keep-1>.pt), then stop")
    p.add_argument("--steps", type=int, default=0,
                   help="K: an epoch is K steps (K * bs images) on each side; 0 = the whole split")
    p.add_argument("--repeats", type=int, default=1, help="repeats of both sides (seed + r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", default="theirs,ours", help="side order of even repeats (odd: reversed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (one GPU for both)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="steps left out of the steady patches/s (ours logs every this many steps)")
    p.add_argument("--ours-config", default="configs/cifar10_n20_e1.yaml", help="our preset")
    p.add_argument("--ours-args", default="", help="extra train.py arguments")
    p.add_argument("--probe-args", default="",
                   help="probe.py arguments for both sides (default: its own, the paper's probe)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="time the training only")
    p.add_argument("--smoke", action="store_true",
                   help="minutes on a CPU: --batch-size 10 --num-patches 4 --steps 3 --warmup-steps 1, a tiny probe")
    a = p.parse_args(renamed(argv, {"--bs": "--batch-size"}, "vs_reference"))
    if a.smoke:
        a.bs, a.num_patches, a.steps, a.warmup_steps = 10, 4, 3, 1
        a.probe_args = a.probe_args or "--num-patches 2 --probe-epochs 3 --max-train-images 200 --max-test-images 100"
    return a


def validate(a):
    import torch

    for name in ("num_patches", "bs", "epochs", "keep_epochs", "repeats"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.bs < 2:
        raise UserError(f"--batch-size {a.bs}: the coding rate needs >= 2 images per step")
    if a.keep_epochs > a.epochs:
        raise UserError(f"--keep-epochs {a.keep_epochs}: more than the schedule's --epochs {a.epochs}")
    if a.steps < 0 or a.warmup_steps < 0:
        raise UserError("--steps and --warmup-steps must be >= 0")
    if sorted(s.strip() for s in a.first.split(",")) != sorted(SIDES):
        raise UserError(f"--first {a.first}: give both sides, e.g. theirs,ours")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device != "cpu" and not (a.device == "cuda" or a.device.startswith("cuda:")):
        raise UserError(f"--device {a.device}: choose auto, cpu, cuda or cuda:K")
    if a.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {a.device}: no CUDA GPU here; use --device cpu")
    if not (ROOT / a.ours_config).is_file():
        raise UserError(f"--ours-config {a.ours_config}: no such preset under {ROOT}")
    check_ref_dir(a.ref_dir)
    manifest = load_manifest(a.data)
    require_format(manifest, a.data, "memory")
    info = require_split(manifest, a.data, "train")
    if info.shape is None or tuple(info.shape[:2]) != (32, 32):
        raise UserError(f"--data {a.data}: {info.shape} images; their 'resnet18-cifar' recipe "
                        f"(dataset/aug.py) is for 32x32 images such as CIFAR-10/100")
    if a.out is None:
        a.out = RESULTS_DIR / f"vs_reference_{host_kind()}_{time.strftime('%Y%m%d')}"
    return manifest


def main(argv=None) -> int:
    # SIGTERM ends the run like Ctrl-C: the running side's process is killed with it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    a = parse_args(argv)
    try:
        manifest = validate(a)
        comparison = Comparison(a, manifest)
    except UserError as e:
        print(f"vs_reference: error: {e}", file=sys.stderr)
        return 2
    return comparison.run()


if __name__ == "__main__":
    sys.exit(main())
