"""One EMP-SSL optimisation step on a patch tensor: encode, fused loss, backward, LARS.

Shared by train.py and benchmarks/train_throughput.py so both measure the same code. It knows
nothing of data sources: it takes patches (n, B, 3, S, S) already on the device.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .loss import emp_ssl_loss


def configure_cuda() -> None:
    """The CUDA backend settings every training step here runs with (train.py and the
    benchmarks): cuDNN autotuning; TF32 for convolutions; full fp32 matmuls. The encoder runs
    in bf16 under autocast, so the fp32 matmuls left are the loss's Gram matrices, where TF32
    costs ~3e-4 relative gradient error."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def bn_frozen_stats(model: nn.Module):
    """BatchNorm in train mode (batch statistics) but running averages left untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """torch.channels_last if the model's 4-D weights are stored channels-last, else
    torch.contiguous_format. Weights whose layout is ambiguous (1x1 kernels, a single input
    channel) are skipped; a model without an unambiguous one counts as contiguous."""
    for p in model.parameters():
        if p.dim() != 4:
            continue
        cl, plain = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
        if cl != plain:
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


class EmpStep:
    """Callable step. ``net`` is what runs forward (maybe DDP-wrapped and/or compiled), ``model``
    the plain module inside it (for BatchNorm handling), ``opt`` the optimizer.

    ``patch_chunk`` K > 0 backprops K patch groups at a time (see :meth:`chunked`).
    Under DDP (``ddp`` given) Z is all-gathered with gradients so the coding rate sees the
    global batch; DDP's gradient averaging then yields exactly d(global loss)/d(params).
    The patches are handed to ``net`` in the memory format of the model's conv weights
    (:func:`model_memory_format`; make_patches' output already has channels-last strides, so a
    channels-last model costs no copy).
    """

    def __init__(self, net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, *,
                 lam: float = 200.0, eps: float = 0.2, amp: str = "fp32", patch_chunk: int = 0,
                 ddp: nn.Module | None = None):
        self.net, self.model, self.opt = net, model, opt
        self.memory_format = model_memory_format(model)
        self.lam, self.eps, self.amp, self.patch_chunk = lam, eps, amp, patch_chunk
        self.ddp = ddp  # the DDP wrapper when training on several ranks, else None

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        n, b = patches.shape[:2]
        x = patches.reshape(n * b, *patches.shape[2:]).contiguous(memory_format=self.memory_format)
        with self.autocast(patches.device.type):
            _, z = self.net(x)  # (n*B, d)
        return z.float().view(n, b, -1)  # (n, B, d)

    def loss(self, z: torch.Tensor):
        # check=False: no host sync; a failed Cholesky gives a NaN loss, which the trainer's
        # throttled non-finite check reports. gather: the coding rate sees the global batch.
        return emp_ssl_loss(z, lam=self.lam, eps=self.eps, check=False, gather=self.ddp is not None)

    def chunked(self, patches: torch.Tensor, k: int):
        """Backprop K patch groups at a time, with the gradient of one big step.

        1. Forward every group without grad (in chunks of K, BatchNorm running stats untouched)
           to get Z (n, B, d). 2. The loss and dL/dZ on that detached Z (cheap). 3. Re-run the
        encoder K groups at a time with grad and backpropagate dL/dZ_chunk; gradients add up.
        Memory holds one chunk's activations. BatchNorm normalises each chunk with that chunk's
        batch statistics (in both passes, so 1 and 3 agree exactly), and the running averages
        are updated once per chunk; the unchunked step uses the statistics of all n*B patches.
        So the two gradients are equal with BatchNorm in eval mode and differ only through
        those batch statistics in train mode.
        """
        n = patches.shape[0]
        with torch.no_grad(), bn_frozen_stats(self.model):
            z = torch.cat([self.encode(patches[i:i + k]) for i in range(0, n, k)])  # (n, B, d)
        z.requires_grad_(True)
        loss, tcr, inv = self.loss(z)
        (gz,) = torch.autograd.grad(loss, z)  # (n, B, d)
        starts = list(range(0, n, k))
        for j, i in enumerate(starts):
            last = j == len(starts) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                self.encode(patches[i:i + k]).backward(gz[i:i + k])
        return loss.detach(), tcr.detach(), inv.detach()

    def __call__(self, patches: torch.Tensor, lr: float):
        """patches (n, B, 3, S, S) -> (loss, tcr, inv) detached tensors; no host sync."""
        k = self.patch_chunk
        if k and k < patches.shape[0]:
            loss, tcr, inv = self.chunked(patches, k)  # detached
        else:
            loss, tcr, inv = self.loss(self.encode(patches))
            loss.backward()
            loss, tcr, inv = loss.detach(), tcr.detach(), inv.detach()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, tcr, inv
