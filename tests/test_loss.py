"""The fused EMP-SSL objective against a naive per-patch d x d implementation."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from model.loss import emp_ssl_loss, gather_with_grad, invariance, logdet_spd, total_coding_rate


def naive_tcr(z: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference formula, one patch group at a time, on the d x d side, with LU logdet."""
    n, b, d = z.shape
    total = z.new_zeros(())
    for i in range(n):
        zi = z[i]                                                    # (b, d)
        total = total + 0.5 * torch.logdet(torch.eye(d, dtype=z.dtype) + d / (b * eps) * zi.T @ zi)
    return total / n


def naive_invariance(z: torch.Tensor) -> torch.Tensor:
    n, b, _ = z.shape
    zbar = z.mean(0)
    total = z.new_zeros(())
    for i in range(n):
        for j in range(b):
            total = total + torch.dot(z[i, j], zbar[j]) / (z[i, j].norm() * zbar[j].norm())
    return total / (n * b)


def unit(*shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("n,b,d", [(3, 5, 12), (4, 12, 5), (2, 7, 7)])  # b<d, b>d, b=d
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_tcr_value_and_grad_match_naive(n, b, d, eps):
    z1 = unit(n, b, d).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    fused = total_coding_rate(z1, eps=eps)
    naive = naive_tcr(z2, eps)
    torch.testing.assert_close(fused, naive, rtol=1e-6, atol=0)
    fused.backward()
    naive.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-12)


def test_tcr_both_gram_sides_agree_on_same_data():
    # Transposing a group's matrix swaps the roles of b and d; logdet(I + c Z Z^T) =
    # logdet(I + c Z^T Z) (Sylvester), so with c held fixed both sides must agree.
    z = unit(3, 6, 10)                                               # b < d: b x b Gram
    zt = z.transpose(1, 2).contiguous()                              # b > d: d x d Gram
    eps_t = 0.2 * (6 / 10) ** 2           # same c: 10 / (6 * 0.2) = 6 / (10 * eps_t)
    torch.testing.assert_close(total_coding_rate(z, 0.2), total_coding_rate(zt, eps_t),
                               rtol=1e-10, atol=0)


def test_tcr_gradcheck_float64():
    for shape in [(2, 3, 5), (2, 5, 3)]:
        z = unit(*shape).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: total_coding_rate(t, eps=0.3), (z,))


def test_tcr_known_value_orthonormal_rows():
    # b orthonormal rows: Z Z^T = I_b, so R = b/2 * log(1 + d/(b*eps)).
    n, b, d, eps = 2, 4, 8, 0.2
    z = torch.eye(d, dtype=torch.float64)[:b].expand(n, b, d)
    expected = b / 2 * math.log(1 + d / (b * eps))
    assert total_coding_rate(z, eps).item() == pytest.approx(expected, rel=1e-12)


def test_invariance_identical_patches_is_one():
    z = unit(1, 6, 9).expand(5, 6, 9)
    assert invariance(z).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("theta", [0.3, 1.0, 2.5])
def test_invariance_known_angles(theta):
    # two patches at angle theta: the mean bisects them, so each cosine is cos(theta / 2)
    z = torch.tensor([[[1.0, 0.0, 0.0]], [[math.cos(theta), math.sin(theta), 0.0]]],
                     dtype=torch.float64)                           # (2, 1, 3)
    assert invariance(z).item() == pytest.approx(math.cos(theta / 2), abs=1e-12)


def test_invariance_matches_naive_and_mean_is_not_detached():
    # not unit-norm: for unit rows the gradient through the mean happens to vanish exactly
    z1 = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z1 = (z1 * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    inv, ref = invariance(z1), naive_invariance(z2)
    torch.testing.assert_close(inv, ref, rtol=1e-10, atol=0)
    inv.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-8, atol=1e-12)
    # a detached mean gives a different gradient: the test above would catch a detach
    z3 = z1.detach().clone().requires_grad_()
    F.cosine_similarity(z3, z3.mean(0, keepdim=True).detach(), dim=-1).mean().backward()
    assert not torch.allclose(z3.grad, z1.grad)


def test_emp_ssl_loss_combines_terms():
    z = unit(3, 8, 16, seed=2)
    loss, r, inv = emp_ssl_loss(z, lam=7.0, eps=0.2)
    torch.testing.assert_close(r, naive_tcr(z, 0.2), rtol=1e-8, atol=0)
    torch.testing.assert_close(inv, naive_invariance(z), rtol=1e-8, atol=0)
    torch.testing.assert_close(loss, -r - 7.0 * inv)


def test_loss_is_fp32_and_finite_for_bf16_inputs():
    z32 = unit(20, 10, 64, dtype=torch.float32, seed=3)
    zb = z32.to(torch.bfloat16).requires_grad_()
    loss, r, inv = emp_ssl_loss(zb)
    assert loss.dtype == r.dtype == inv.dtype == torch.float32
    assert torch.isfinite(loss)
    ref, _, _ = emp_ssl_loss(z32)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_clear_error(bad):
    z = unit(4, 6, 8, dtype=torch.float32)
    z[2, 1, 3] = bad
    with pytest.raises(torch.linalg.LinAlgError, match=r"not positive definite.*\[2\]"):
        total_coding_rate(z)
    with pytest.raises(torch.linalg.LinAlgError):
        emp_ssl_loss(z)
    # check=False: no sync, no raise, the failure shows up as a NaN loss
    assert torch.isnan(total_coding_rate(z, check=False))
    assert torch.isnan(emp_ssl_loss(z, check=False)[0])


def test_logdet_spd_indefinite_matrix():
    m = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[1.0, 2.0], [2.0, 1.0]]])  # PD, indefinite
    with pytest.raises(torch.linalg.LinAlgError, match=r"\[1\]"):
        logdet_spd(m)
    out = logdet_spd(m, check=False)
    assert out[0].item() == pytest.approx(math.log(6.0), rel=1e-6) and torch.isnan(out[1])


def test_bad_arguments():
    z = unit(2, 3, 4)
    with pytest.raises(ValueError, match="eps"):
        total_coding_rate(z, eps=0.0)
    with pytest.raises(ValueError, match=r"\(n, b, d\)"):
        total_coding_rate(z[0])
    with pytest.raises(ValueError, match=r"\(n, b, d\)"):
        invariance(z[0])


def test_gather_is_noop_without_distributed():
    z = unit(2, 3, 4)
    assert gather_with_grad(z) is z
    torch.testing.assert_close(total_coding_rate(z, gather=True), total_coding_rate(z))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, z_full: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z_full.shape[1] // world
        z = z_full[:, rank * b:(rank + 1) * b].clone().requires_grad_()   # (n, b/world, d)
        r = total_coding_rate(z, eps=0.2, gather=True)
        r.backward()
        torch.save((r.detach(), z.grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_with_grad_two_gloo_ranks(tmp_path):
    """R on the all-gathered batch equals single-process R on the full batch; each rank's
    gradient is world * dR/dZ_rank (DDP's averaging divides the world back out)."""
    mp = torch.multiprocessing.get_context("spawn")
    world, port, z_full = 2, _free_port(), unit(3, 8, 16, seed=4)
    procs = [mp.Process(target=_ddp_worker, args=(r, world, port, z_full, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    zf = z_full.clone().requires_grad_()
    r_full = total_coding_rate(zf, eps=0.2)
    r_full.backward()
    b = z_full.shape[1] // world
    for rank in range(world):
        r, grad = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r, r_full.detach(), rtol=1e-10, atol=0)
        torch.testing.assert_close(grad, world * zf.grad[:, rank * b:(rank + 1) * b],
                                   rtol=1e-8, atol=1e-12)
