"""Model FLOPs of an EMP-SSL training step, and model-FLOPs utilisation (MFU).

    f = step_flops_per_patch(EncoderConfig(), num_patches=20, batch=100, out_size=32)
    # 3.47e9: forward + backward of encoder and projector, and the fused loss, per patch
    peak = peak_tflops("NVIDIA H100 80GB HBM3", "bf16")   # PeakFlops(989.4, "H100 SXM bf16 dense")
    util = mfu(patches_per_s, f, peak.tflops)             # achieved / peak, a fraction

The FLOPs are counted once by ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the
encoder built on the ``meta`` device (shapes only: no memory, no device work): the matrix
products and convolutions of one step's forward (encoder + projector), the loss (Gram
matrices, the closed-form backward) and the backward. The Cholesky factorisation (n small
k x k matrices, k = min(b, d)) and elementwise work (BatchNorm, ReLU, LARS) are not counted,
which is the usual convention for model FLOPs. Recomputation (``--patch-chunk``'s no-grad
forward) is not counted either: MFU counts the model's work, not the work done.

    achieved TFLOP/s = patches/s * FLOPs per patch / 1e12
    MFU              = achieved TFLOP/s / (peak TFLOP/s per GPU * GPUs)

Peaks are NVIDIA's datasheet figures for dense (not 2:4-sparse) tensor-core math: bf16 for
bf16 autocast; TF32 for the fp32 recipe (its convolutions run in TF32). A large bf16 matrix
product reaches ~80% of the bf16 peak on an H100 (about 790 of 989 TFLOP/s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import EncoderConfig, build_encoder
from .loss import emp_ssl_loss

# (name fragment, label, bf16 dense TFLOP/s, TF32 dense TFLOP/s); the first fragment found in
# the device name wins, so the specific variants come before the plain names
PEAK_TABLE: tuple[tuple[str, str, float, float], ...] = (
    ("H200 NVL", "H200 NVL", 835.5, 417.5),
    ("H200", "H200 SXM", 989.4, 494.7),
    ("H100 NVL", "H100 NVL", 835.5, 417.5),
    ("H100 PCIE", "H100 PCIe", 756.5, 378.0),
    ("H100", "H100 SXM", 989.4, 494.7),
    ("A100", "A100", 312.0, 156.0),
)


@dataclass(frozen=True)
class PeakFlops:
    tflops: float  # per GPU
    source: str  # what the figure is, e.g. "H100 SXM bf16 dense (datasheet)" or "--run.peak_tflops"


def peak_tflops(device_name: str, amp: str, override: float = 0.0) -> PeakFlops | None:
    """The peak one GPU named ``device_name`` reaches in the precision of ``amp`` ("bf16" or
    "fp32"); ``override`` > 0 wins. None when the GPU is not in the table (or a CPU)."""
    if override > 0:
        return PeakFlops(float(override), "--run.peak_tflops")
    name = device_name.upper()
    for fragment, label, bf16, tf32 in PEAK_TABLE:
        if fragment in name:
            kind = "bf16" if amp == "bf16" else "tf32"
            return PeakFlops(bf16 if amp == "bf16" else tf32, f"{label} {kind} dense (datasheet)")
    return None


def step_flops(cfg: EncoderConfig, *, num_patches: int, batch: int, out_size: int,
               lam: float = 200.0, eps: float = 0.2) -> int:
    """FLOPs of one training step on (n, B, 3, S, S) patches: forward of encoder and projector,
    the fused loss, and the backward (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_encoder(cfg).train()
        x = torch.empty(num_patches * batch, 3, out_size, out_size)  # (n*B, 3, S, S)
    with FlopCounterMode(display=False) as counter:
        _, z = model(x)  # (n*B, d)
        loss, _, _ = emp_ssl_loss(z.view(num_patches, batch, -1), lam=lam, eps=eps, check=False)
        loss.backward()
    return int(counter.get_total_flops())


def step_flops_per_patch(cfg: EncoderConfig, *, num_patches: int, batch: int, out_size: int,
                         lam: float = 200.0, eps: float = 0.2) -> float:
    """:func:`step_flops` / (n * B)."""
    total = step_flops(cfg, num_patches=num_patches, batch=batch, out_size=out_size, lam=lam,
                       eps=eps)
    return total / (num_patches * batch)


def achieved_tflops(patches_per_s: float, flops_per_patch: float) -> float:
    return patches_per_s * flops_per_patch / 1e12


def mfu(patches_per_s: float, flops_per_patch: float, peak: float, gpus: int = 1) -> float:
    """Model-FLOPs utilisation: achieved TFLOP/s over ``gpus`` x ``peak`` TFLOP/s (a fraction)."""
    return achieved_tflops(patches_per_s, flops_per_patch) / (peak * gpus)
