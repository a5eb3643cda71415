"""The accuracy runs, by named steps: train, probe, compare paired; every result on disk at once.

    python benchmarks/accuracy_runs.py --out benchmarks/results/acc_h100_20261201            # GPU: the queue's item 1
    python benchmarks/accuracy_runs.py --scale demo --steps lossless_s0-5,jpeg_s0-5 --out DIR   # CPU evidence
    python benchmarks/accuracy_runs.py --smoke --out /tmp/acc                                # CI: minutes, CPU
    python benchmarks/accuracy_runs.py --list                                                # steps and scales

Data: ``--lossless`` and ``--jpeg`` name the two CIFAR-10 copies, each an archive (converted
once into ``--data-dir``/cifar10 and /cifar10_jpeg, memory format) or an already converted
directory. Defaults: ``../shared/datasets/cifar10-png.tar.xz`` (the original pixels) and
``cifar10-jpeg.tar.xz`` (quality 75, 4:2:0). The GPU machine has no ``../shared``: carry the
archives with the call and pass their paths.

A step is ``VARIANT[_eE]_sSEED`` (``_sA-B`` expands to seeds A..B):

    lossless  the lossless data, our device pipeline (memory source)
    jpeg      the JPEG copy, same code and seed; probed on its twins of the lossless test
              pictures (all 10,000 at the gpu scale: the pairing finds the 1,000 twins)
    ref       the lossless data fed by the reference augmentation (--source reference:
              torchvision on PIL, patch by patch, in DataLoader workers)
    bn2, bn4  lossless with BatchNorm statistics per half / quarter of the patch groups
              (--patch-chunk n/2, n/4: what nn.DataParallel on two / four GPUs computes)
    fp32      lossless with --run.amp fp32 (is bf16 autocast costing accuracy?)
    n200      lossless with n = 200 patches per image
    q50, q30  the lossless data re-encoded at JPEG quality 50 / 30 (tools/reencode_jpeg.py)
    tiny      Tiny ImageNet (--tiny), configs/tinyimagenet.yaml: 32 -> 64 px patches, ImageNet
              stem; the gpu scale's run is the paper's 1-epoch row (a 1-epoch cosine trained in
              full: the authors' main.py anneals over 50,000 // batch steps per epoch, which is
              exactly one epoch of Tiny ImageNet's 100,000 images), ``tiny_e10`` its 10-epoch row
    in100     a 224-px ImageFolder (--in100: ImageNet-100, or Imagewoof at the CPU scales),
              configs/imagenet100.yaml: 112 -> 224 px patches
    _eE       train the scale's E-epoch schedule in full (default: the scale's own run below)

``tiny`` and ``in100`` steps are not paired with ``lossless``; at the CPU scales (demo, smoke)
each is also probed with a random-init encoder on the same pictures
(``probe_<step>.random_init.json``), the baseline its accuracy is read against, and the two
are compared paired (``compare_<step>_vs_random_init.json``).

and ``cuda_tests`` runs the CUDA-only tests, ``throughput`` benchmarks/train_throughput.py.
Scales (``--scale``, default gpu when CUDA is present, else demo; ``--smoke`` = ``--scale smoke``):

    gpu    the paper's: configs/cifar10_n20_e1.yaml, ResNet-18, n = 20; the default run is the
           first epoch of a 2-epoch cosine (the reference README's "1 epoch": main.py --epoch 2,
           checkpoint 0); probe = probe.py's defaults (128 patches, 100 linear epochs)
    large  CPU: ResNet-18 at width 16, n = 8, one epoch of 30,000 images (300 steps); probe
           16 patches, 30 linear epochs, 10,000 train images; ~15-20 min a run on 2 cores
    demo   CPU: exactly `make demo`: configs/demo.yaml (width 16, n = 8, 50 steps); probe
           8 patches, 30 epochs, 4,000 train images
    smoke  CPU, tiny: for CI (a minute a step on the subset datasets the tests build)

Tiny ImageNet on a GPU machine without a copy, whose calls carry at most 64 MiB: the raw
train + val JPEGs travel as a .tar.gz in parts of at most 55 MiB, reassembled and converted there (once: ``--tiny`` converts an archive
into ``--data-dir``/tinyimagenet with ``--classes configs/tinyimagenet_wnids200.txt``, the
official 200 classes; the public copy has two extra)::

    tar -czf .device/tiny.tar.gz -C RAW tiny-imagenet-200/wnids.txt tiny-imagenet-200/train \
        tiny-imagenet-200/val                 # RAW: where rangeetpan/IMagenet was extracted
    split -b 55M .device/tiny.tar.gz .device/tiny.part. && rm .device/tiny.tar.gz
    # device calls back to back, each carrying one part (.device/ is ignored and stays on the
    # warm machine): call 1 carries .device/tiny.part.aa, command `true`; call 2 .device/tiny.part.ab,
    # `true`; call 3 carries .device/tiny.part.ac and runs:
    cat .device/tiny.part.* > .device/tiny.tar.gz && timeout 540 python benchmarks/accuracy_runs.py \
        --scale gpu --tiny .device/tiny.tar.gz --steps tiny_s0,tiny_e10_s0 --out runs/tiny_acc; \
        cp -r runs/tiny_acc $OUT/

(benchmarks/README.md, "Runs on a GPU", has the same recipe and its CPU smoke test.)

Per step, in ``--out``: ``probe_<step>.json`` (probe.py's results.json: accuracies and every test
picture's prediction) and ``train_<step>.json`` (command, training summary, wall-clock). After
every step, ``compare_<variant>_s<seed>.json`` pairs each variant with ``lossless`` of the same
seed and scale (A = lossless, B = the variant: the difference is lossless minus variant), and
``summary.json`` collects every accuracy and, per variant, the mean paired difference over
seeds with its intervals. A step whose probe file exists is skipped (``--force`` redoes it),
so a driver stopped by a time limit continues where it was. ``--jobs J`` runs J steps at once
(J processes of ``--threads`` threads each); results do not depend on it, only on the threads.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import compare_probes  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.runner import (  # noqa: E402
    probe_command, read_probe, relative, run_logged as _run, shown, train_command)
from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import load_manifest, write_json_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
DEFAULT_LOSSLESS = SHARED / "cifar10-png.tar.xz"
DEFAULT_JPEG = SHARED / "cifar10-jpeg.tar.xz"
CIFAR_VARIANTS = ("lossless", "jpeg", "ref", "bn2", "bn4", "fp32", "n200", "q50", "q30")
DATASET_VARIANTS = ("tiny", "in100")  # other datasets: own presets, not paired with lossless
VARIANTS = CIFAR_VARIANTS + DATASET_VARIANTS
TINY_CLASSES = ROOT / "configs" / "tinyimagenet_wnids200.txt"
SPECIAL_STEPS = ("cuda_tests", "throughput")
STEP_RE = re.compile(r"^(?P<variant>[a-z0-9]+?)(?:_e(?P<epochs>\d+(?:\.\d+)?))?_s(?P<a>\d+)(?:-(?P<b>\d+))?$")


@dataclass(frozen=True)
class Scale:
    """How big every run of a scale is: the preset and its overrides, the schedule, the probe."""

    name: str
    config: str
    train_args: tuple[str, ...]
    schedule_epochs: float  # the cosine spans this many epochs ...
    train_epochs: float  # ... and the default run trains (and is probed after) this many
    probe_args: tuple[str, ...]
    batch: int = 100
    max_images: int = 0  # data.max_images (images per epoch; 0 = all)
    num_patches: int = 20
    jpeg_probe_all: bool = False  # probe the JPEG copy on its whole test split
    about: str = ""
    random_init: bool = False  # also probe a random-init encoder on the same pictures


SCALES = {
    "gpu": Scale("gpu", "configs/cifar10_n20_e1.yaml", (), 2.0, 1.0, (), num_patches=20,
                 jpeg_probe_all=True,
                 about="n=20, first epoch of a 2-epoch cosine; probe 128 patches, 100 epochs"),
    "large": Scale("large", "configs/demo.yaml", ("--data.max_images", "30000"), 1.0, 1.0,
                   ("--num-patches", "16", "--probe-epochs", "30", "--max-train-images", "10000"),
                   max_images=30000, num_patches=8,
                   about="width 16, n=8, 300 steps (30,000 images); probe 16 patches, 30 epochs, "
                         "10,000 train images"),
    "demo": Scale("demo", "configs/demo.yaml", (), 1.0, 1.0,
                  ("--num-patches", "8", "--probe-epochs", "30", "--max-train-images", "4000"),
                  max_images=5000, num_patches=8,
                  about="make demo: width 16, n=8, 50 steps; probe 8 patches, 30 epochs, 4,000 "
                        "train images"),
    "smoke": Scale("smoke", "configs/demo.yaml",
                   ("--num-patches", "4", "--data.max_images", "200", "--model.projector", "64,16"),
                   1.0, 1.0, ("--num-patches", "2", "--probe-epochs", "3", "--max-train-images", "200"),
                   max_images=200, num_patches=4, about="CI: 2 steps of 100 images, n=4"),
}
# Per dataset variant and scale: the preset, its overrides and the probe. gpu = the paper's recipe.
_SMOKE_TRAIN = ("--num-patches", "4", "--data.max_images", "200", "--model.width", "8",
                "--model.projector", "64,16")
_SMOKE_PROBE = ("--num-patches", "2", "--probe-epochs", "3", "--max-train-images", "200",
                "--max-test-images", "200")
DATASET_SCALES = {
    "tiny": {
        "gpu": Scale("gpu", "configs/tinyimagenet.yaml", (), 1.0, 1.0, (), num_patches=20,
                     about="Tiny ImageNet, n=20, 1-epoch cosine in full; probe 128 patches, 100 epochs"),
        "demo": Scale("demo", "configs/tinyimagenet.yaml",
                      ("--num-patches", "8", "--data.max_images", "10000", "--model.width", "16",
                       "--model.projector", "1024,256"), 1.0, 1.0,
                      ("--num-patches", "8", "--probe-epochs", "30", "--max-train-images", "10000"),
                      max_images=10000, num_patches=8, random_init=True,
                      about="Tiny ImageNet: width 16, n=8, 100 steps (10,000 images); probe 8 "
                            "patches, 30 epochs, 10,000 train images, all 10,000 val"),
        "smoke": Scale("smoke", "configs/tinyimagenet.yaml", _SMOKE_TRAIN, 1.0, 1.0, _SMOKE_PROBE,
                       max_images=200, num_patches=4, random_init=True, about="CI: 2 steps, n=4"),
    },
    "in100": {
        "gpu": Scale("gpu", "configs/imagenet100.yaml", (), 2.0, 1.0, (), num_patches=20,
                     about="ImageNet-100, n=20, first epoch of a 2-epoch cosine (main.py --epoch 2)"),
        "demo": Scale("demo", "configs/imagenet100.yaml",
                      ("--num-patches", "4", "--data.max_images", "3000", "--model.width", "16",
                       "--model.projector", "1024,256"), 1.0, 1.0,
                      ("--num-patches", "4", "--probe-epochs", "30", "--max-train-images", "3000"),
                      max_images=3000, num_patches=4, random_init=True,
                      about="224 px: width 16, n=4, 30 steps (3,000 images); probe 4 patches, "
                            "30 epochs, 3,000 train images, the whole val split"),
        "smoke": Scale("smoke", "configs/imagenet100.yaml", _SMOKE_TRAIN, 1.0, 1.0, _SMOKE_PROBE,
                       max_images=200, num_patches=4, random_init=True, about="CI: 2 steps, n=4"),
    },
}
DEFAULT_GPU_STEPS = "lossless_s0,jpeg_s0,lossless_s1,lossless_e10_s0,ref_s0,jpeg_s1"
DEFAULT_CPU_STEPS = "lossless_s0,jpeg_s0"


@dataclass
class Step:
    name: str
    variant: str
    seed: int
    epochs: float | None  # None: the scale's default run

    @property
    def base(self) -> str:
        """The lossless step this one is paired with."""
        e = f"_e{self.epochs:g}" if self.epochs is not None else ""
        return f"lossless{e}_s{self.seed}"


def parse_steps(spec: str) -> list[Step | str]:
    out: list[Step | str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in SPECIAL_STEPS:
            out.append(part)
            continue
        m = STEP_RE.match(part)
        if not m or m["variant"] not in VARIANTS:
            raise UserError(f"--steps {part}: not a step; write VARIANT[_eE]_sSEED[-SEED] with VARIANT "
                            f"in {', '.join(VARIANTS)}, or one of {', '.join(SPECIAL_STEPS)} (see --list)")
        a, b = int(m["a"]), int(m["b"] if m["b"] is not None else m["a"])
        if b < a:
            raise UserError(f"--steps {part}: seed range {a}-{b} is empty")
        epochs = float(m["epochs"]) if m["epochs"] else None
        if epochs is not None and epochs <= 0:
            raise UserError(f"--steps {part}: epochs must be > 0")
        for s in range(a, b + 1):
            e = f"_e{m['epochs']}" if m["epochs"] else ""
            out.append(Step(f"{m['variant']}{e}_s{s}", m["variant"], s, epochs))
    if not out:
        raise UserError("--steps: no step given")
    return out


# --------------------------------------------------------------------------- data

@dataclass
class Data:
    lossless: Path | None
    jpeg: Path | None
    requested: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)  # tiny / in100 -> converted dir


def prepare(source: Path, name: str, data_dir: Path, flag: str, extra: tuple[str, ...] = ()) -> Path:
    """A converted dataset from ``source``: itself when it is one, else converted (once)."""
    if (source / "manifest.json").is_file():
        return source
    if not source.exists():
        raise UserError(f"{flag} {source}: no such archive or converted dataset")
    dest = data_dir / name
    if (dest / "manifest.json").is_file():
        made_from = Path(load_manifest(dest).source)
        if made_from.resolve() != source.resolve() and made_from.name != source.name:
            raise UserError(f"{dest} was converted from {made_from}, not {flag} {source}; remove it "
                            f"or pass another --data-dir")
        return dest
    print(f"accuracy_runs: converting {source} into {dest}", flush=True)
    _run([sys.executable, "tools/convert_datasets.py", str(source), "--name", name, "--out",
          str(data_dir), "--formats", "memory", "--no-progress", *extra])
    return dest


# --------------------------------------------------------------------------- steps

class Driver:
    def __init__(self, a, scale: Scale, data: Data):
        self.a, self.scale, self.data = a, scale, data
        self.out = Path(a.out)
        self.runs = Path(a.runs) / scale.name
        self.lock = threading.Lock()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if a.threads:
            self.env["OMP_NUM_THREADS"] = str(a.threads)

    def log(self, msg: str) -> None:
        with self.lock:
            print(f"=== {time.strftime('%H:%M:%S')} {msg}", flush=True)

    def scale_for(self, step: Step) -> Scale:
        if step.variant in DATASET_SCALES:
            scales = DATASET_SCALES[step.variant]
            if self.scale.name not in scales:
                raise UserError(f"step {step.name}: no {step.variant} recipe at scale {self.scale.name} "
                                f"(has {', '.join(scales)})")
            return scales[self.scale.name]
        return self.scale

    def steps_per_epoch(self, data: Path, scale: Scale) -> int:
        count = load_manifest(data).splits["train"].count
        per = count // scale.batch
        return min(per, scale.max_images // scale.batch) if scale.max_images else per

    def data_for(self, step: Step) -> Path:
        if step.variant in DATASET_VARIANTS:
            if step.variant not in self.data.datasets:
                raise UserError(f"step {step.name}: no data (pass --{step.variant} DIR_OR_ARCHIVE)")
            return self.data.datasets[step.variant]
        if step.variant == "jpeg":
            if self.data.jpeg is None:
                raise UserError("step jpeg: no JPEG copy (pass --jpeg ARCHIVE_OR_DIR)")
            return self.data.jpeg
        if step.variant in ("q50", "q30"):
            return self.reencoded(int(step.variant[1:]))
        return self.data.lossless

    def reencoded(self, quality: int) -> Path:
        dest = Path(self.a.data_dir) / f"{self.data.lossless.name}_q{quality}"
        with self.lock:
            if not (dest / "manifest.json").is_file():
                _run([sys.executable, "tools/reencode_jpeg.py", str(self.data.lossless),
                      str(self.runs / f"q{quality}.tar"), "--quality", str(quality), "--overwrite",
                      "--stats", str(self.out / f"reencode_q{quality}.json"), "--convert-to", str(dest)],
                     self.runs / f"reencode_q{quality}.log")
        return dest

    def variant_args(self, step: Step) -> list[str]:
        n = self.scale.num_patches
        return {"ref": ["--source", "reference"], "bn2": ["--patch-chunk", str(n // 2)],
                "bn4": ["--patch-chunk", str(n // 4)], "fp32": ["--run.amp", "fp32"],
                "n200": ["--num-patches", "200"]}.get(step.variant, [])

    def run_step(self, step: Step) -> None:
        probe_json = self.out / f"probe_{step.name}.json"
        if probe_json.is_file() and not self.a.force:
            self.log(f"{step.name}: done before ({probe_json}), skipped")
            return
        sc = self.scale_for(step)
        data = self.data_for(step)
        run = self.runs / step.name
        log = self.runs / f"{step.name}.log"
        if run.exists():  # a fresh run: a stale checkpoint must not be resumed or probed
            import shutil
            shutil.rmtree(run)
        log.unlink(missing_ok=True)
        schedule, trained = ((step.epochs, step.epochs) if step.epochs is not None
                             else (sc.schedule_epochs, sc.train_epochs))
        spe = self.steps_per_epoch(data, sc)
        train = train_command(sc.config, data, run, "--seed", str(step.seed), "--epochs", f"{schedule:g}",
                              "--run.tensorboard", "false", *sc.train_args, *self.variant_args(step),
                              *shlex.split(self.a.train_args))
        if trained < schedule:
            train += ["--run.max_steps", str(max(1, round(trained * spe)))]
        self.log(f"{step.name}: train ({data.name}, {schedule:g}-epoch schedule, {trained:g} trained)")
        t_train = _run(train, log, self.env)
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        summary = [r for r in metrics if r.get("summary")][-1]
        probe_extra = ["--quiet", "--no-plots", *sc.probe_args, *shlex.split(self.a.probe_args)]
        if step.variant == "jpeg" and not sc.jpeg_probe_all:
            probe_extra += ["--test-like", str(self.data.lossless)]
        probe = probe_command(run / "ckpt.pt", data, run / "probe", *probe_extra)
        self.log(f"{step.name}: probe")
        t_probe = _run(probe, log, self.env)
        result = read_probe(run / "probe")
        random_cmd = None
        if sc.random_init:  # the baseline: same architecture, fresh weights, same pictures
            random_cmd = probe_command(run / "ckpt.pt", data, run / "probe-random-init", *probe_extra,
                                       random_init=True)
            self.log(f"{step.name}: probe a random-init encoder")
            _run(random_cmd, log, self.env)
            rand = read_probe(run / "probe-random-init")
            write_json_atomic(self.out / f"probe_{step.name}.random_init.json", rand)
        write_json_atomic(self.out / f"train_{step.name}.json", {
            "step": step.name, "scale": sc.name, "variant": step.variant, "seed": step.seed,
            "data": str(data), "data_source": relative(load_manifest(data).source),
            "schedule_epochs": schedule, "trained_epochs": trained, "steps_per_epoch": spe,
            "train_command": shown(train), "probe_command": shown(probe),
            "random_init_probe_command": random_cmd and shown(random_cmd),
            "config": sc.config, "scale_about": sc.about,
            "threads": self.a.threads or None, "train_summary": summary,
            "train_process_s": t_train, "probe_process_s": t_probe,
            "final_loss": [r for r in metrics if "loss" in r][-1]["loss"]})
        write_json_atomic(probe_json, result)  # last: its presence marks the step done
        if random_cmd:  # trained vs random init, paired on the same test pictures
            write_json_atomic(self.out / f"compare_{step.name}_vs_random_init.json", compare_probes.compare(
                [probe_json], [self.out / f"probe_{step.name}.random_init.json"]))
        self.log(f"{step.name}: linear {100 * result['linear_top1']:.2f}% kNN "
                 f"{100 * result['knn_top1']:.2f}% on {result['num_test']} {result['dataset']['name']} "
                 f"test pictures (train {summary['wall_s']:.0f}s, probe {t_probe:.0f}s)")
        self.update_summary()

    def run_special(self, name: str) -> None:
        py = sys.executable
        if name == "cuda_tests":
            self.log("CUDA-only tests")
            proc = subprocess.run([py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                   "tests"], cwd=ROOT, capture_output=True, text=True, env=self.env)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            (self.out / "cuda_tests.txt").write_text(tail + "\n")
            self.log(tail.splitlines()[-1] if tail else "no output")
        elif name == "throughput":
            self.log("training throughput")
            _run([py, "benchmarks/train_throughput.py", "--data", str(self.data.lossless), "--options",
                  "eager,compiled,graphs,compiled_graphs", "--num-patches", "200,20", "--json", str(self.out / "train_throughput.json")],
                 self.runs / "throughput.log", self.env)

    # -- comparisons
    def update_summary(self) -> None:
        """Pair every variant with lossless of the same seed; aggregate over seeds; write."""
        with self.lock:
            probes = {p.stem[len("probe_"):]: p for p in sorted(self.out.glob("probe_*.json"))}
            rows, by_variant = [], {}
            for name, path in sorted(probes.items()):
                r = json.loads(path.read_text())
                rows.append({"step": name, "dataset": r["dataset"]["name"], "test_pictures": r["num_test"],
                             "linear_top1": r["linear_top1"], "knn_top1": r["knn_top1"]})
                m = STEP_RE.match(name)
                if m and m["variant"] in CIFAR_VARIANTS and m["variant"] != "lossless":
                    base = f"lossless{'_e' + m['epochs'] if m['epochs'] else ''}_s{m['a']}"
                    if base in probes:
                        key = f"{m['variant']}{'_e' + m['epochs'] if m['epochs'] else ''}"
                        by_variant.setdefault(key, []).append((probes[base], path))
            comparisons = {}
            for key, pairs in sorted(by_variant.items()):
                for a_path, b_path in pairs:
                    one = compare_probes.compare([a_path], [b_path])
                    seed = b_path.stem.rsplit("_s", 1)[1]
                    write_json_atomic(self.out / f"compare_{key}_s{seed}.json", one)
                res = compare_probes.compare([p[0] for p in pairs], [p[1] for p in pairs])
                comparisons[key] = {"a": "lossless", "b": key, "seeds": len(pairs),
                                    "pairs": [{k: p[k] for k in ("a", "b", "train_seed_a", "linear", "knn")}
                                              for p in res["pairs"]],
                                    "summary": res.get("summary"), "method": res["method"]}
            datasets = {v: DATASET_SCALES[v][self.scale.name].about for v in self.data.datasets
                        if self.scale.name in DATASET_SCALES[v]}
            write_json_atomic(self.out / "summary.json", {
                "scale": self.scale.name, "about": self.scale.about, "data": self.data.requested,
                "dataset_scales": datasets,
                "accuracies": rows, "comparisons": comparisons, **environment()})


def list_steps() -> str:
    doc = __doc__
    return doc[doc.index("A step is"):doc.index("Per step,")].rstrip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results directory (JSON per step, summary.json)")
    p.add_argument("--lossless", type=Path, default=DEFAULT_LOSSLESS,
                   help="lossless CIFAR-10: archive or converted dir (default: the shared PNG archive)")
    p.add_argument("--jpeg", type=Path, default=DEFAULT_JPEG,
                   help="its JPEG copy: archive or converted dir (default: the shared JPEG archive)")
    p.add_argument("--tiny", type=Path, help="Tiny ImageNet for the tiny steps: a converted dir, or the "
                   "raw tiny-imagenet-200 folder or an archive of it (converted once, --tiny-classes)")
    p.add_argument("--tiny-classes", type=Path, default=TINY_CLASSES,
                   help="class list for converting --tiny (default: the official 200, "
                        "configs/tinyimagenet_wnids200.txt)")
    p.add_argument("--in100", type=Path, help="a 224-px set for the in100 steps: a converted dir, or "
                   "an ImageFolder (or archive) converted once with --resize 224")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where archives are converted")
    p.add_argument("--runs", type=Path, default=Path("runs/accuracy"), help="run directories and logs")
    p.add_argument("--scale", choices=sorted(SCALES), help="default: gpu with CUDA, else demo")
    p.add_argument("--smoke", action="store_true", help="--scale smoke (CI)")
    p.add_argument("--steps", help=f"comma list (default gpu: {DEFAULT_GPU_STEPS}; CPU scales: "
                                   f"{DEFAULT_CPU_STEPS})")
    p.add_argument("--jobs", type=int, default=1, help="steps run at once")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every run (0: torch's)")
    p.add_argument("--train-args", default="", help="extra train.py arguments for every run")
    p.add_argument("--probe-args", default="", help="extra probe.py arguments for every probe")
    p.add_argument("--force", action="store_true", help="redo steps whose results exist")
    p.add_argument("--list", action="store_true", help="print the steps and scales and exit")
    a = p.parse_args(argv)
    if a.list:
        print(list_steps())
        return 0
    try:
        if a.out is None:
            raise UserError("--out DIR is required (where every result is written)")
        if a.jobs < 1 or a.threads < 0:
            raise UserError("--jobs must be >= 1 and --threads >= 0")
        import torch

        name = "smoke" if a.smoke else a.scale or ("gpu" if torch.cuda.is_available() else "demo")
        scale = SCALES[name]
        steps = parse_steps(a.steps or (DEFAULT_GPU_STEPS if name == "gpu" else DEFAULT_CPU_STEPS))
        variants = {s.variant for s in steps if isinstance(s, Step)}
        needs_lossless = bool(variants & set(CIFAR_VARIANTS)) or any(isinstance(s, str) for s in steps)
        lossless = prepare(a.lossless, "cifar10", a.data_dir, "--lossless") if needs_lossless else None
        jpeg = prepare(a.jpeg, "cifar10_jpeg", a.data_dir, "--jpeg") if "jpeg" in variants else None
        datasets = {}
        if "tiny" in variants:
            if a.tiny is None:
                raise UserError("steps tiny_*: pass --tiny (Tiny ImageNet: converted dir, folder or archive)")
            if not (a.tiny / "manifest.json").is_file() and not a.tiny_classes.is_file():
                raise UserError(f"--tiny-classes {a.tiny_classes}: no such file")
            datasets["tiny"] = prepare(a.tiny, "tinyimagenet", a.data_dir, "--tiny",
                                       ("--classes", str(a.tiny_classes)))
        if "in100" in variants:
            if a.in100 is None:
                raise UserError("steps in100_*: pass --in100 (a 224-px set: converted dir, folder or archive)")
            datasets["in100"] = prepare(a.in100, "imagenet100", a.data_dir, "--in100", ("--resize", "224"))
    except UserError as e:
        print(f"accuracy_runs: error: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    requested = {"lossless": str(a.lossless) if lossless else None, "jpeg": str(a.jpeg) if jpeg else None}
    requested.update({k: str(getattr(a, k)) for k in datasets})
    data = Data(lossless, jpeg, requested, datasets)
    driver = Driver(a, scale, data)
    write_json_atomic(a.out / f"env_{name}.json", {"scale": name, "about": scale.about,
                                                    "steps": [s if isinstance(s, str) else s.name for s in steps],
                                                    "data": data.requested, "threads": a.threads or None,
                                                    "jobs": a.jobs, **environment()})
    driver.log(f"scale {name} ({scale.about}); steps {', '.join(s if isinstance(s, str) else s.name for s in steps)}")
    failures = []

    def one(s):
        try:
            driver.run_special(s) if isinstance(s, str) else driver.run_step(s)
        except (RuntimeError, UserError) as e:  # keep going: later steps may still succeed
            failures.append(f"{s if isinstance(s, str) else s.name}: {e}")
            driver.log(f"FAILED {failures[-1]}")

    if a.jobs == 1:
        for s in steps:
            one(s)
    else:
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(one, steps))
    driver.update_summary()
    driver.log(f"done; {len(failures)} failed" + "".join(f"\n  {f}" for f in failures))
    print(f"accuracy_runs: results in {a.out} (summary.json)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
