"""The EMP-SSL objective, fused over all n patch groups.

z has shape (n, b, d): group i holds patch i of every image in the batch (the paper's Z_i),
each row L2-normalized. The objective is

    loss = -(1/n) sum_i R(Z_i)  -  lam * (1/n) sum_i (1/b) sum_j cos(z_ij, zbar_j)
    R(Z) = 1/2 logdet(I_d + d / (b * eps) * Z^T Z),      zbar_j = (1/n) sum_i z_ij

About eps: the paper writes d / (b * eps^2); the reference code computes d / (b * eps) with
eps = 0.2, i.e. its ``eps`` is the paper's eps^2. This module keeps the reference meaning:
``eps=0.2`` here is paper eps^2 = 0.2.

R is computed for all groups at once on the smaller Gram matrix (Sylvester's identity,
logdet(I_d + c Z^T Z) = logdet(I_b + c Z Z^T)), by a batched fp32 Cholesky factorisation:
logdet = 2 sum log diag L; the backward is closed-form (see ``_GramLogdet``). Everything is
computed in fp32 whatever dtype z arrives in (bf16 -> fp32; fp64 stays fp64 for exact tests).
"""
from __future__ import annotations

import torch
from torch import Tensor


def gather_with_grad(z: Tensor, dim: int = 1) -> Tensor:
    """All-gather z from every rank along ``dim``, keeping gradients; a no-op without DDP.

    Used so that R sees the global batch: every rank computes the same R on the gathered Z;
    the all-gather backward sums the ranks' gradients, and DDP's gradient averaging divides by
    the world size again, so each parameter gets exactly dR/dtheta.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return z
    if torch.distributed.get_world_size() == 1:
        return z
    from torch.distributed import _functional_collectives as funcol

    # traceable all-gather whose backward sums the gradients over ranks (reduce-scatter);
    # all_gather_single_autograd is the newer name (torch >= 2.12) of all_gather_tensor_autograd
    gather = (getattr(funcol, "all_gather_single_autograd", None)
              or funcol.all_gather_tensor_autograd)
    out = gather(z.contiguous(), gather_dim=dim, group=torch.distributed.group.WORLD)
    return funcol.wait_tensor(out)                     # (n, world * b, d) for dim=1


def _at_least_fp32(z: Tensor) -> Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 stay as they are (fp64 for exact tests)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _mask_failed(logdet: Tensor, info: Tensor, check: bool) -> Tensor:
    """NaN where the Cholesky factorisation failed; with check, raise instead (host sync)."""
    logdet = torch.where(info == 0, logdet, torch.full_like(logdet, float("nan")))
    if check:
        bad = ~torch.isfinite(logdet)
        if bool(bad.any()):
            raise torch.linalg.LinAlgError(
                "coding rate: I + c*Gram is not positive definite (or its log-det is not "
                f"finite) for batch entries {bad.nonzero().flatten().tolist()}; cholesky info "
                f"{info.flatten().tolist()[:16]}. z likely holds NaN/Inf or huge values.")
    return logdet


def _cholesky_logdet(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L, log det m, info) of SPD matrices (..., k, k): log det = 2 sum log diag L; info != 0
    where the factorisation failed (the log det there is garbage: see ``_mask_failed``)."""
    chol, info = torch.linalg.cholesky_ex(m)                           # (..., k, k), (...)
    return chol, 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1), info


def logdet_spd(m: Tensor, check: bool = True) -> Tensor:
    """log det of a batch of symmetric positive definite matrices (..., k, k) -> (...), by
    ``torch.linalg.cholesky_ex``: 2 sum log diag L. check: as in ``total_coding_rate``."""
    _, logdet, info = _cholesky_logdet(m)
    return _mask_failed(logdet, info, check)


class _GramLogdet(torch.autograd.Function):
    """logdet(I + c * G) per group with G the smaller Gram matrix of z (n, b, d) -> (n,), info.

    Backward in closed form: d logdet(I_b + c Z Z^T) / dZ = 2c M^-1 Z (b <= d) and
    d logdet(I_d + c Z^T Z) / dZ = 2c Z M^-1 (b > d), with M^-1 from the saved Cholesky
    factor: one batched matmul instead of autograd through the factorisation and both sides
    of the Gram product.
    """

    @staticmethod
    def forward(ctx, z: Tensor, c: float):
        n, b, d = z.shape
        small_b = b <= d
        gram = z @ z.transpose(1, 2) if small_b else z.transpose(1, 2) @ z  # (n, k, k), k = min(b, d)
        k = gram.shape[-1]
        m = torch.eye(k, dtype=z.dtype, device=z.device) + c * gram         # (n, k, k)
        chol, logdet, info = _cholesky_logdet(m)                            # (n, k, k), (n,), (n,)
        ctx.save_for_backward(z, chol)
        ctx.c, ctx.small_b = c, small_b
        ctx.mark_non_differentiable(info)
        return logdet, info

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logdet: Tensor, g_info):
        z, chol = ctx.saved_tensors
        m_inv = torch.cholesky_inverse(chol)                                # (n, k, k)
        m_inv = m_inv * (2.0 * ctx.c * g_logdet)[:, None, None]
        g_z = m_inv @ z if ctx.small_b else z @ m_inv                       # (n, b, d)
        return g_z, None


def total_coding_rate(z: Tensor, eps: float = 0.2, check: bool = True,
                      gather: bool = False) -> Tensor:
    """Mean over groups of R(Z_i) = 1/2 logdet(I + d/(b*eps) Z_i^T Z_i); z (n, b, d) -> scalar.

    eps is the reference code's eps (= paper eps^2): eps=0.2 means paper eps^2 = 0.2.
    check=True raises ``torch.linalg.LinAlgError`` naming the failing groups if some
    I + c*Gram is not positive definite or its log-det is not finite (reads a flag on the
    host: a sync). check=False never syncs; a failed group makes the result NaN, so the
    trainer's non-finite-loss check catches it.
    gather: all-gather Z across DDP ranks first (with gradients) so b is the global batch.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if z.dim() != 3:
        raise ValueError(f"z must have shape (n, b, d), got {tuple(z.shape)}")
    if gather:
        z = gather_with_grad(z, dim=1)                 # (n, B, d), B = global batch
    z = _at_least_fp32(z)
    n, b, d = z.shape
    logdet, info = _GramLogdet.apply(z, d / (b * eps))  # (n,), (n,)
    logdet = _mask_failed(logdet, info, check)
    return 0.5 * logdet.mean()


def invariance(z: Tensor) -> Tensor:
    """mean_i mean_j cos(z_ij, zbar_j), zbar_j = mean_i z_ij; z (n, b, d) -> scalar (fp32).

    The patch mean zbar is not detached (as in the reference code). For unit-norm rows the
    gradient through zbar is exactly zero anyway (sum_i of d cos / d zbar vanishes when
    sum_i z_ij = n zbar_j), so detaching would only matter for unnormalised z.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape (n, b, d), got {tuple(z.shape)}")
    z = _at_least_fp32(z)
    zbar = z.mean(dim=0)                                                # (b, d)
    zbar_unit = zbar / zbar.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (b, d)
    dots = torch.einsum("nbd,bd->nb", z, zbar_unit)                     # (n, b)
    # (F.cosine_similarity against the broadcast mean gives the same, ~3.7x slower on a CPU)
    return (dots / z.norm(dim=-1).clamp_min(1e-8)).mean()              # (n, b) -> scalar


def emp_ssl_loss(z: Tensor, lam: float = 200.0, eps: float = 0.2, check: bool = True,
                 gather: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """z (n, b, d) -> (loss, R_mean, inv) with loss = -R_mean - lam * inv (all fp32 scalars).

    eps is the reference code's eps (= paper eps^2). check / gather: see
    ``total_coding_rate``; the trainer passes check=False and watches for a non-finite loss.
    """
    r = total_coding_rate(z, eps=eps, check=check, gather=gather)
    inv = invariance(z)
    return -r - lam * inv, r, inv
