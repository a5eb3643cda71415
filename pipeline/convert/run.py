"""One conversion: SOURCE -> OUT/NAME in every requested format, streamed and resumable.

    plan ──▶ work dir (OUT/.NAME.tmp-*, or a dead run's with --resume) ──▶ per split, in order:
        decode in a Pool (bounded look-ahead) ──▶ per image: .npy row, .beton sample, shard member
        every samples_per_shard kept images: a checkpoint (all of it fsynced, then its record)
    ──▶ sha256 of every file ──▶ manifest.json ──▶ rename to OUT/NAME

Nothing is held per image beyond a label and, for the .beton, its allocation (a few dozen
bytes): resident memory is the worker pool's look-ahead (workers x image size) plus one
buffer per writer, whatever the number of images.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import shards
from ..errors import UserError, one_line
from ..formats import (FORMATS, MANIFEST_NAME, Manifest, SplitInfo, dali_dir, dali_index_name,
                       dali_shard_name, default_workers, save_manifest, sha256_file)
from .decode import DecodeSettings, _Bad, decode_job, image_side
from .layouts import DatasetPlan, SplitPlan, plan_dataset, plan_fingerprint, restrict_classes
from .parallel import close_pool, make_pool, parallel_map
from .resume import STATE_DIR, ChunkRecord, SplitProgress, WorkDir, prepare_work_dir, stop_signals_held
from .trees import Tree, open_tree
from .writers import SplitWriters

TOOL_VERSION = "convert_datasets 1.1"
FFCV_RAW_MAX_SIDE = 64  # --ffcv-encoding auto: raw pixels up to this side, JPEG above
DEFAULT_JPEG_QUALITY = 95
SAMPLES_PER_SHARD = 5000
DECODE_CHUNK = 16  # images a worker decodes per task (fewer for small splits)


class BadImage(UserError):
    """A file that does not decode (without --skip-bad): --resume --skip-bad continues."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a signal after some chunks were finished; the message says where they are."""


@dataclass
class ConvertOptions:
    name: str
    out: Path = Path("data")
    formats: tuple[str, ...] = FORMATS
    resize: int | None = None  # shorter side -> SIDE, then center crop SIDE x SIDE
    workers: int = field(default_factory=default_workers)
    overwrite: bool = False
    skip_bad: bool = False
    classes: list[str] | None = None  # keep only these (from --classes FILE)
    classes_flag: str = "--classes"  # how to name the class list in messages
    ffcv_encoding: str = "auto"  # raw | jpg | auto (raw up to FFCV_RAW_MAX_SIDE px a side)
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    samples_per_shard: int = SAMPLES_PER_SHARD  # also the images of a resumable chunk
    progress: bool = True
    source_label: str | None = None  # what manifest.source records (default: SOURCE resolved)
    resume: bool = False  # continue a dead run's partial conversion with the same settings


@dataclass
class ConvertResult:
    root: Path
    manifest: Manifest
    seconds: dict[str, float]  # plan, decode, memory, ffcv, dali, checksums, total
    images: int
    passthrough: dict[str, int]  # per split: JPEGs stored untouched in the dali shards
    notes: list[str]
    decoded: int = 0  # images read and decoded by this run (images minus those resumed)
    resumed: dict[str, int] = field(default_factory=dict)  # per split: images done before

    def images_per_s(self) -> dict[str, float]:
        """Throughput of this run's images: decode stage, each writer alone, each format end to
        end, whole run. Decoding and writing overlap (streamed): 'decode' is the time spent
        waiting for decoded images, a writer's the time spent in it."""
        s, n = self.seconds, self.decoded
        out = {"decode": n / s["decode"] if s["decode"] else float("inf")}
        for fmt in self.manifest.formats:
            out[f"{fmt}_write"] = n / s[fmt] if s[fmt] else float("inf")
            out[f"{fmt}_end_to_end"] = n / (s["plan"] + s["decode"] + s[fmt])
        out["total"] = n / s["total"]
        return out


def validate_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise UserError(f"--name {name!r}: must be a plain directory name (no '/', not starting "
                        f"with '.')")
    return name


def _check_options(opts: ConvertOptions) -> None:
    validate_name(opts.name)
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise UserError(f"--formats {','.join(opts.formats)}: choose from {','.join(FORMATS)}")
    if opts.resize is not None and opts.resize < 1:
        raise UserError(f"--resize {opts.resize}: must be a positive side in pixels")
    if opts.workers < 1:
        raise UserError(f"--workers {opts.workers}: must be >= 1")
    if not 1 <= opts.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {opts.jpeg_quality}: must be in 1..100")
    if opts.ffcv_encoding not in ("raw", "jpg", "auto"):
        raise UserError(f"--ffcv-encoding {opts.ffcv_encoding}: choose raw, jpg or auto")
    if opts.samples_per_shard < 1:
        raise UserError(f"samples per shard {opts.samples_per_shard}: must be >= 1")


def _jobs(tree: Tree, sp: SplitPlan, start: int) -> Iterator[tuple[int, object]]:
    """(index, payload) from index ``start`` on: CIFAR pixels, a file path, or the bytes."""
    if sp.arrays is not None:
        for i in range(start, len(sp)):
            yield i, sp.arrays[i]
        return
    for i in range(start, len(sp.paths)):
        try:
            yield i, tree.job(sp.paths[i])
        except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, RuntimeError) as e:
            yield i, _Bad(f"unreadable in the archive ({one_line(e)})")


def _settings(source, opts: ConvertOptions, plan: DatasetPlan, formats: tuple[str, ...]) -> dict:
    """What a resumed run must share with the run it continues (resume.differences)."""
    return {"tool_version": TOOL_VERSION,
            "source": opts.source_label or str(Path(source).resolve()),
            "source_format": plan.kind, "classes": list(plan.classes),
            "plan": plan_fingerprint(plan), "formats": list(formats), "resize": opts.resize,
            "jpeg_quality": opts.jpeg_quality,
            "ffcv_encoding": opts.ffcv_encoding if "ffcv" in formats else None,
            "samples_per_shard": opts.samples_per_shard, "skip_bad": opts.skip_bad}


def _largest_side(tree: Tree, plan: DatasetPlan, workers: int, pool) -> int:
    """The longest image side over all splits, from file headers; stops once above
    FFCV_RAW_MAX_SIDE (all that --ffcv-encoding auto asks)."""
    side = 0
    for sp in plan.splits.values():
        if sp.arrays is not None:
            side = max(side, *sp.arrays.shape[1:3])
            continue
        for s in parallel_map(image_side, (p for _, p in _jobs(tree, sp, 0)), workers, pool,
                              DECODE_CHUNK):
            side = max(side, s or 0)
            if side > FFCV_RAW_MAX_SIDE:
                return side
    return side


def _ffcv_encoding(work: WorkDir, opts: ConvertOptions, plan: DatasetPlan, tree: Tree,
                   pool) -> str:
    """raw or jpg: --ffcv-encoding, or for auto raw when no image side exceeds
    FFCV_RAW_MAX_SIDE (after --resize). Chosen once per work dir (a resume keeps it)."""
    if work.state.get("ffcv_encoding"):
        return work.state["ffcv_encoding"]
    enc = opts.ffcv_encoding
    if enc == "auto":
        side = opts.resize or _largest_side(tree, plan, opts.workers, pool)
        enc = "raw" if side <= FFCV_RAW_MAX_SIDE else "jpg"
    work.state["ffcv_encoding"] = enc
    work.save_state()
    return enc


class _SplitRun:
    """Converts one split into the work dir, from its last checkpoint on."""

    def __init__(self, tree: Tree, split: str, sp: SplitPlan, work: WorkDir, opts: ConvertOptions,
                 formats: tuple[str, ...], ffcv_encoding: str, pool):
        self.tree, self.split, self.sp, self.work, self.opts = tree, split, sp, work, opts
        self.formats, self.ffcv_encoding, self.pool = formats, ffcv_encoding, pool
        self.prog, self.beton_state = work.progress(split)
        self.resumed = self.prog.kept
        self.chunk = ChunkRecord(self.prog.chunks, self.prog.next_index)
        self.shape = next(iter(self.prog.shapes)) if "memory" in formats and self.prog.shapes \
            else None
        self.seconds = {"decode": 0.0, "dali": 0.0, "memory": 0.0, "ffcv": 0.0}
        self.writers: SplitWriters | None = None
        self._in_samples = 0.0  # seconds spent in _samples: decode wait + memory/ffcv writes

    def name(self, i: int) -> str:
        return self.tree.display(self.sp.paths[i]) if self.sp.paths else f"{self.split}[{i}]"

    def run(self) -> SplitProgress:
        if self.prog.done:
            return self.prog
        self._drop_unfinished_shards()
        self.writers = SplitWriters(self.work.path, self.split, len(self.sp), self.formats,
                                    self.ffcv_encoding, self.opts.jpeg_quality,
                                    kept=self.prog.kept, shape=self.shape,
                                    beton_state=self.beton_state)
        try:
            t = time.perf_counter()
            if "dali" in self.formats:
                out, per = dali_dir(self.work.path, self.split), self.opts.samples_per_shard
                start = self.prog.kept  # a multiple of per: chunks are whole shards
                if start == 0:
                    shards.write_shards(out, self._samples(), per)
                else:
                    shards.append_shards(out, self._samples(), per, start=start)
                self.seconds["dali"] = time.perf_counter() - t - self._in_samples
            else:
                for _ in self._samples():
                    pass
            if not self.chunk.empty():
                self._checkpoint()
            if self.prog.kept == 0:
                raise UserError(f"split '{self.split}' of {self.tree.label}: no readable images")
            self.seconds["decode"] = self._in_samples - sum(self.writers.seconds.values())
            self.writers.finish(self.prog.label_array())
            self.work.mark_done(self.split)
        finally:
            self.writers.close()
        self.seconds.update(self.writers.seconds)
        return self.prog

    def _drop_unfinished_shards(self) -> None:
        """Shards past the finished chunks (an interrupted run's last, complete or not)."""
        d = dali_dir(self.work.path, self.split)
        if not d.is_dir():
            return
        keep = {dali_shard_name(i) for i in range(self.prog.chunks)}
        keep |= {dali_index_name(i) for i in range(self.prog.chunks)}
        for p in d.iterdir():
            if p.is_file() and p.name not in keep:
                p.unlink()

    def _samples(self) -> Iterator[tuple[bytes | None, int]]:
        """(jpeg, label) of each kept image, after writing it to the memory/ffcv outputs; a
        checkpoint after every samples_per_shard of them (the consumer asks for the next image
        only once the shard is on disk)."""
        from tqdm import tqdm

        opts, sp, fmts = self.opts, self.sp, self.formats
        enc = self.ffcv_encoding
        settings = DecodeSettings(opts.resize,
                                  keep_pixels="memory" in fmts or ("ffcv" in fmts and enc == "raw"),
                                  want_jpeg="dali" in fmts, jpeg_quality=opts.jpeg_quality,
                                  ffcv_jpg="ffcv" in fmts and enc == "jpg")
        work_per_image = opts.resize or settings.want_jpeg or settings.ffcv_jpg
        pool = self.pool if sp.arrays is None or work_per_image else None  # CIFAR pixels as is
        start, n = self.prog.next_index, len(sp)
        chunksize = max(1, min(DECODE_CHUNK, (n - start) // (opts.workers * 4)))
        results = parallel_map(partial(decode_job, settings=settings), _jobs(self.tree, sp, start),
                               opts.workers, pool, chunksize, window=4 * opts.workers * DECODE_CHUNK)
        bar = tqdm(total=n, initial=start, desc=f"convert {self.split}", unit="img",
                   disable=not opts.progress, mininterval=0.5, dynamic_ncols=True)
        t = time.perf_counter()
        try:
            for r in results:
                bar.update(1)
                c = self.chunk
                c.next_index = r.index + 1
                if r.error is not None:
                    if not opts.skip_bad:
                        raise BadImage(f"{self.name(r.index)}: {r.error}; fix or delete it, or "
                                       f"pass --skip-bad")
                    c.skipped.append({"path": self.name(r.index), "reason": r.error})
                    continue
                self._check_shape(r.index, r.shape)
                label = int(sp.labels[r.index])
                self.writers.add(r, label)
                if c.first is None and self.prog.first is None:
                    c.first = r.index
                c.labels.append(label)
                c.shapes.add(r.shape)
                c.stats += r.stats
                c.passthrough += r.passthrough
                self._in_samples += time.perf_counter() - t
                yield r.jpeg, label
                t = time.perf_counter()
                if len(c.labels) == opts.samples_per_shard:
                    self._checkpoint()
            self._in_samples += time.perf_counter() - t
        finally:
            bar.close()

    def _check_shape(self, index: int, shape: tuple) -> None:
        """The memory format needs one image size; the first kept image sets it."""
        if self.shape is None or "memory" not in self.formats:
            self.shape = self.shape or shape
            return
        if shape != self.shape:
            first = self.prog.first if self.prog.first is not None else self.chunk.first
            h0, w0 = self.shape[:2]
            raise UserError(f"{self.name(index)}: image is {shape[1]}x{shape[0]} but "
                            f"{self.name(first)} is {w0}x{h0}; the memory format needs one "
                            f"size: pass --resize SIDE (or leave memory out of --formats)")

    def _checkpoint(self) -> None:
        """The chunk's bytes on disk (fsync), then its record: the chunk is finished."""
        rec = self.chunk.to_json(self.writers.checkpoint())
        self.work.save_record(self.split, rec)
        self.prog.absorb(rec)
        self.chunk = ChunkRecord(self.prog.chunks, self.prog.next_index)


def _mean_std(progress: dict[str, SplitProgress]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] over every pixel of train (all splits if there is none)."""
    parts = [progress["train"]] if "train" in progress else list(progress.values())
    s = sum(p.stats for p in parts).astype(np.float64)  # exact: integer sums below 2**53
    n = s[6]
    mean = s[0:3] / n
    var = np.maximum(s[3:6] / n - mean * mean, 0.0)
    return [float(x) for x in mean / 255.0], [float(x) for x in np.sqrt(var) / 255.0]


def _publish(work: WorkDir, final: Path, manifest: Manifest) -> None:
    """manifest.json last, then the work dir becomes OUT/NAME (replacing an old one). A stop
    signal arriving meanwhile takes effect once OUT/NAME is complete."""
    with stop_signals_held():
        save_manifest(work.path, manifest)
        work.drop_state()
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(work.path, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work.path, final)


def _failed(work: WorkDir, e: BaseException) -> BaseException | None:
    """A failed run's work dir: kept when it holds finished chunks that --resume can continue
    (an interrupt, a crash, a bad image), removed otherwise (any other bad input). The
    exception to raise instead of ``e`` (naming the kept directory), or None to re-raise ``e``."""
    keep = isinstance(e, BadImage) or not isinstance(e, UserError)
    k = work.finished_chunks() if keep and work.path.exists() else 0
    if not k:
        work.remove()
        return None
    kept = f"{k} finished chunk{'s' * (k != 1)} kept in {work.path}"
    if isinstance(e, BadImage):
        return BadImage(f"{e} (--skip-bad --resume continues from the {kept})")
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"the {kept}; rerun with --resume to continue")
    if hasattr(e, "add_note"):  # Python >= 3.11: shown under the traceback
        e.add_note(f"convert: the {kept}; rerun with --resume to continue")
    return None


def convert(source: Path | str, opts: ConvertOptions) -> ConvertResult:
    """Convert SOURCE into ``opts.out/opts.name``; returns the manifest and the timings.

    Everything is written into a temp directory inside ``opts.out`` that is renamed to
    ``opts.name`` only once complete (manifest included): a failed or interrupted run leaves
    nothing that looks like a dataset. Images are streamed to every format as they are
    decoded (memory stays bounded); a run stopped by a signal or a crash keeps its finished
    chunks, which ``opts.resume`` continues.
    """
    t0 = time.perf_counter()
    _check_options(opts)
    out = Path(opts.out)
    final = out / opts.name
    if (final.exists() or final.is_symlink()) and not opts.overwrite:
        raise UserError(f"{final}: already exists; pass --overwrite to replace it")
    formats = tuple(f for f in FORMATS if f in opts.formats)
    seconds = {k: 0.0 for k in ("plan", "decode", *FORMATS, "checksums")}
    out.mkdir(parents=True, exist_ok=True)

    with open_tree(source, spill_dir=out) as tree:
        plan = plan_dataset(tree)
        if opts.classes is not None:
            plan = restrict_classes(plan, opts.classes, opts.classes_flag)
        seconds["plan"] = time.perf_counter() - t0
        work, notes = prepare_work_dir(out, opts.name, _settings(source, opts, plan, formats),
                                       opts.resume)
        try:
            if "ffcv" in formats:  # the workers encode .beton JPEGs: import before they fork
                from ..beton import import_ffcv
                import_ffcv("--formats ffcv", instead="leave ffcv out of --formats")
            pool = make_pool(opts.workers)
            try:
                enc = _ffcv_encoding(work, opts, plan, tree, pool) if "ffcv" in formats else ""
                progress, resumed = {}, {}
                for split, sp in plan.splits.items():
                    job = _SplitRun(tree, split, sp, work, opts, formats, enc, pool)
                    progress[split] = job.run()
                    resumed[split] = job.resumed
                    for k, v in job.seconds.items():
                        seconds[k] += v
            finally:
                close_pool(pool)

            t = time.perf_counter()
            files = {p.relative_to(work.path).as_posix(): sha256_file(p)
                     for p in sorted(work.path.rglob("*"))
                     if p.is_file() and p.relative_to(work.path).parts[0] != STATE_DIR}
            seconds["checksums"] = time.perf_counter() - t
            mean, std = _mean_std(progress)
            splits = {}
            for split, p in progress.items():
                shape = [int(x) for x in next(iter(p.shapes))] if len(p.shapes) == 1 else None
                counts = np.bincount(p.label_array(), minlength=len(plan.classes))
                splits[split] = SplitInfo(p.kept, shape, [int(c) for c in counts])
            manifest = Manifest(
                name=opts.name,
                source=opts.source_label or str(Path(source).resolve()),
                classes=list(plan.classes), splits=splits, mean=mean, std=std,
                formats=list(formats), files=files,
                skipped=[s for p in progress.values() for s in p.skipped],
                ffcv_encoding=enc, jpeg_quality=opts.jpeg_quality,
                tool_version=TOOL_VERSION, source_format=plan.kind, resize=opts.resize)
            _publish(work, final, manifest)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and (final / MANIFEST_NAME).is_file() \
                    and not work.path.exists():  # a stop held back by _publish: it is done
                raise Interrupted(f"{final} was complete before the stop") from None
            instead = _failed(work, e)
            if instead is not None:
                raise instead from None
            raise
    seconds["total"] = time.perf_counter() - t0
    images = sum(p.kept for p in progress.values())
    return ConvertResult(final, manifest, seconds, images,
                         {s: p.passthrough for s, p in progress.items()}, plan.notes + notes,
                         decoded=images - sum(resumed.values()), resumed=resumed)
