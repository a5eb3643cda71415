"""LARS against hand-computed steps and against a per-parameter reference loop over SGD."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from model import LARS, EncoderConfig, build_encoder, emp_ssl_loss, lars_param_groups


def one_param_opt(w, g, **kw):
    p = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    return p, LARS([p], **kw)


def test_two_steps_hand_computed():
    # ||w|| = 5, ||g|| = 0.5; local_lr = 0.02 * 5 / (0.5 + 0.1 * 5) = 0.1; scale = min(0.1/0.5, 1) = 0.2
    # g' = (g + 0.1 w) * 0.2 = diag(0.12, 0.16); buf = g'; nesterov step = g' + 0.9 g' = 1.9 g'
    p, opt = one_param_opt([[3.0, 0.0], [0.0, 4.0]], [[0.3, 0.0], [0.0, 0.4]],
                           lr=0.5, weight_decay=0.1, eta=0.02, eps=0.0)
    opt.step()
    torch.testing.assert_close(p.data, torch.tensor([[3 - 0.5 * 1.9 * 0.12, 0.0],
                                                     [0.0, 4 - 0.5 * 1.9 * 0.16]], dtype=torch.float64))
    assert p.data[0, 0].item() == pytest.approx(2.886) and p.data[1, 1].item() == pytest.approx(3.848)
    # step 2, same gradient: ||w1|| = sqrt(2.886^2 + 3.848^2) = 4.81
    w1n = 4.81
    scale = min(0.02 * w1n / (0.5 + 0.1 * w1n) / 0.5, 1.0)
    g2 = [(0.3 + 0.1 * 2.886) * scale, (0.4 + 0.1 * 3.848) * scale]
    buf = [0.9 * 0.12 + g2[0], 0.9 * 0.16 + g2[1]]
    expected = [2.886 - 0.5 * (g2[0] + 0.9 * buf[0]), 3.848 - 0.5 * (g2[1] + 0.9 * buf[1])]
    opt.step()
    torch.testing.assert_close(torch.diagonal(p.data), torch.tensor(expected, dtype=torch.float64))
    assert p.data[0, 1].item() == 0.0


def test_clip_inactive_and_clip_off():
    w, g = [[3.0, 0.0], [0.0, 4.0]], [[0.3, 0.0], [0.0, 0.4]]
    # lr 0.05: local_lr / lr = 2 -> clipped to 1: g' = g + wd w = diag(0.6, 0.8)
    p, opt = one_param_opt(w, g, lr=0.05, weight_decay=0.1, eta=0.02, eps=0.0, nesterov=False)
    opt.step()
    torch.testing.assert_close(torch.diagonal(p.data),
                               torch.tensor([3 - 0.05 * 0.6, 4 - 0.05 * 0.8], dtype=torch.float64))
    # clip=False: scale = local_lr = 0.1: g' = diag(0.06, 0.08)
    p, opt = one_param_opt(w, g, lr=0.05, weight_decay=0.1, eta=0.02, eps=0.0, nesterov=False,
                           clip=False)
    opt.step()
    torch.testing.assert_close(torch.diagonal(p.data),
                               torch.tensor([3 - 0.05 * 0.06, 4 - 0.05 * 0.08], dtype=torch.float64))


def test_zero_norm_param_gets_plain_gradient_without_decay():
    p, opt = one_param_opt([[0.0, 0.0]], [[1.0, -2.0]], lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.step()
    torch.testing.assert_close(p.data, torch.tensor([[-0.1, 0.2]], dtype=torch.float64))
    p, opt = one_param_opt([[1.0, 2.0]], [[0.0, 0.0]], lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.step()                                        # zero gradient: no decay either
    torch.testing.assert_close(p.data, torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_excluded_group_is_plain_nesterov_sgd_without_decay():
    m = nn.Linear(2, 1).double()
    groups = lars_param_groups(m)
    assert [g["lars_exclude"] for g in groups] == [False, True] and groups[1]["weight_decay"] == 0
    opt = LARS(groups, lr=0.5, weight_decay=0.1)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0]))
    m.weight.grad = torch.zeros_like(m.weight)
    # step 1: g = 0.5 -> buf = 0.5, step = 0.5 + 0.9 * 0.5 = 0.95 -> 1 - 0.475 = 0.525
    m.bias.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert m.bias.item() == pytest.approx(0.525, abs=1e-12)
    # step 2: g = -1 -> buf = 0.45 - 1 = -0.55, step = -1 - 0.495 = -1.495 -> 0.525 + 0.7475
    m.bias.grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.step()
    assert m.bias.item() == pytest.approx(1.2725, abs=1e-12)


def test_param_groups_split_encoder():
    m = build_encoder(EncoderConfig(width=8, projector=(32, 16)))
    adapted, excluded = lars_param_groups(m)
    assert all(p.ndim > 1 for p in adapted["params"])
    assert all(p.ndim == 1 for p in excluded["params"]) and excluded["weight_decay"] == 0.0
    assert "weight_decay" not in adapted                 # uses the optimizer default
    n_total = sum(1 for _ in m.parameters())
    assert len(adapted["params"]) + len(excluded["params"]) == n_total
    # conv weights + 2 linears are adapted; BN weights/biases and linear biases are not
    n_conv = sum(isinstance(x, nn.Conv2d) for x in m.modules())
    assert len(adapted["params"]) == n_conv + 2


def reference_lars_sgd_step(model, sgd, lr, wd, eta, eps):
    """Per-parameter loop with the reference semantics, then torch.optim.SGD (wd=0)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 or p.grad is None:
                continue
            pn, gn = torch.norm(p), torch.norm(p.grad)
            if pn != 0 and gn != 0:
                local = min(eta * pn.item() / (gn.item() + wd * pn.item() + eps) / lr, 1.0)
                p.grad.add_(p, alpha=wd).mul_(local)
    sgd.step()


@pytest.mark.parametrize("lr", [0.3, 0.001])  # scale = local_lr / lr < 1 ; scale clamped to 1
def test_matches_reference_loop_over_sgd(lr):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    ref = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    ref.load_state_dict(net.state_dict())
    opt = LARS(lars_param_groups(net), lr=lr, weight_decay=1e-2, eta=0.005)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0)
    x = torch.randn(16, 6, dtype=torch.float64)
    target = torch.randn(16, 3, dtype=torch.float64)
    for _ in range(5):
        for model in (net, ref):
            model.zero_grad()
            (model(x) - target).pow(2).mean().backward()
        grads_before = [p.grad.clone() for p in net.parameters()]
        opt.step()
        reference_lars_sgd_step(ref, sgd, lr, 1e-2, 0.005, 1e-8)
        for a, b in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for g, p in zip(grads_before, net.parameters()):
            assert torch.equal(g, p.grad)                 # step leaves .grad untouched


def test_state_dict_resume_gives_same_next_step():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = LARS(lars_param_groups(net), lr=0.1)
    x = torch.randn(8, 4)
    net(x).sum().backward()
    opt.step()
    clone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    clone.load_state_dict(net.state_dict())
    opt2 = LARS(lars_param_groups(clone), lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # as if through torch.save/load
    for model, o in ((net, opt), (clone, opt2)):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_hyperparameters():
    p = nn.Parameter(torch.ones(2, 2))
    for kw in [dict(lr=0.0), dict(lr=0.1, eta=0.0), dict(lr=0.1, weight_decay=-1.0)]:
        with pytest.raises(ValueError):
            LARS([p], **kw)


def test_emp_ssl_training_reduces_loss_on_a_fixed_batch():
    """Integration: encoder + fused loss + LARS lower the EMP-SSL loss on fixed patches."""
    torch.manual_seed(0)
    m = build_encoder(EncoderConfig(width=8, projector=(64, 64, 32))).train()
    opt = LARS(lars_param_groups(m), lr=0.3, weight_decay=1e-4)
    n, b = 4, 16
    images = torch.rand(b, 3, 32, 32)
    patches = (images + 0.1 * torch.randn(n, b, 3, 32, 32)).flatten(0, 1)   # (n*b, 3, 32, 32)
    losses = []
    for _ in range(5):
        _, z = m(patches)                              # (n*b, d)
        loss, r, inv = emp_ssl_loss(z.view(n, b, -1), lam=200.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    m = build_encoder(EncoderConfig(width=8, projector=(64, 32))).cuda()
    opt = LARS(lars_param_groups(m), lr=0.3)
    m(torch.randn(8, 3, 32, 32, device="cuda"))[1].sum().backward()
    opt.step()                                         # creates the momentum buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
