"""One side of benchmarks/vs_reference.py, run in its own process: the authors' main.py, or ours.

    python benchmarks/ref_bootstrap.py SPEC.json

SPEC (written by vs_reference.py) names the side, its argv, working directory, data and where
to write its statistics. Side "reference" runs the authors' ``main.py`` (a checkout the user
brings; nothing of it is copied here) with its own argv through ``runpy``, after patching from
the outside only; their files are not touched:

    their dataset constructor  dataset.datasets.load_dataset -> ConvertedSplit: our converted
                               split (memory format, memory-mapped) as PIL images, through THEIR
                               transform (dataset/aug.py ContrastiveLearningViewGenerator, made
                               exactly as their load_dataset makes it); their DataLoader,
                               workers, model, loss, optimizer and schedule are unchanged
    step cap                   the split is a seeded random subset of ``max_images`` images
                               (drop_last batches: max_images // bs steps per epoch)
    device                     on the CPU, Tensor.cuda / Module.cuda move to the CPU
                               (nn.DataParallel without a GPU is the bare module; their
                               GradScaler disables itself and is never used); on CUDA their
                               own path runs, on the one GPU CUDA_VISIBLE_DEVICES shows
    seeds                      random, numpy and torch seeded before their script (it seeds
                               nothing itself; DataLoader workers derive theirs from torch's)
    torchmetrics (if absent)   a stand-in ``torchmetrics.metric.Metric`` base class: their
                               func.py subclasses it at import for an evaluation class that
                               main.py imports but never uses; instantiating it raises
    stop                       after ``torch.save`` of epoch ``keep_epochs - 1``'s checkpoint
                               (their "1 epoch" is ``--epoch 2`` keeping epoch 0's), the run
                               ends; nothing after it would change that checkpoint

Timing hooks (host clock): DataLoader.__iter__ (epoch start) and every batch request
(_BaseDataLoaderIter.__next__: entry and return), and torch.save (start and end). Step i's time
is from its batch request to the next request (the last one of an epoch raises StopIteration);
their LARS wrapper reads every parameter's norms on the host each step, so host time follows the
device. Side "ours" calls train.main(argv). Both record the CPU seconds (user + system) of the
training loop: theirs from the first epoch's start to the kept checkpoint, main process and
DataLoader workers (reaped at each epoch's end); ours around Trainer.loop. Both write peak memory: this process's max RSS, the
largest reaped child's (their DataLoader workers; forked, so pages shared with the main process
count in it too) and on CUDA torch's peak allocated/reserved bytes.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import random
import resource
import runpy
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.formats import memory_images_path, write_json_atomic  # noqa: E402
from pipeline.sources.memory import load_memory_arrays  # noqa: E402

CHECKPOINT_DIR = "save_models"  # their main.py: <dir_name>/save_models/<epoch>.pt


class ConvertedSplit(torch.utils.data.Dataset):
    """Item i: (transform(PIL image of row rows[i]), its label), like torchvision's CIFAR10."""

    def __init__(self, images_path: Path, labels: np.ndarray, rows: np.ndarray, transform,
                 num_classes: int):
        self.images_path, self.labels, self.rows = str(images_path), labels, rows
        self.transform, self.num_classes = transform, num_classes
        self._images = None  # memory-mapped lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        row = int(self.rows[i])
        img = Image.fromarray(np.asarray(self._images[row]))  # (H, W, 3) uint8 RGB
        return self.transform(img), int(self.labels[row])


def subset_rows(count: int, max_images: int, seed: int) -> np.ndarray:
    """All rows, or a seeded random subset of ``max_images`` of them (int64, sorted)."""
    if not max_images or max_images >= count:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 14]).choice(count, max_images, replace=False))


class Stats:
    """What the hooks record; written as JSON when the side ends."""

    def __init__(self, path: Path):
        self.path = path
        self.d: dict = {"epoch_starts": [], "requests": [], "saves": [], "loader": None}

    def write(self, **extra) -> None:
        self.d.update(extra)
        self.d.update(peak_memory())
        write_json_atomic(self.path, self.d)


def cpu_times() -> list[float]:
    """[this process's CPU seconds (user + system, all threads), its reaped children's]."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return [me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime]


def peak_memory() -> dict:
    """Max RSS of this process and of its largest reaped child (MiB); CUDA peaks when used."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_cuda_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


# --------------------------------------------------------------------------- their side

def _pin_package(name: str, directory: Path) -> None:
    """Make ``import name`` resolve to ``directory`` (their model/, dataset/), whatever else is
    importable under that name (this project has a ``model`` package too)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    init = directory / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(directory)])
    else:  # a namespace package, as in their checkout
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(directory)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)


def _torchmetrics_stand_in() -> str | None:
    """Register a stand-in ``torchmetrics.metric.Metric`` when torchmetrics is not installed."""
    try:
        import torchmetrics.metric  # noqa: F401
        return None
    except ImportError:
        pass

    class Metric(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchmetrics is not installed: benchmarks/ref_bootstrap.py only "
                               "stands in for the base class the reference's func.py subclasses")

    pkg, sub = types.ModuleType("torchmetrics"), types.ModuleType("torchmetrics.metric")
    sub.Metric = Metric
    pkg.metric = sub
    sys.modules["torchmetrics"], sys.modules["torchmetrics.metric"] = pkg, sub
    return "torchmetrics.metric.Metric (not installed; a base class main.py's training never instantiates)"


def _on_cpu() -> list[str]:
    """Their .cuda() calls move to the CPU instead."""
    torch.Tensor.cuda = lambda self, *a, **k: self.to("cpu")
    torch.nn.Module.cuda = lambda self, *a, **k: self.to("cpu")
    return ["torch.Tensor.cuda and torch.nn.Module.cuda -> .to('cpu')"]


def _hook_timing(stats: Stats, keep_epochs: int) -> None:
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    it_orig, next_orig, save_orig = DataLoader.__iter__, _BaseDataLoaderIter.__next__, torch.save

    def iter_hook(self):
        stats.d["epoch_starts"].append(time.perf_counter())
        stats.d.setdefault("cpu_at_start", cpu_times())
        stats.d["loader"] = {"num_workers": self.num_workers, "batch_size": self.batch_size,
                             "drop_last": self.drop_last, "dataset_len": len(self.dataset),
                             "batches": len(self)}
        return it_orig(self)

    def next_hook(self):
        t = time.perf_counter()
        try:
            batch = next_orig(self)
        except StopIteration:
            stats.d["requests"].append([t, None])  # end of the epoch: ends its last step
            raise
        stats.d["requests"].append([t, time.perf_counter()])
        return batch

    def save_hook(obj, f, *args, **kwargs):
        t0 = time.perf_counter()
        save_orig(obj, f, *args, **kwargs)
        t1 = time.perf_counter()
        path = Path(str(f)) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.parent.name == CHECKPOINT_DIR and path.stem.isdigit():
            epoch = int(path.stem)
            stats.d["saves"].append({"epoch": epoch, "path": str(path.resolve()), "start": t0, "end": t1,
                                     "cpu": cpu_times()})  # the epoch's workers are reaped by now
            if epoch + 1 >= keep_epochs:
                stats.d["stopped_after_epochs"] = epoch + 1
                raise SystemExit(0)

    DataLoader.__iter__ = iter_hook
    _BaseDataLoaderIter.__next__ = next_hook
    torch.save = save_hook


def run_reference(spec: dict, stats: Stats) -> int:
    ref = Path(spec["ref_dir"]).resolve()
    data, seed = Path(spec["data"]).resolve(), int(spec["seed"])
    sys.dont_write_bytecode = True  # their checkout stays as it is: no __pycache__ written
    images, labels = load_memory_arrays(data, "train")  # validated here, read by the workers
    classes = len(np.unique(labels))
    rows = subset_rows(len(images), int(spec.get("max_images") or 0), seed)
    images_path = memory_images_path(data, "train")
    del images

    # their modules first on the path; this project's (a 'model' package too) off it
    here = {str(ROOT), str(ROOT / "benchmarks"), "", os.getcwd()}
    sys.path[:] = [str(ref)] + [p for p in sys.path if p not in here]
    _pin_package("model", ref / "model")
    _pin_package("dataset", ref / "dataset")
    patches = []
    shim = _torchmetrics_stand_in()
    if shim:
        patches.append(shim)
    if spec["device"] == "cpu":
        patches += _on_cpu()

    theirs = importlib.import_module("dataset.datasets")

    def load_dataset(data_name, train=True, num_patch=4, path="./data/"):  # their signature
        name = "dataset.aug4img" if str(data_name).lower() == "imagenet" else "dataset.aug"
        transform = importlib.import_module(name).ContrastiveLearningViewGenerator(num_patch=num_patch)
        stats.d["dataset"] = {"their_name": data_name, "train": train, "num_patch": num_patch,
                              "transform": f"{name}.ContrastiveLearningViewGenerator",
                              "images": len(rows), "of": len(labels), "data": str(data)}
        return ConvertedSplit(images_path, labels, rows, transform, classes)

    theirs.load_dataset = load_dataset
    patches.append("dataset.datasets.load_dataset -> the converted split as PIL images through "
                   "their dataset/aug.py transform")
    _hook_timing(stats, int(spec["keep_epochs"]))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    main = ref / "main.py"
    Path(spec["cwd"]).mkdir(parents=True, exist_ok=True)
    os.chdir(spec["cwd"])
    sys.argv = [str(main), *spec["argv"]]
    stats.d.update(patches=patches, argv=sys.argv, seed=seed, t_start=time.perf_counter())
    code = 0
    try:
        runpy.run_path(str(main), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    stats.d["t_end"] = time.perf_counter()
    return code


# --------------------------------------------------------------------------- our side

def run_ours(spec: dict, stats: Stats) -> int:
    import train

    loop = train.Trainer.loop

    def timed_loop(self, log):  # CPU time of the training loop alone, as for theirs
        stats.d["cpu_at_start"] = cpu_times()
        try:
            return loop(self, log)
        finally:
            stats.d["cpu_at_end"] = cpu_times()

    train.Trainer.loop = timed_loop
    os.chdir(ROOT)
    stats.d.update(argv=["train.py", *spec["argv"]], t_start=time.perf_counter())
    code = train.main(list(spec["argv"]))
    stats.d["t_end"] = time.perf_counter()
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/ref_bootstrap.py SPEC.json (written by vs_reference.py)",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    stats = Stats(Path(spec["stats"]))
    run = {"reference": run_reference, "ours": run_ours}[spec["side"]]
    code = 1
    try:
        code = run(spec, stats)
    finally:
        stats.write(returncode=code, side=spec["side"])
    return code


if __name__ == "__main__":
    sys.exit(main())
