"""Shared fixtures: the real CIFAR-10 from ../shared (the lossless PNG archive where it exists,
else the JPEG copy), a small subset of it, converted; and a subset of the JPEG copy for the
tests that need real JPEG files (shards, decoders)."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
SHARED_CIFAR_PNG = SHARED_DATASETS / "cifar10-png.tar.xz"  # lossless: 50,000 train, 1,000 test
SHARED_CIFAR_JPEG = SHARED_DATASETS / "cifar10-jpeg.tar.xz"  # JPEG q75 copy: 50,000 + 10,000
SHARED_CIFAR = SHARED_CIFAR_PNG if SHARED_CIFAR_PNG.is_file() else SHARED_CIFAR_JPEG


def run_tool(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a project command-line tool (path relative to the repo root) with this Python."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _subset(archive: Path, out: Path, want: dict[str, int]) -> Path:
    """Stream ``archive`` once and write only the first ``want[split]`` files of each class
    (in archive order) into ``out`` as an ImageFolder."""
    if not archive.is_file():
        pytest.skip(f"{archive} not found (tests read the real data from ../shared)")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r|xz") as tf:
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
def cifar_subset_dir(tmp_path_factory) -> Path:
    """A real-CIFAR ImageFolder with 50 train and 10 test images per class (500 + 100), from the
    lossless archive where it exists (PNG files), else from the JPEG copy."""
    return _subset(SHARED_CIFAR, tmp_path_factory.mktemp("cifar-subset"), {"train": 50, "test": 10})


@pytest.fixture(scope="session")
def cifar_jpeg_subset_dir(tmp_path_factory) -> Path:
    """Real CIFAR JPEG files (the shared JPEG copy), 50 train and 10 test images per class, for
    the tests of JPEG pass-through, the shard format and its decoders."""
    return _subset(SHARED_CIFAR_JPEG, tmp_path_factory.mktemp("cifar-jpeg-subset"),
                   {"train": 50, "test": 10})


@pytest.fixture(scope="session")
def cifar_subset_data(cifar_subset_dir, tmp_path_factory) -> Path:
    """cifar_subset_dir converted to all three formats: the data/<name> directory."""
    out = tmp_path_factory.mktemp("data")
    run_tool("tools/convert_datasets.py", str(cifar_subset_dir), "--name", "cifar10-subset",
             "--out", str(out))
    return out / "cifar10-subset"


def pytest_configure(config):
    """pytest-timeout (setup.cfg: ``timeout``, ``timeout_method = thread``) dumps the threads'
    stacks and ends the process when a test runs past its limit; put the test's id and its limit
    in front of that dump, so the failure names the test even with ``-q``."""
    try:
        import pytest_timeout
    except ImportError:
        return
    dump = getattr(pytest_timeout, "timeout_timer", None)
    if dump is None or getattr(dump, "_names_the_test", False):
        return

    def named_dump(item, settings):
        capman = item.config.pluginmanager.getplugin("capturemanager")
        if capman:
            capman.suspend_global_capture(item)
        item.config.get_terminal_writer().line(
            f"\nTIMEOUT: {item.nodeid} ran past its limit of {settings.timeout:g} s "
            "(pytest-timeout; its threads' stacks follow, then pytest exits)", red=True, bold=True)
        dump(item, settings)

    named_dump._names_the_test = True
    pytest_timeout.timeout_timer = named_dump
