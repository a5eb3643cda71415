"""Shared fixtures: a small ImageFolder of real pictures, converted; and a JPEG copy of it for
the tests that need real JPEG files (shards, decoders).

Where ``../shared/datasets`` holds the CIFAR-10 archives, the pictures are a subset of CIFAR-10
(the lossless PNG archive where it exists, else the JPEG copy): 10 classes of 50 train and 10
test images. Without them, or with ``EMP_SSL_NO_SHARED=1`` in the environment (to test a clone's
view on a machine that has ``../shared``), they are crops of the two photographs scikit-learn
ships (tests/sample_images.py): 4 classes of 125 train and 25 test images, PNG and JPEG. Both
are 32x32 RGB, 500 + 100 pictures. Tests read classes and counts from the data; the few that
are about CIFAR-10 itself (test_convert.py's whole-archive conversion) skip without it.

The fixtures keep their historical names (``cifar_subset_dir``, ``cifar_jpeg_subset_dir``,
``cifar_subset_data``); ``real_images_dir``, ``real_jpeg_images_dir`` and ``real_images_data``
are the same fixtures under honest names. ``REAL_IMAGES`` says which data a run uses (printed in
pytest's header)."""
from __future__ import annotations

import os
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
# EMP_SSL_NO_SHARED=1: behave as a clone without ../shared (sample-image crops, CIFAR tests skip)
NO_SHARED = os.environ.get("EMP_SSL_NO_SHARED", "") not in ("", "0")
USE_SHARED = not NO_SHARED and SHARED_CIFAR.is_file()
USE_SHARED_JPEG = not NO_SHARED and SHARED_CIFAR_JPEG.is_file()
REAL_IMAGES = "cifar10" if USE_SHARED else "sample-images"
# the converted fixture's dataset name (data/<name>, manifest "name", probe feature caches)
REAL_IMAGES_NAME = "cifar10-subset" if USE_SHARED else "sample-images"


def pytest_report_header(config) -> str:
    if USE_SHARED:
        return f"real images: CIFAR-10 subsets of {SHARED_CIFAR} (and {SHARED_CIFAR_JPEG.name})"
    why = "EMP_SSL_NO_SHARED is set" if NO_SHARED else f"no {SHARED_DATASETS}/cifar10-*.tar.xz"
    return f"real images: crops of scikit-learn's sample photographs ({why})"


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


def _sample_images(out: Path, fmt: str) -> Path:
    from sample_images import build
    return build(out, fmt)


@pytest.fixture(scope="session")
def real_images_dir(tmp_path_factory) -> Path:
    """An ImageFolder of 500 train and 100 test real 32x32 pictures: a CIFAR-10 subset (50 and
    10 a class) from the lossless archive where it exists (PNG files), else from the JPEG copy;
    without ../shared, sample-image crops as PNG files (125 and 25 a class)."""
    out = tmp_path_factory.mktemp("real-images")
    if USE_SHARED:
        return _subset(SHARED_CIFAR, out, {"train": 50, "test": 10})
    return _sample_images(out, "png")


@pytest.fixture(scope="session")
def real_jpeg_images_dir(tmp_path_factory) -> Path:
    """Real JPEG files, 500 train and 100 test, for the tests of JPEG pass-through, the shard
    format and its decoders: the shared CIFAR-10 JPEG copy's first 50 and 10 a class, or the
    sample-image crops as JPEG files (quality 75, 4:2:0, as the shared copy)."""
    out = tmp_path_factory.mktemp("real-jpeg-images")
    if USE_SHARED_JPEG:
        return _subset(SHARED_CIFAR_JPEG, out, {"train": 50, "test": 10})
    return _sample_images(out, "jpeg")


@pytest.fixture(scope="session")
def real_images_data(real_images_dir, tmp_path_factory) -> Path:
    """real_images_dir converted to all three formats: the data/<name> directory (name
    ``REAL_IMAGES_NAME``)."""
    out = tmp_path_factory.mktemp("data")
    run_tool("tools/convert_datasets.py", str(real_images_dir), "--name", REAL_IMAGES_NAME,
             "--out", str(out))
    return out / REAL_IMAGES_NAME


# the historical names (every test used CIFAR-10 before the sample images existed)
@pytest.fixture(scope="session")
def cifar_subset_dir(real_images_dir) -> Path:
    return real_images_dir


@pytest.fixture(scope="session")
def cifar_jpeg_subset_dir(real_jpeg_images_dir) -> Path:
    return real_jpeg_images_dir


@pytest.fixture(scope="session")
def cifar_subset_data(real_images_data) -> Path:
    return real_images_data


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
