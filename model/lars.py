"""LARS as used by the EMP-SSL reference (a LARS wrapper over SGD, nesterov momentum).

For every parameter w with gradient g in a group that is not ``lars_exclude``:

    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)
    scale    = min(local_lr / lr, 1)      if clip  else  local_lr
    g'       = (g + wd * w) * scale       (if ||w|| == 0 or ||g|| == 0: g' = g, no decay)

then SGD with momentum for every parameter (dampening 0, PyTorch's convention):

    buf <- momentum * buf + g'            (buf starts at 0, so the first buf is g')
    step = g' + momentum * buf  if nesterov  else  buf
    w   <- w - lr * step

Excluded groups (biases and norm weights, see ``lars_param_groups``) skip the LARS scaling;
they get plain momentum SGD with their own weight_decay (0 from ``lars_param_groups``).
All arithmetic is done with ``torch._foreach_*`` ops and tensor-valued norms: no host syncs.
"""
from __future__ import annotations

import torch
from torch import nn


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters: ndim > 1 (LARS-adapted, default weight decay) and ndim <= 1
    (biases, norm weights: ``{"lars_exclude": True, "weight_decay": 0.0}``)."""
    adapted, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else adapted).append(p)
    groups = []
    if adapted:
        groups.append({"params": adapted, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "lars_exclude": True, "weight_decay": 0.0})
    return groups


class LARS(torch.optim.Optimizer):
    """LARS(params, lr, momentum=0.9, weight_decay=1e-4, eta=0.005, nesterov=True, clip=True).

    Group options: lr, momentum, weight_decay, eta, nesterov, clip, eps, lars_exclude.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 0.005, nesterov: bool = True, clip: bool = True, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"need momentum >= 0, weight_decay >= 0, eta > 0; got "
                             f"{momentum}, {weight_decay}, {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        nesterov=nesterov, clip=clip, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]

            if group["lars_exclude"]:
                steps = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
            else:
                p_norm = torch.stack(torch._foreach_norm(params))        # (P,)
                g_norm = torch.stack(torch._foreach_norm(grads))         # (P,)
                local_lr = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                scale = torch.clamp(local_lr / lr, max=1.0) if group["clip"] else local_lr
                ok = (p_norm > 0) & (g_norm > 0)
                scale = torch.where(ok, scale, torch.ones_like(scale))   # (P,)
                decay = torch.where(ok, scale * wd, torch.zeros_like(scale))  # (P,)
                scale_l = [s.to(g.dtype) for s, g in zip(scale.unbind(0), grads)]
                decay_l = [s.to(p.dtype) for s, p in zip(decay.unbind(0), params)]
                steps = torch._foreach_mul(grads, scale_l)               # g * scale
                torch._foreach_add_(steps, torch._foreach_mul(params, decay_l))  # + w * wd * scale

            if mom:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, steps)
                if group["nesterov"]:
                    steps = torch._foreach_add(steps, bufs, alpha=mom)  # never writes into .grad
                else:
                    steps = bufs
            torch._foreach_add_(params, steps, alpha=-lr)
        return loss
