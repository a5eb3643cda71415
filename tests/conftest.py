"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared, a small subset of them, converted."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def run_tool(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a project command-line tool (path relative to the repo root) with this Python."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cifar_jpeg_dir(tmp_path_factory) -> Path:
    """The full shared CIFAR-10 ImageFolder (train/, test/), unpacked once per session."""
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"{SHARED_CIFAR} not found (tests read the real data from ../shared)")
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(SHARED_CIFAR) as tf:
        tf.extractall(out, filter="data")
    roots = [p for p in out.rglob("train") if p.is_dir()]
    return roots[0].parent


@pytest.fixture(scope="session")
def cifar_subset_dir(tmp_path_factory) -> Path:
    """A real-CIFAR ImageFolder with 50 train and 10 test images per class (500 + 100).

    Streams the shared archive once and writes only those files (the first ones of each class
    in archive order), rather than unpacking all 60,000.
    """
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"{SHARED_CIFAR} not found (tests read the real data from ../shared)")
    want = {"train": 50, "test": 10}
    out = tmp_path_factory.mktemp("cifar-subset")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(SHARED_CIFAR, "r|xz") as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in want:
                continue
            split, cls = parts[-3], parts[-2]
            if taken.get((split, cls), 0) >= want[split]:
                continue
            taken[(split, cls)] = taken.get((split, cls), 0) + 1
            dst = out / split / cls / parts[-1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tf.extractfile(m).read())
    return out


@pytest.fixture(scope="session")
def cifar_subset_data(cifar_subset_dir, tmp_path_factory) -> Path:
    """cifar_subset_dir converted to all three formats: the data/<name> directory."""
    out = tmp_path_factory.mktemp("data")
    run_tool("tools/convert_datasets.py", str(cifar_subset_dir), "--name", "cifar10-subset",
             "--out", str(out))
    return out / "cifar10-subset"
