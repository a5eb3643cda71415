"""The training monitor: kNN and linear top-1 of the current encoder every K steps, embedded
exactly as probe.py embeds (:func:`emp_ssl.embedding.embed`, :mod:`emp_ssl.protocol`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.patches import AugmentParams
from pipeline.sources.memory import load_memory_arrays

from .classifiers import knn_top1, train_linear_probe
from .embedding import embed, images_per_call, split_rows
from .protocol import PROBE


@dataclass
class MonitorConfig:
    """The accuracy monitor (off unless ``every`` > 0): kNN and linear top-1 of the current
    encoder on a fixed set of M train and M test images, each embedded as probe.py does (the
    mean of ``feature`` features over ``patches`` augmented patches from a seeded generator).
    Suggested: ``every`` 0.5 (two evaluations per epoch)."""

    every: float = 0.0  # 0 = off; >= 1: every this many steps; in (0, 1): this fraction of an epoch
    images: int = 1000  # M per split: the first M of a seeded shuffle (probe.py --max-images M)
    patches: int = 8  # patches per image; feature = mean over them (probe.py --num-patches)
    feature: str = PROBE.feature  # pre_projector | backbone (probe.py --feature)
    eval_mode: str = PROBE.eval_mode  # augmented = the run's training augmentations | crops
    epochs: int = 20  # linear classifier epochs on the cached features (probe.py --probe-epochs)
    knn_k: int = PROBE.knn_k
    knn_temperature: float = PROBE.knn_temperature
    seed: int = PROBE.seed  # the monitor set, its patches and the classifier's init (probe.py --seed)
    stop_at: float = 0.0  # > 0: end the run (with a checkpoint) once stop_metric reaches it
    stop_metric: str = "linear"  # linear | knn


class Monitor:
    """kNN and linear top-1 of the encoder on a fixed monitor set, every ``every`` steps.

    The set: the first M rows of a seeded shuffle of the train split and of the test split
    (``probe.py --max-images M --seed S`` embeds the same rows), held on the device as uint8.
    Each evaluation calls :func:`embed` as probe.py does, with a generator seeded afresh, so every
    evaluation sees the same patches, and at probe.py's settings they are the probe's patches.
    On those features, on the device: a weighted kNN (k, T as probe.py) and probe.py's linear
    classifier for ``epochs`` epochs, final-epoch test top-1.

    Cost per evaluation: 2 M x patches encoder forward passes (no backward) plus
    epochs x ceil(M / 100) linear SGD steps. BatchNorm runs on its running statistics (eval
    mode) and the model goes back to train mode after. Every random draw comes from the
    monitor's own generators, so training with the monitor equals training without it.
    """

    def __init__(self, cfg: MonitorConfig, *, data_path, manifest, patch_size: int, out_size: int,
                 augment: AugmentParams, device: torch.device, amp: str, steps_per_epoch: int):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.every = int(cfg.every) if cfg.every >= 1 else max(1, round(cfg.every * steps_per_epoch))
        self.geometry = dict(num_patches=cfg.patches, patch_size=patch_size, out_size=out_size,
                             mean=manifest.mean, std=manifest.std, eval_mode=cfg.eval_mode,
                             augment=augment if cfg.eval_mode == "augmented" else None)
        self.num_classes = manifest.num_classes
        self.batch = images_per_call(0, cfg.patches, out_size, device, amp)  # probe.py's default
        self.sets = {}  # split -> (uint8 (M, H, W, 3), int64 (M,)) on the device
        for split in ("train", "test" if "test" in manifest.splits else "val"):
            try:
                images, labels = load_memory_arrays(data_path, split)
            except UserError as e:
                raise UserError(f"--monitor.every: the monitor reads the memory format: {e}") from None
            rows = split_rows(labels, split, num_classes=manifest.num_classes, batch_size=self.batch,
                              seed=cfg.seed, max_images=cfg.images)  # (M,)
            self.sets[split] = (torch.from_numpy(np.ascontiguousarray(images[rows])).to(device),
                                torch.from_numpy(labels[rows]).to(device))
        self.counts = {split: len(v[1]) for split, v in self.sets.items()}

    def due(self, step: int, total_steps: int) -> bool:
        """After ``step`` steps: every ``every`` steps, and at the end of the schedule."""
        return step % self.every == 0 or step == total_steps

    def features(self, model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """split -> (float32 (M, d), int64 (M,)) on the device, the model in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        try:
            return {split: (embed(images, model, feature=self.cfg.feature, seed=self.cfg.seed,
                                  split=split, batch_size=self.batch, amp=self.amp,
                                  device=self.device, **self.geometry), labels)
                    for split, (images, labels) in self.sets.items()}
        finally:
            model.train(was_training)

    def evaluate(self, model: torch.nn.Module) -> dict:
        """{"knn_top1", "linear_top1"} (fractions) of ``model`` on the monitor set, and the
        seconds its features and its two classifiers took ("features_s", "heads_s")."""
        c = self.cfg
        t0 = time.perf_counter()
        (train_x, train_y), (test_x, test_y) = self.features(model).values()  # on the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # features_s is the features' time
        t1 = time.perf_counter()
        knn = knn_top1(train_x, train_y, test_x, test_y, num_classes=self.num_classes,
                       k=c.knn_k, temperature=c.knn_temperature)
        lin = train_linear_probe(train_x, train_y, test_x, test_y, num_classes=self.num_classes,
                                 epochs=c.epochs, seed=c.seed, device=self.device, progress=False)
        return {"knn_top1": knn, "linear_top1": lin["final_top1"], "features_s": t1 - t0,
                "heads_s": time.perf_counter() - t1}
