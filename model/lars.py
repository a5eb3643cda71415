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

The update is tensor code over all parameters at once: one ``torch._foreach_norm`` per group
gives every norm, the per-parameter scale and decay are (P,) tensors (never read on the host),
and the momentum and parameter updates run as one ``torch._foreach_*`` call each over the
parameters of every group that shares (lr, momentum, nesterov) — all of them in training.
No host syncs. ``step(lr=t)`` takes the learning rate as a 0-dim tensor on the device, so a
compiled update or a captured CUDA graph reads the new value each step without recompiling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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


def _per_tensor(values: Tensor, like: list[Tensor]) -> list[Tensor]:
    """(P,) values -> P 0-dim tensors in the dtypes of ``like`` (one unbind; a cast only where
    some tensor's dtype differs from the values')."""
    if all(t.dtype == values.dtype for t in like):
        return list(values.unbind(0))
    return [v.to(t.dtype) for v, t in zip(values.unbind(0), like)]


def lars_scaled_steps(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor,
                      weight_decay: float, eta: float, eps: float, clip: bool) -> list[Tensor]:
    """g' = (g + wd * w) * scale for a list of LARS-adapted parameters (formula above):
    norms by one foreach call, scale and decay as (P,) tensors; new tensors (grads untouched)."""
    p_norm = torch.stack(torch._foreach_norm(params))                   # (P,)
    g_norm = torch.stack(torch._foreach_norm(grads))                    # (P,)
    local_lr = eta * p_norm / (g_norm + weight_decay * p_norm + eps)    # (P,)
    scale = torch.clamp(local_lr / lr, max=1.0) if clip else local_lr   # (P,)
    ok = (p_norm > 0) & (g_norm > 0)
    scale = torch.where(ok, scale, 1.0)                                 # (P,)
    decay = torch.where(ok, scale * weight_decay, 0.0)                  # (P,)
    steps = torch._foreach_mul(grads, _per_tensor(scale, grads))        # g * scale
    torch._foreach_addcmul_(steps, params, _per_tensor(decay, params))  # + w * wd * scale
    return steps


def sgd_momentum_update(params: list[Tensor], steps: list[Tensor], bufs: list[Tensor], *,
                        lr: float | Tensor, momentum: float, nesterov: bool) -> None:
    """buf <- momentum * buf + g';  w <- w - lr * (g' + momentum * buf | buf), in place on
    ``params`` and ``bufs``; ``steps`` (which may be the gradients themselves) is left as it
    is. ``lr``: a float, or a 0-dim tensor on the parameters' device."""
    fresh = False  # steps is a list this function allocated (free to overwrite)
    if momentum:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, steps)
        if nesterov:
            steps, fresh = torch._foreach_add(steps, bufs, alpha=momentum), True
        else:
            steps = bufs
    if isinstance(lr, Tensor):
        if fresh:
            torch._foreach_mul_(steps, lr)
        else:
            steps = torch._foreach_mul(steps, lr)
        torch._foreach_sub_(params, steps)
    else:
        torch._foreach_add_(params, steps, alpha=-lr)


class LARS(torch.optim.Optimizer):
    """LARS(params, lr, momentum=0.9, weight_decay=1e-4, eta=0.005, nesterov=True, clip=True).

    Group options: lr, momentum, weight_decay, eta, nesterov, clip, eps, lars_exclude.
    ``step(lr=...)`` overrides every group's lr for that step (a float or a 0-dim tensor).
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
    def init_state(self) -> None:
        """Create every momentum buffer (zeros) now rather than at the first step: the first
        update is the same (0 * momentum + g' = g'), and the state then has fixed tensors,
        which a captured CUDA graph needs."""
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)

    def _momentum_buffers(self, params: list[Tensor]) -> list[Tensor]:
        if any("momentum_buffer" not in self.state[p] for p in params):
            self.init_state()
        return [self.state[p]["momentum_buffer"] for p in params]

    @torch.no_grad()
    def step(self, closure=None, *, lr: float | Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # groups sharing (lr, momentum, nesterov) take one foreach update together
        buckets: dict[tuple, dict] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            g_lr = group["lr"] if lr is None else lr
            wd, mom = group["weight_decay"], group["momentum"]
            if group["lars_exclude"]:
                steps = torch._foreach_add(grads, params, alpha=wd) if wd else grads
            else:
                steps = lars_scaled_steps(params, grads, lr=g_lr, weight_decay=wd,
                                          eta=group["eta"], eps=group["eps"], clip=group["clip"])
            key = (id(g_lr) if isinstance(g_lr, Tensor) else g_lr, mom, bool(group["nesterov"]))
            b = buckets.setdefault(key, {"lr": g_lr, "params": [], "steps": [], "bufs": []})
            b["params"] += params
            b["steps"] += steps
            if mom:
                b["bufs"] += self._momentum_buffers(params)
        for (_, mom, nesterov), b in buckets.items():
            sgd_momentum_update(b["params"], b["steps"], b["bufs"], lr=b["lr"], momentum=mom,
                                nesterov=nesterov)
        return loss
