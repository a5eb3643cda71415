"""Encoder shapes, features, config round trips, precision / layout / compile friendliness."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from model import EncoderConfig, build_encoder, emp_ssl_loss

TINY = dict(width=8, projector=(64, 48, 32))


def tiny(stem: str = "cifar", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_encoder(EncoderConfig(stem=stem, **{**TINY, **kw}))


@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 64)])
def test_shapes_and_unit_norm(stem, size):
    m = tiny(stem)
    h, z = m(torch.randn(6, 3, size, size))
    assert h.shape == (6, 64) and m.embed_dim == 64 == m.feature_dim("backbone")
    assert z.shape == (6, 32) and m.proj_dim == 32
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))


def test_stem_downsampling():
    # cifar stem keeps 32 px through the stem (final map 4x4); imagenet stem divides by 4
    for stem, size, final in [("cifar", 32, 4), ("imagenet", 64, 2), ("imagenet", 224, 7)]:
        m = tiny(stem).backbone
        x = torch.randn(1, 3, size, size)
        assert m.stages(m.stem(x)).shape[-1] == final


def test_full_width_resnet18_matches_torchvision_parameter_count():
    m = build_encoder(EncoderConfig())                # width 64, projector (4096, 4096, 1024)
    assert m.embed_dim == 512 and m.proj_dim == 1024 and m.feature_dim("pre_projector") == 4096
    ours = sum(p.numel() for p in m.backbone.parameters())
    # the imagenet stem is torchvision's resnet18 without fc; the cifar stem swaps 7x7 for 3x3
    tv = sum(p.numel() for n, p in torchvision.models.resnet18().named_parameters()
             if not n.startswith("fc"))
    assert ours == tv - 64 * 3 * (7 * 7 - 3 * 3)
    ours_in = sum(p.numel() for p in build_encoder(EncoderConfig(stem="imagenet")).backbone.parameters())
    assert ours_in == tv
    head = [n for n, _ in m.named_parameters() if not n.startswith("backbone")]
    assert len(head) == 2 * 3 + 2 * 2                 # Linear w,b x3 ; BN w,b x2


def test_features_kinds():
    m = tiny().eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        h, _ = m(x)
        fb = m.features(x, "backbone")
        fp = m.features(x, "pre_projector")
    torch.testing.assert_close(fb, h)
    assert fp.shape == (5, m.feature_dim("pre_projector")) == (5, 64)
    assert (fp >= 0).all()                            # after the ReLU
    torch.testing.assert_close(fp, m.hidden[0](h))
    with pytest.raises(ValueError, match="unknown feature kind"):
        m.features(x, "logits")
    with pytest.raises(ValueError, match="unknown feature kind"):
        m.feature_dim("logits")
    flat = build_encoder(EncoderConfig(width=8, projector=(32,)))   # no hidden layer
    with pytest.raises(ValueError, match="hidden layer"):
        flat.feature_dim("pre_projector")


def test_state_dict_roundtrip_through_config_dict():
    m = tiny(seed=1).eval()
    cfg_json = json.dumps(m.cfg.to_dict())           # JSON-serialisable, as in a checkpoint
    m2 = build_encoder(EncoderConfig.from_dict(json.loads(cfg_json)))
    assert m2.cfg == m.cfg
    m2.load_state_dict(m.state_dict(), strict=True)
    m2.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(m(x), m2(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = build_encoder(EncoderConfig(width=8, projector=(64, 32)))
    with pytest.raises(RuntimeError):
        other.load_state_dict(m.state_dict(), strict=True)


def test_config_validation():
    assert EncoderConfig.from_dict({"projector": [4096, 512]}).projector == (4096, 512)
    assert EncoderConfig().to_dict() == {"arch": "resnet18", "stem": "cifar", "width": 64,
                                         "projector": [4096, 4096, 1024]}
    with pytest.raises(ValueError, match="arch='vit'.*resnet18"):
        EncoderConfig(arch="vit")
    with pytest.raises(ValueError, match="stem='tiny'.*cifar"):
        EncoderConfig.from_dict({"stem": "tiny"})
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        EncoderConfig.from_dict({"depth": 18})
    for bad in [0, -8, 2.5, True]:
        with pytest.raises(ValueError, match="width"):
            EncoderConfig(width=bad)
    for bad in [(), (0, 5), (128, 2.0), 1024, "128,32"]:
        with pytest.raises(ValueError, match="projector"):
            EncoderConfig(projector=bad)


def test_resnet34_arch():
    m = build_encoder(EncoderConfig(arch="resnet34", **TINY))
    assert [len(s) for s in m.backbone.stages] == [3, 4, 6, 3]
    assert m(torch.randn(2, 3, 32, 32))[1].shape == (2, 32)


def test_channels_last_matches_contiguous():
    m = tiny().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h, z = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        h2, z2 = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(h2, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-4, atol=1e-5)


def test_step_reads_the_input_layout_off_the_model():
    """EmpStep hands the encoder its input in the conv weights' layout; 1x1 kernels (either
    layout at once) do not decide."""
    from model.lars import LARS, lars_param_groups
    from model.step import EmpStep, model_memory_format

    for fmt in (torch.channels_last, torch.contiguous_format):
        m = tiny().to(memory_format=fmt)
        assert model_memory_format(m) == fmt
        step = EmpStep(m, m, LARS(lars_param_groups(m), lr=0.1))
        assert step.memory_format == fmt
        seen = []
        hook = m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].is_contiguous(memory_format=fmt)))
        step(torch.randn(2, 3, 3, 32, 32), lr=0.1)     # (n=2, B=3, 3, 32, 32), contiguous
        hook.remove()
        assert seen == [True]
    pointwise = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3))
    assert model_memory_format(pointwise.to(memory_format=torch.channels_last)) == torch.channels_last
    assert model_memory_format(torch.nn.Conv2d(8, 4, 1).to(memory_format=torch.channels_last)) \
        == torch.contiguous_format


def test_bf16_autocast_cpu_train_step():
    m = tiny().train()
    x = torch.randn(2 * 4, 3, 32, 32)                 # 4 images x 2 patches
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, z = m(x)
        loss, r, inv = emp_ssl_loss(z.view(2, 4, -1))   # (n, b, d)
    assert h.dtype == torch.bfloat16 and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_forward_and_loss_have_no_graph_breaks():
    m = tiny()
    x = torch.randn(4, 3, 32, 32)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    ex = torch._dynamo.explain(lambda t: m.features(t, "pre_projector"))(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    z = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1)
    ex = torch._dynamo.explain(lambda t: emp_ssl_loss(t, check=False))(z)
    assert ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.timeout(630)  # 39 s with a warm torch.compile cache, 211 s cold (busy 2-core CPU)
def test_compiled_fullgraph_matches_eager():
    m = tiny().train()
    x = torch.randn(8, 3, 32, 32)
    torch._dynamo.reset()
    mc = torch.compile(m, fullgraph=True)
    h, z = m(x)
    hc, zc = mc(x)
    torch.testing.assert_close(hc, h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zc, z, rtol=1e-4, atol=1e-4)
    loss = torch.compile(lambda t: emp_ssl_loss(t, check=False)[0], fullgraph=True)(zc.view(2, 4, -1))
    assert torch.isfinite(loss)
    loss.backward()
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_compiled_step_no_sync():
    m = build_encoder(EncoderConfig(width=16, projector=(256, 256, 128))).cuda()
    m = m.to(memory_format=torch.channels_last)
    mc = torch.compile(m)
    x = torch.randn(4 * 16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(2):                                 # second call: no recompilation, no sync
        if _ == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h, z = mc(x)
                loss, r, inv = emp_ssl_loss(z.view(4, 16, -1), check=False)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_initialisation_follows_the_reference():
    """torchvision's ResNet init (kaiming-normal fan-out convs, BN 1/0), except the CIFAR stem
    conv, which the reference swaps in after that init: PyTorch's default U(+-1/sqrt(fan_in))."""
    torch.manual_seed(0)
    cifar = build_encoder(EncoderConfig(stem="cifar")).backbone
    w = cifar.stem[0].weight  # (64, 3, 3, 3), fan_in 27
    assert w.abs().max() <= 27 ** -0.5 and abs(w.std().item() - 1 / 9) < 0.01
    later = cifar.stages[0][0].conv1.weight  # (64, 64, 3, 3), fan_out 576
    assert abs(later.std().item() - (2 / 576) ** 0.5) < 0.003
    imagenet = build_encoder(EncoderConfig(stem="imagenet")).backbone
    assert abs(imagenet.stem[0].weight.std().item() - (2 / (64 * 49)) ** 0.5) < 0.003
    bn = cifar.stem[1]
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
