"""EMP-SSL trainer: decode once, n augmented patches per image on the device, fused TCR loss, LARS.

    python train.py --config configs/cifar10_n20_e1.yaml --data data/cifar10 --out runs/c10
    python train.py --config configs/demo.yaml --out runs/demo --epochs 0.5 --optim.lr=0.2
    python train.py --config configs/demo.yaml --print-config          # the resolved config
    torchrun --nproc_per_node 2 train.py --config ... --out ...         # DDP, global batch kept

Objective (Tong et al. 2023): for projections z_ij (patch i of image j, L2-normalized),
    loss = -1/n sum_i R(Z_i) - lam * 1/n sum_i mean_j cos(z_ij, mean_i' z_i'j)
    R(Z) = 1/2 logdet(I + d/(b*eps) Z^T Z),  eps = 0.2 (the reference code's eps, i.e. eps^2
    of the paper's formula), lam = 200.
LARS (eta 0.005, momentum 0.9 nesterov, wd 1e-4, biases/norm weights excluded), lr 0.3 with a
per-step cosine to 0 (optional linear warm-up), batch 100 images x n patches.

Writes RUN/config.yaml (resolved config + git commit; usable as --config), RUN/metrics.jsonl,
RUN/tb/ (TensorBoard) and RUN/ckpt.pt: every --save-every (default 10 minutes), at each epoch's
end, at the end and on SIGINT/SIGTERM; atomic, so a kill (even SIGKILL) loses at most the time
since the last one. --resume continues from RUN/ckpt.pt exactly: the batch order is a function of
(seed, epoch) and each step's patches of (seed, step, rank), so a resumed CPU run equals an
uninterrupted one bit for bit.

The monitor (--monitor.every K: steps, or a fraction of an epoch) scores the encoder as probe.py
does on a fixed subset (emp_ssl/monitor.py); --stop-at ACC ends the run when it reaches ACC.
Configuration: emp_ssl/config.py; logs and summary: emp_ssl/telemetry.py.
"""
from __future__ import annotations

import time

_T_IMPORTS = time.perf_counter()  # the start of this module's imports (torch's included)

import math
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from emp_ssl.checkpoints import CheckpointSaver, save_checkpoint
from emp_ssl.config import (RESUME_FREE, DataConfig, LossConfig, MonitorConfig,  # noqa: F401
                            OptimConfig, RunConfig, TrainConfig, as_plain, parse_save_every)
from emp_ssl.config import parse_args as parse_config, preset_name
from emp_ssl.monitor import Monitor
from emp_ssl.runtime import git_commit, init_distributed, resolve_amp, resolve_device
from emp_ssl.telemetry import (NonFiniteLoss, RunLog, Spans, process_age_s, startup_breakdown,
                               summary_line, truncate_metrics)
from model.checkpoint import CheckpointError, load_checkpoint
from model.encoder import build_encoder
from model.flops import peak_tflops, step_flops_per_patch
from model.lars import LARS, lars_param_groups
from model.step import EmpStep, configure_cuda
from pipeline.errors import UserError
from pipeline.formats import load_manifest, require_split, write_bytes_atomic
from pipeline.patches import make_patches
from pipeline.sources import build_source, choose_source
from pipeline.sources.base import SourceOptions

IMPORT_S = time.perf_counter() - _T_IMPORTS  # seconds this module's imports took


DESCRIPTION = __doc__.split("\n\n")[0]


def parse_args(argv=None):
    """(TrainConfig, resume: bool) from the command line (emp_ssl/config.py)."""
    cfg, args = parse_config(argv, description=DESCRIPTION)
    return cfg, args.resume


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * t))


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool, preset: str | None = None):
        self.cfg = cfg
        self.preset = preset  # the recipe's name, recorded in config.yaml and ckpt.pt
        self.spans = spans = Spans()  # where the start-up time goes (summary: "startup_s")
        with spans("setup"):
            self._setup(cfg, resume)
        with spans("data"):
            self._build_source(cfg)
        with spans("model"):
            self._build_model(cfg, resume)
        with spans("flop_count"):  # once: the model FLOPs per patch of this step (meta device)
            self.flops_per_patch = step_flops_per_patch(
                cfg.model, num_patches=cfg.data.num_patches, batch=self.local_batch,
                out_size=cfg.data.out_size, lam=cfg.loss.lam, eps=cfg.loss.eps)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_tflops(name, self.amp, cfg.run.peak_tflops)  # None: no MFU (CPU, unknown GPU)
        self.saver = CheckpointSaver(*parse_save_every(cfg.run.save_every))
        self._stop_signal = None
        self.time_to_first_step: float | None = None
        self.log: RunLog | None = None

    # -- set-up
    def _setup(self, cfg: TrainConfig, resume: bool) -> None:
        self.rank, self.world, local = init_distributed()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.run.device, local)
        self._patch_gen = torch.Generator(device=self.device)  # re-seeded every step
        self.out = Path(cfg.run.out)
        ckpt_path = self.out / "ckpt.pt"
        if ckpt_path.exists() and not resume:
            raise UserError(f"--out {self.out}: already holds a run (ckpt.pt); pass --resume to "
                            f"continue it, or choose a new --out")
        if resume and not ckpt_path.exists():
            raise UserError(f"--resume: {ckpt_path} does not exist; start without --resume")
        self.amp = resolve_amp(cfg.run.amp, self.device, "--run.amp")
        if self.device.type == "cuda":
            configure_cuda()
        if cfg.run.cuda_graphs and self.world > 1:
            raise UserError(f"--run.cuda_graphs: captures the one-process step; not under DDP "
                            f"({self.world} ranks)")
        self._resume_from = ckpt_path if resume else None

    def _build_source(self, cfg: TrainConfig) -> None:
        d = cfg.data
        self.manifest = load_manifest(d.path)
        info = require_split(self.manifest, d.path, "train")
        if info.shape is not None and (info.shape[0] != d.image_size or info.shape[1] != d.image_size):
            raise UserError(f"--data {d.path}: images are {info.shape[0]}x{info.shape[1]} but the preset "
                            f"expects {d.image_size}x{d.image_size} ({d.patch_size}->{d.out_size} patches, "
                            f"{cfg.model.stem} stem); pick the matching --config or re-convert with "
                            f"--resize {d.image_size}")
        if d.batch_size % self.world:
            raise UserError(f"--batch-size {d.batch_size}: not divisible by the {self.world} ranks")
        self.local_batch = d.batch_size // self.world
        self.source_name = choose_source(d.source, d.path, "train", self.device)
        opts = SourceOptions(batch_size=self.local_batch, device=self.device, shuffle=True,
                             drop_last=True, seed=cfg.run.seed, rank=self.rank, world_size=self.world,
                             num_workers=d.num_workers)
        extra = {}
        if self.source_name == "reference":
            extra = dict(num_patches=d.num_patches, patch_size=d.patch_size, out_size=d.out_size,
                         mean=self.manifest.mean, std=self.manifest.std, augment=cfg.augment)
        self.source = build_source(self.source_name, d.path, "train", opts, **extra)
        self.steps_per_epoch = len(self.source)
        if d.max_images:
            self.steps_per_epoch = min(self.steps_per_epoch, max(1, d.max_images // d.batch_size))
        if self.steps_per_epoch < 1:
            raise UserError(f"--data {d.path}: fewer train images ({info.count}) than one batch "
                            f"({d.batch_size}); lower --batch-size")
        self.total_steps = max(1, round(cfg.optim.epochs * self.steps_per_epoch))
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)

    def _build_model(self, cfg: TrainConfig, resume: bool) -> None:
        torch.manual_seed(cfg.run.seed)
        self.model = build_encoder(cfg.model).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = LARS(lars_param_groups(self.model), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                        weight_decay=cfg.optim.weight_decay, eta=cfg.optim.eta)
        self.monitor = None
        if cfg.monitor.every:
            d = cfg.data
            self.monitor = Monitor(cfg.monitor, data_path=d.path, manifest=self.manifest,
                                   patch_size=d.patch_size, out_size=d.out_size, augment=cfg.augment,
                                   device=self.device, amp=self.amp, steps_per_epoch=self.steps_per_epoch)
        self.step = 0
        self.train_s_before = 0.0  # training seconds of earlier invocations of this run (resume)
        if resume:
            self._restore(self._resume_from)
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        graphs = cfg.run.cuda_graphs
        if graphs and self.device.type != "cuda" and self.is_main:
            print("train: note: --run.cuda_graphs without CUDA: the same static step runs "
                  "uncaptured", file=sys.stderr)
        self.step_fn = EmpStep(net, self.model, self.opt, lam=cfg.loss.lam, eps=cfg.loss.eps,
                               amp=self.amp, patch_chunk=0 if graphs else cfg.run.patch_chunk,
                               ddp=net if self.world > 1 else None, compile=cfg.run.compile,
                               cuda_graphs=graphs)

    # -- the method: one step
    def make_patches(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (n, B, 3, S, S): n augmented patches per image, from a generator
        seeded by (seed, step, rank)."""
        d = self.cfg.data
        gen = self._patch_gen.manual_seed((self.cfg.run.seed * 1_000_003 + step) * self.world + self.rank)
        return make_patches(images, num_patches=d.num_patches, patch_size=d.patch_size,
                            out_size=d.out_size, mean=self.manifest.mean, std=self.manifest.std,
                            generator=gen, augment=self.cfg.augment)

    def train_step(self, batch, step: int):
        """Patches -> forward -> TCR + invariance loss -> backward -> LARS update.
        Returns (loss, tcr, inv, lr); the three are device tensors (no host sync)."""
        images, _ = batch
        patches = images if self.source.yields_patches else self.make_patches(images, step)
        lr = cosine_lr(step, self.total_steps, self.cfg.optim.lr, self.warmup_steps)
        loss, tcr, inv = self.step_fn(patches, lr)
        return loss, tcr, inv, lr

    # -- the loop
    def fit(self) -> int:
        with self.spans("run_dir"):  # git commit, config.yaml, TensorBoard writer
            self._open_run_dir()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.log = RunLog(self.out, is_main=self.is_main, tensorboard=self.cfg.run.tensorboard,
                          total_steps=self.total_steps, start=self.step,
                          batch_size=self.cfg.data.batch_size, num_patches=self.cfg.data.num_patches,
                          device=self.device, world=self.world, flops_per_patch=self.flops_per_patch,
                          peak=self.peak, train_s_before=self.train_s_before)
        try:
            return self.loop(self.log)
        except NonFiniteLoss as e:
            rec = e.args[0]
            print(f"\ntrain: error: non-finite loss ({rec['loss']}) at step {rec['step']}; last good "
                  f"checkpoint: {self.last_good or 'none (no checkpoint was written yet)'}; try a lower "
                  f"--optim.lr, --run.amp fp32, or check the data with `python "
                  f"tools/convert_datasets.py --verify {self.cfg.data.path}`", file=sys.stderr)
            return 3
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.log.close()
            self.source.close()

    def loop(self, log: RunLog) -> int:
        start = self.step
        end = min(self.total_steps, start + self.cfg.run.max_steps) if self.cfg.run.max_steps else self.total_steps
        self.model.train()
        it, t_start, stopped = None, time.perf_counter(), None
        for step in range(start, end):
            epoch, b = divmod(step, self.steps_per_epoch)
            if it is None or b == 0:
                self.source.set_epoch(epoch, b)
                it = iter(self.source)
            t0 = time.perf_counter()
            batch = next(it)                                    # uint8 images on the device
            log.data_wait(time.perf_counter() - t0)
            loss, tcr, inv, lr = self.train_step(batch, step)   # patches -> loss -> LARS
            if step == start:
                self._first_step_done(t0)
            self.step = step + 1
            log.step_done(self.step, epoch, (loss, tcr, inv), lr,
                          log_now=self.step % self.cfg.run.log_every == 0 or self.step == end)
            if self.monitor is not None and self.monitor.due(self.step, self.total_steps):
                stopped = self.evaluate(log)
                if stopped is not None:
                    break
            if self.step < end and (self.step % self.steps_per_epoch == 0 or self.saver.due(self.step)):
                with self.spans("checkpoints"):
                    self.save()
            if self._stop_signal is not None:
                path = self.save()
                log.note(f"train: stopped by signal {self._stop_signal} at step {self.step}; "
                         f"checkpoint {path}; continue with --resume")
                return 128 + self._stop_signal
        with self.spans("final_checkpoint"):
            if self.save(final=True) is None and self.is_main:
                return 1
        if self.is_main and self.step > start:
            self._summary(self.step - start, time.perf_counter() - t_start, stopped)
        return 0

    # -- monitor and --stop-at
    def evaluate(self, log: RunLog) -> dict | None:
        """Score the encoder now (rank 0; the time is kept out of the training clock); the
        --stop-at record when it reached the target (every rank learns it), else None."""
        rec = None
        if self.is_main:
            train_s = log.train_seconds()
            t0 = time.perf_counter()
            with log.paused():
                acc = self.monitor.evaluate(self.model)  # reads back to the host: synchronized
            c = self.cfg.monitor
            rec = {"monitor": True, "step": self.step, "epoch": self.step / self.steps_per_epoch,
                   "train_s": train_s, **acc, "monitor_s": time.perf_counter() - t0,
                   "train_images": self.monitor.counts["train"],
                   "test_images": list(self.monitor.counts.values())[1], "patches": c.patches,
                   "feature": c.feature, "time": time.time()}
            log.write(rec, ("knn_top1", "linear_top1", "monitor_s"), prefix="monitor")
            log.show(knn=f"{100 * rec['knn_top1']:.1f}%", lin=f"{100 * rec['linear_top1']:.1f}%")
        log.monitor_evals += 1
        return self._stop_reached(rec, log)

    def _stop_reached(self, rec: dict | None, log: RunLog) -> dict | None:
        c = self.cfg.monitor
        if not c.stop_at:
            return None
        key = f"{c.stop_metric}_top1"
        hit = rec is not None and rec[key] >= c.stop_at
        if self.world > 1:
            flag = torch.tensor([int(hit)], device=self.device)
            dist.broadcast(flag, 0)
            hit = bool(flag.item())
        if not hit:
            return None
        stop = {"stop": True, "stop_at": c.stop_at, "metric": c.stop_metric, "reached": True,
                "value": rec[key] if rec else None, "step": self.step,
                "epoch": self.step / self.steps_per_epoch, "train_s": rec["train_s"] if rec else None}
        log.write(stop)
        return stop

    # -- checkpoints
    def _open_run_dir(self) -> None:
        self.commit = git_commit()
        self.last_good = self.out / "ckpt.pt" if (self.out / "ckpt.pt").exists() else None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".ckpt.pt.*.tmp"):  # a write killed half-way (SIGKILL)
                stale.unlink(missing_ok=True)
            if self._resume_from is not None:  # records written after the checkpoint (a kill)
                truncate_metrics(self.out / "metrics.jsonl", self.step)
            else:  # a run killed before its first checkpoint left records: this one starts over
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            resolved = {**as_plain(self.cfg), "preset": self.preset, "git_commit": self.commit,
                        "source_resolved": self.source_name, "device": str(self.device),
                        "world_size": self.world}
            write_bytes_atomic(self.out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())

    def _payload(self) -> dict:
        d = self.cfg.data
        return {
            "model": self.model.state_dict(),
            "encoder": self.cfg.model.to_dict(),
            "patch": {"patch_size": d.patch_size, "out_size": d.out_size},
            "data": {"name": self.manifest.name, "classes": list(self.manifest.classes),
                     "mean": list(self.manifest.mean), "std": list(self.manifest.std),
                     "image_shape": self.manifest.splits["train"].shape},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epoch": self.step // self.steps_per_epoch,
            "rng": {"torch": torch.get_rng_state()},
            "train_s": self.train_seconds(),
            "config": asdict(self.cfg),
            "preset": self.preset,
            "git_commit": self.commit,
        }

    def save(self, final: bool = False) -> Path | None:
        """Write RUN/ckpt.pt (rank 0; atomic). A failed write (a full disk) leaves the previous
        checkpoint as it was, says so in one line and in metrics.jsonl, and returns None."""
        self.saver.saved()
        if not self.is_main:
            return None
        path = self.out / "ckpt.pt"
        try:
            save_checkpoint(path, self._payload())
        except OSError as e:
            kept = f"{self.last_good} is intact" if self.last_good else "no earlier checkpoint exists"
            msg = (f"train: warning: checkpoint at step {self.step} not written ({e.strerror or e}); "
                   f"{kept}; free space under {self.out} "
                   + ("and run again with --resume to redo the steps after it" if final
                      else "(training continues)"))
            if self.log is not None:
                self.log.note(msg)
                self.log.write({"checkpoint_failed": True, "step": self.step, "error": str(e),
                                "time": time.time()})
            else:
                print(msg, file=sys.stderr)
            return None
        self.last_good = path
        return path

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        saved = as_plain_dict(ckpt.get("config", {}))  # tuples and lists compare equal after this
        mine = as_plain(self.cfg)
        diff = [f"{s}.{k}" for s in mine for k in mine[s]
                if s in saved and k in saved[s] and saved[s][k] != mine[s][k] and (s, k) not in RESUME_FREE]
        if diff:
            raise UserError(f"--resume: the config differs from the run's saved one in {', '.join(diff)}; "
                            f"resume with the same settings or start a new --out")
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.train_s_before = float(ckpt.get("train_s", 0.0))
        torch.set_rng_state(ckpt["rng"]["torch"])

    def train_seconds(self) -> float:
        return self.log.train_seconds() if self.log is not None else self.train_s_before

    def _on_signal(self, signum, frame):  # noqa: ARG002
        self._stop_signal = signum

    # -- telemetry
    def _first_step_done(self, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.spans["first_step"] = time.perf_counter() - t0
        self.time_to_first_step = process_age_s()  # since the process started; None without /proc

    def startup_breakdown(self) -> dict:
        return startup_breakdown(self.spans, IMPORT_S, _T_IMPORTS)

    def _summary(self, steps: int, wall: float, stopped: dict | None) -> None:
        cfg, log = self.cfg, self.log
        extra = {"source": self.source_name, "device": str(self.device), "amp": self.amp,
                 "compile": cfg.run.compile, "cuda_graphs": cfg.run.cuda_graphs,
                 "time_to_first_step_s": self.time_to_first_step,
                 "startup_s": self.startup_breakdown()}
        if self.monitor is not None:
            extra["monitor_cost"] = {"evals": log.monitor_evals, "every_steps": self.monitor.every,
                                     "monitor_s": round(log.monitor_s, 2),
                                     "share_of_wall": log.monitor_s / wall}
        if cfg.monitor.stop_at:
            extra["stop"] = stopped or {"stop_at": cfg.monitor.stop_at, "metric": cfg.monitor.stop_metric,
                                        "reached": False}
        s = log.summary(steps=steps, wall=wall, first_step_s=self.spans.get("first_step", 0.0), extra=extra)
        print(summary_line(s, out=self.out, peak=self.peak))
        if stopped is not None:
            print(f"train: {stopped['metric']} top-1 {100 * stopped['value']:.2f}% >= --stop-at "
                  f"{100 * stopped['stop_at']:.2f}% at step {stopped['step']} (epoch {stopped['epoch']:.3g}) "
                  f"after {stopped['train_s']:.1f}s of training")
        elif cfg.monitor.stop_at and self.step == self.total_steps:
            print(f"train: the monitor's {cfg.monitor.stop_metric} top-1 never reached --stop-at "
                  f"{100 * cfg.monitor.stop_at:.2f}%")


def as_plain_dict(obj):
    """JSON's view of a saved config: tuples become lists (equal whichever was saved)."""
    import json

    return json.loads(json.dumps(obj))


def main(argv=None) -> int:
    try:
        cfg, args = parse_config(argv, description=DESCRIPTION)
        code = Trainer(cfg, args.resume, preset=preset_name(args.config)).fit()
    except (UserError, CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
