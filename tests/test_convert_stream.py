"""The converter at scale: bounded memory (a flat peak from N to 4N images), resumable runs
(killed part-way by a signal or SIGKILL, then --resume: the same bytes as an uninterrupted run,
finished chunks not redone), the streaming .npy and .beton writers, the package's API."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from pipeline.convert import BadImage, ConvertOptions, convert, verify
from pipeline.errors import UserError
from pipeline.formats import dali_shard_name, load_manifest, memory_images_path

TOOL = ROOT / "tools" / "convert_datasets.py"


def _cifar_pictures(subset: Path, split: str, per_class: int) -> list[tuple[str, str, np.ndarray]]:
    """(class, stem, RGB uint8) of the first ``per_class`` images of each class of conftest.py's
    real pictures (the CIFAR-10 subset or the sample-image crops), whatever their file format."""
    out = []
    for cls in sorted(p.name for p in (subset / split).iterdir()):
        for f in sorted((subset / split / cls).iterdir())[:per_class]:
            with Image.open(f) as im:
                out.append((cls, f.stem, np.asarray(im.convert("RGB"))))
    return out


def _jpeg_folder(root: Path, pictures, side: int | None = None, quality: int = 90) -> Path:
    for cls, stem, px in pictures:
        img = Image.fromarray(px)
        if side:
            img = img.resize((side, side), Image.Resampling.BICUBIC)
        dst = root / "train" / cls / f"{stem}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, "JPEG", quality=quality)
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# ------------------------------------------------------------------ bounded memory


def test_peak_memory_does_not_grow_with_the_number_of_images(cifar_subset_dir, tmp_path):
    """Convert 160 and then 640 real pictures (conftest.py's, repeated) upscaled to 256 px (JPEG), all three
    formats, 2 workers: the converting process' peak resident memory (getrusage, exact) grows
    by far less than the 96 MiB of pixels the extra 480 images hold (a converter holding a
    split in memory grows by at least that)."""
    from benchmarks.convert_memory import run_measured

    pictures = _cifar_pictures(cifar_subset_dir, "train", 10**6)  # all 500
    pictures = (pictures * -(-640 // len(pictures)))[:640]
    sizes, side, peaks = (160, 640), 256, {}
    for n in sizes:
        picked = sorted(pictures[:n], key=lambda p: p[0])
        src = tmp_path / f"src{n}"
        for i, (cls, stem, px) in enumerate(picked):  # unique names (pictures repeat past 500)
            _jpeg_folder(src, [(cls, f"{i:04d}_{stem}", px)], side=side)
        out = tmp_path / f"out{n}"
        r = run_measured(TOOL, [str(src), "--name", "ds", "--out", str(out), "--workers", "2",
                                "--ffcv-encoding", "jpg", "--no-progress"], cwd=ROOT)
        assert r["exit"] == 0, r["stderr"]
        assert load_manifest(out / "ds").splits["train"].count == n
        peaks[n] = r["peak_rss_main_mib"]
    extra_pixels = (sizes[1] - sizes[0]) * side * side * 3 / 2**20  # 90 MiB
    growth = peaks[sizes[1]] - peaks[sizes[0]]
    assert growth < 12, f"peak RSS {peaks} MiB grew by {growth:.1f} MiB ({extra_pixels:.0f} MiB " \
                        f"of extra pixels)"


# ------------------------------------------------------------------ resume


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"converter exited early ({proc.returncode}):\n"
                                 f"{proc.stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the converter")
        time.sleep(0.05)


def _records(out: Path, split: str) -> list[Path]:
    return sorted(out.glob(f".ds.tmp-*/.resume/{split}/chunk-*.json"))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_conversion_resumes_to_the_same_bytes(cifar_subset_dir, tmp_path, how):
    """A real-picture ImageFolder (60 of conftest.py's) whose 28th train image is a FIFO: the converter finishes
    chunks 0 and 1 (10 images each), then blocks reading it. Stopped there by SIGTERM (a
    signal: clean exit 143, chunks kept) or SIGKILL (a crash: no clean-up at all), then the FIFO
    is replaced by the picture and --resume finishes: every file's sha256 equals an
    uninterrupted conversion's, --verify passes, and the two finished shards were not
    rewritten (same inode and mtime) nor their 20 images decoded again."""
    n_classes = len(list((cifar_subset_dir / "train").iterdir()))
    pictures = _cifar_pictures(cifar_subset_dir, "train", 60 // n_classes)  # 60: 10 classes of 6
    assert len(pictures) >= 30
    full = _jpeg_folder(tmp_path / "full", pictures)
    for cls, stem, px in _cifar_pictures(cifar_subset_dir, "test", 2):
        (full / "test" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(full / "test" / cls / f"{stem}.png")
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(full), str(src)], check=True)
    files = sorted((src / "train").glob("*/*.jpg"))
    blocker = files[27]
    blocker.unlink()
    os.mkfifo(blocker)
    flags = ["--name", "ds", "--samples-per-shard", "10", "--workers", "2", "--no-progress",
             "--ffcv-encoding", "raw"]  # auto would read every file's header first
    ref = convert(full, ConvertOptions(name="ds", out=tmp_path / "ref", samples_per_shard=10,
                                       workers=1, ffcv_encoding="raw", progress=False))

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(TOOL), str(src), "--out", str(out), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: len(_records(out, "train")) == 2, 120, proc)
        time.sleep(0.5)  # blocked at the FIFO: nothing more can finish
        assert len(_records(out, "train")) == 2
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers, should any be left
        except ProcessLookupError:
            pass
    if how == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM
        err = proc.stderr.read()
        assert "stopped by SIGTERM; the 2 finished chunks kept in" in err and "--resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    (work,) = [p for p in out.iterdir()]
    assert work.name.startswith(".ds.tmp-")  # nothing that looks like a dataset
    assert not (work / "manifest.json").exists()
    shard_files = [work / "train" / dali_shard_name(i) for i in range(2)]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files]

    blocker.unlink()
    blocker.write_bytes((full / blocker.relative_to(src)).read_bytes())
    res = convert(src, ConvertOptions(name="ds", out=out, samples_per_shard=10, workers=2,
                                      ffcv_encoding="raw", progress=False, resume=True))
    assert res.resumed == {"train": 20, "test": 0} and res.decoded == res.images - 20
    assert any("continuing the partial conversion" in n for n in res.notes)
    assert [p.name for p in out.iterdir()] == ["ds"]
    finished = [out / "ds" / "train" / dali_shard_name(i) for i in range(2)]
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in finished] == before
    got, want = _manifest(res.root), _manifest(ref.root)
    assert got["files"] == want["files"]  # every file's sha256
    assert {k: v for k, v in got.items() if k != "source"} == \
        {k: v for k, v in want.items() if k != "source"}
    assert verify(res.root, workers=1, progress=False) == []


def _folder_with_bad_file(root: Path, n: int = 26, bad: int = 23) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / "train" / f"c{i % 2}" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        if i == bad:
            p.write_bytes(b"not a picture")
        else:
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(p)
    return root


def test_bad_image_keeps_finished_chunks_for_skip_bad_resume(tmp_path):
    src = _folder_with_bad_file(tmp_path / "src")  # c0: 13 files, c1: 13 (c1/023.png bad)
    kw = dict(name="ds", samples_per_shard=5, workers=1, progress=False,
              formats=("memory", "ffcv", "dali"))
    with pytest.raises(BadImage, match=r"023\.png: not an image PIL can read; .*--skip-bad "
                                       r"--resume continues from the 4 finished chunks kept in"):
        convert(src, ConvertOptions(out=tmp_path / "out", **kw))
    (work,) = list((tmp_path / "out").iterdir())
    assert work.name.startswith(".ds.tmp-")
    # other settings: refused, naming the flag; the partial conversion stays
    with pytest.raises(UserError, match=r"--resume: .* other settings \(--jpeg-quality\)"):
        convert(src, ConvertOptions(out=tmp_path / "out", jpeg_quality=80, skip_bad=True,
                                    resume=True, **kw))
    res = convert(src, ConvertOptions(out=tmp_path / "out", skip_bad=True, resume=True, **kw))
    assert res.resumed == {"train": 20} and res.decoded == 5
    ref = convert(src, ConvertOptions(out=tmp_path / "ref", skip_bad=True, **kw))
    got, want = _manifest(res.root), _manifest(ref.root)
    assert got["files"] == want["files"] and got["skipped"] == want["skipped"]
    assert [s["path"] for s in got["skipped"]] == [str(src / "train/c1/023.png")]
    assert np.load(memory_images_path(res.root, "train")).shape == (25, 12, 12, 3)
    assert verify(res.root, workers=1, progress=False) == []


def test_resume_without_a_partial_run_starts_over_and_other_errors_leave_nothing(tmp_path):
    src = _folder_with_bad_file(tmp_path / "src", n=8, bad=-1)
    res = convert(src, ConvertOptions(name="ds", out=tmp_path / "out", workers=1, progress=False,
                                      formats=("memory",), resume=True))
    assert res.decoded == res.images == 8 and res.resumed == {"train": 0}
    assert any("no partial conversion of ds" in n for n in res.notes)
    # a size mismatch (bad input other than an image) after finished chunks: nothing kept
    Image.new("RGB", (9, 12)).save(src / "train" / "c1" / "zzz.png")
    with pytest.raises(UserError, match="the memory format needs one size"):
        convert(src, ConvertOptions(name="ds2", out=tmp_path / "out", workers=1, progress=False,
                                    formats=("memory",), samples_per_shard=2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]


# ------------------------------------------------------------------ the streaming writers


def test_npy_writer_header_shrinks_in_place(tmp_path):
    from pipeline.convert.writers import NpyWriter, npy_header

    for capacity, rows in [(1000, 999), (10**6, 3), (7, 7)]:
        rng = np.random.default_rng(capacity)
        images = rng.integers(0, 256, (rows, 4, 5, 3), np.uint8)
        w = NpyWriter(tmp_path / "x.npy", capacity, (4, 5, 3))
        for i, img in enumerate(images):
            w.add(img)
            if i == rows // 2:
                w.checkpoint()
        w.finish()
        assert len(npy_header((rows, 4, 5, 3), length=w.header_len)) == w.header_len
        got = np.load(tmp_path / "x.npy")
        np.testing.assert_array_equal(got, images)
        assert (tmp_path / "x.npy").stat().st_size == w.header_len + images.nbytes
    assert len(npy_header((5, 2, 2, 3))) % 64 == 0


@pytest.mark.parametrize("encoding", ["raw", "jpg"])
def test_beton_writer_equals_ffcvs_own_writer_across_pages_and_a_resume(tmp_path, encoding):
    """Our streaming BetonWriter writes the same bytes as FFCV's DatasetWriter (one worker):
    120 random ~160 px images on 2 MiB pages (several pages, samples that do not fit moving to
    the next one), interrupted after a checkpoint -- with more samples written past it -- and
    continued from the checkpoint's state."""
    pytest.importorskip("ffcv", reason="ffcv not installed")
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    from pipeline.beton import BetonWriter, _fields, encode_image, read_beton

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (160, 150 + i % 9, 3), np.uint8) for i in range(120)]
    labels = rng.integers(0, 10, 120)

    class Items:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    theirs = tmp_path / "theirs.beton"
    DatasetWriter(str(theirs), _fields(encoding, 90), page_size=MIN_PAGE_SIZE,
                  num_workers=1).from_indexed_dataset(Items())
    ours = tmp_path / "ours.beton"
    w = BetonWriter(ours, 120, encoding, 90, page_size=MIN_PAGE_SIZE)
    for i in range(50):
        w.add(labels[i], image=images[i])
    state = w.checkpoint()
    for i in range(50, 70):  # lost: the run dies before its next checkpoint
        w.add(labels[i], encoded=encode_image(images[i], encoding, 90))
    w._write_page()
    w.close()
    w = BetonWriter(ours, 120, encoding, 90, page_size=MIN_PAGE_SIZE, resume=state)
    for i in range(50, 120):
        w.add(labels[i], encoded=encode_image(images[i], encoding, 90))
    w.finish()
    assert ours.stat().st_size > 3 * MIN_PAGE_SIZE  # a header page, two data pages or more
    assert ours.read_bytes() == theirs.read_bytes()
    got, got_labels = read_beton(ours)
    np.testing.assert_array_equal(got_labels, labels)
    if encoding == "raw":
        assert all(np.array_equal(a, b) for a, b in zip(got, images))


def test_compressed_archive_is_not_held_in_memory(tmp_path):
    """A .tar.xz is decompressed once into an anonymous temp file, read back by offset."""
    import tarfile

    from pipeline.convert import open_tree

    src = _folder_with_bad_file(tmp_path / "src", n=6, bad=-1)
    archive = tmp_path / "ds.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(src, arcname="ds")
    with open_tree(archive, spill_dir=tmp_path) as tree:
        assert tree.compressed and not hasattr(tree, "data")
        assert set(tmp_path.iterdir()) == {src, archive}  # the spill file has no name
        rel = next(f for f in tree.files if f.endswith("003.png"))
        assert tree.read(rel) == (src / "train" / "c1" / "003.png").read_bytes()


def test_public_api_and_one_concern_per_module():
    import pipeline.convert as c

    for name in ("ConvertOptions", "ConvertResult", "convert", "verify", "jpeg_tolerance",
                 "read_classes_file", "decode_image", "encode_jpeg", "open_tree", "plan_dataset",
                 "restrict_classes", "parallel_map", "download_cifar", "default_workers",
                 "DEFAULT_JPEG_QUALITY", "FFCV_RAW_MAX_SIDE", "SAMPLES_PER_SHARD", "TOOL_VERSION"):
        assert hasattr(c, name), name
    sizes = {p.name: len(p.read_text().splitlines())
             for p in (ROOT / "pipeline" / "convert").glob("*.py")}
    assert set(sizes) >= {"trees.py", "layouts.py", "decode.py", "parallel.py", "writers.py",
                          "resume.py", "verify.py", "run.py", "__init__.py"}
    assert max(sizes.values()) < 450, sizes


def test_convert_memory_benchmark_smoke_and_report(cifar_subset_dir, tmp_path):
    """benchmarks/convert_memory.py end to end at toy scale (beside the converter of this very
    checkout as its 'baseline'), and report.py's table of it."""
    from conftest import run_tool

    res = tmp_path / "results"
    run_tool("benchmarks/convert_memory.py", "--sizes", "20,40", "--side", "48", "--source",
             str(cifar_subset_dir), "--formats", "memory", "--workers", "1", "--baseline", "HEAD",
             "--baseline-max", "20", "--work", str(tmp_path / "work"), "--json",
             str(res / "convert_memory_smoke.json"))
    d = json.loads((res / "convert_memory_smoke.json").read_text())
    rows = [(r["converter"], r["n"]) for r in d["rows"]]
    assert rows == [("streaming", 20), ("streaming", 40), ("baseline HEAD", 20)]
    assert all(r["peak_rss_main_mib"] > 10 and r["images_per_s"] > 0 for r in d["rows"])
    assert d["rows"][1]["images_bytes_mib"] > d["rows"][0]["images_bytes_mib"]
    assert d["growth_mib"]["streaming"]["to_n"] == 40 and "git_commit" in d
    run_tool("benchmarks/report.py", "--results", str(res))
    report = (res / "REPORT.md").read_text()
    assert "## Conversion memory vs the number of images" in report
    assert sum(l.endswith("| convert_memory_smoke.json |") for l in report.splitlines()) == 3


def test_a_stop_while_publishing_is_held_until_the_dataset_is_complete(tmp_path, monkeypatch):
    """Ctrl-C between dropping the resume state and the final rename would lose a finished
    conversion: the signal waits until OUT/NAME is complete, then surfaces as Interrupted."""
    from pipeline.convert import Interrupted
    from pipeline.convert.resume import WorkDir

    real = WorkDir.drop_state

    def drop_then_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)  # held back: nothing happens yet
        real(self)

    monkeypatch.setattr(WorkDir, "drop_state", drop_then_ctrl_c)
    # Ctrl-C as in an interactive shell: a background job (CI started with `&`) inherits an
    # ignored SIGINT, which would make the kill a no-op
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_while_publishing(tmp_path, Interrupted)
    finally:
        signal.signal(signal.SIGINT, old)


def _stop_while_publishing(tmp_path, Interrupted):
    src = _folder_with_bad_file(tmp_path / "src", n=6, bad=-1)
    with pytest.raises(Interrupted, match="was complete before the stop"):
        convert(src, ConvertOptions(name="ds", out=tmp_path / "out", workers=1, progress=False,
                                    formats=("memory",)))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds"]
    assert verify(tmp_path / "out" / "ds", workers=1, progress=False) == []
