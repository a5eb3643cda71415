"""oneDNN's AVX2 1x1-convolution weight backward (``jit_1x1:avx2``, oneDNN v3.12.0 in torch
2.14.1) is broken for a 1x1 stride-2 conv on channels-last input with 2..7 input channels and
a batch of 2 or more: wrong weight gradients, hangs, crashes. ``model.encoder.ShortcutConv2d``
routes the ResNet shortcut around it (docs/troubleshooting.md).

Every check runs in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN then picks its
AVX2 kernels on AVX-512 CPUs too, so the hazardous kernel runs on any x86 machine) and a
timeout, so a hang or a crash in oneDNN fails or is recorded here instead of stopping the
suite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_child(code: str, timeout: float) -> tuple[str, dict | None, str]:
    """(outcome, result, detail): outcome "ok" (the child printed a JSON result on its last
    line and exited 0), "hang" (still running after ``timeout`` s; killed) or "crash"."""
    try:
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", None, f"no result after {timeout:.0f} s (killed)"
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return "crash", None, f"exit status {p.returncode}: {tail}"
    return "ok", json.loads(p.stdout.strip().splitlines()[-1]), ""


ENCODER_CHILD = """
    import copy, json, torch
    from model.encoder import EncoderConfig, ShortcutConv2d, build_encoder
    torch.manual_seed(0)
    net = build_encoder(EncoderConfig(width=4, projector=(32, 16)))
    ref = copy.deepcopy(net).double()              # NCHW float64: not oneDNN's fp32 kernels
    net = net.to(memory_format=torch.channels_last)
    shortcuts = {n: m for n, m in net.named_modules() if isinstance(m, ShortcutConv2d)}
    x = torch.randn(24, 3, 32, 32)
    xcl = x.contiguous(memory_format=torch.channels_last)
    worst = {}
    for step in range(3):                          # the hang / crash is intermittent: repeat
        net.zero_grad(); ref.zero_grad()
        h, z = net(xcl)
        (h.square().mean() + (z * torch.arange(16.0)).sum()).backward()
        h, z = ref(x.double())
        (h.square().mean() + (z * torch.arange(16.0, dtype=torch.float64)).sum()).backward()
        rmods = dict(ref.named_modules())
        for name, m in shortcuts.items():
            g, gr = m.weight.grad.double(), rmods[name].weight.grad
            err = ((g - gr).norm() / gr.norm()).item()
            worst[name] = max(worst.get(name, 0.0), err)
    print(json.dumps({
        "worst": worst,
        "routed": {n: m._routes_around_onednn(xcl.new_empty(1, m.in_channels, 2, 2))
                   for n, m in shortcuts.items()},
    }))
"""


def test_encoder_shortcut_grads_exact_under_avx2_kernels():
    """The width-4 encoder (shortcuts 4 -> 8, 8 -> 16, 16 -> 32, stride 2), channels-last, on
    CPU under the AVX2 cap: forward + backward complete, three times, and every shortcut's
    weight gradient matches the same net run in NCHW float64. Stage 2's shortcut (4 input
    channels) is the affected shape and takes the routed path; the others run oneDNN's own
    kernels, which are fine at 8 and more input channels. (fp32 vs float64 differ by ~1e-5
    here; the broken kernel's gradients are off by O(1), when it returns at all. Without the
    route this test fails: wrong gradients (relative error 1.2-1.4) or a hang, measured.)"""
    outcome, res, detail = run_child(ENCODER_CHILD, timeout=120)
    assert outcome == "ok", f"width-4 encoder backward under ONEDNN_MAX_CPU_ISA=AVX2: {outcome}, {detail}"
    assert res["routed"] == {"backbone.stages.1.0.downsample.0": True,
                             "backbone.stages.2.0.downsample.0": False,
                             "backbone.stages.3.0.downsample.0": False}, res["routed"]
    for name, err in res["worst"].items():
        assert err < 1e-3, f"{name}: weight grad relative error {err:.3g} vs float64"


RAW_CHILD = """
    import json, torch
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False)
    ref = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False).double()
    ref.weight.data.copy_(conv.weight.data)
    conv = conv.to(memory_format=torch.channels_last)
    worst = 0.0
    for step in range(3):
        x = torch.randn(24, 4, 32, 32)
        conv.weight.grad = ref.weight.grad = None
        conv(x.contiguous(memory_format=torch.channels_last).requires_grad_()).sum().backward()
        ref(x.double().requires_grad_()).sum().backward()
        g, gr = conv.weight.grad.double(), ref.weight.grad
        worst = max(worst, ((g - gr).norm() / gr.norm()).item())
    print(json.dumps({"worst": worst}))
"""


def test_raw_reproduction_documents_the_hazard(record_property):
    """The upstream reproduction, plain ``nn.Conv2d(4, 8, 1, stride=2)`` channels-last
    backward at batch 24, under the AVX2 cap. What it does depends on the CPU and on chance
    (on an AVX-512 Xeon under the cap: wrong gradients, hangs, crashes; natively on AVX2
    machines the same), so the outcome is recorded (``record_property``, and printed: run
    with ``-s`` or ``-rP``), not asserted: the assertion is that it cannot stop the suite."""
    outcome, res, detail = run_child(RAW_CHILD, timeout=30)
    if outcome == "ok":
        err = res["worst"]
        outcome, detail = ("ok" if err < 1e-4 else "wrong grads"), f"weight grad relative error {err:.3g}"
    record_property("onednn_avx2_1x1_stride2_outcome", outcome)
    print(f"oneDNN AVX2 1x1 stride-2 channels-last weight backward (Conv2d(4, 8, 1, stride=2), "
          f"batch 24): {outcome} ({detail})")
    assert outcome in ("ok", "wrong grads", "hang", "crash")


@pytest.mark.parametrize("side", [32, 31, 7])
def test_routed_shortcut_is_the_same_function(side):
    """In process, float64 (no oneDNN kernel involved): the routed shortcut (subsample, then
    stride 1) equals the plain 1x1 stride-2 conv, output and both gradients, odd sides too;
    it keeps nn.Conv2d's state-dict keys; only CPU, < 8 input channels, 1x1 strided convs route."""
    import torch

    from model.encoder import ShortcutConv2d
    torch.manual_seed(0)
    conv = ShortcutConv2d(4, 8, kernel_size=1, stride=2, bias=False).double()
    plain = torch.nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False).double()
    plain.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ["weight"]
    x = torch.randn(3, 4, side, side, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert conv._routes_around_onednn(xa)
    ya, yb = conv(xa), plain(xb)
    assert ya.shape == yb.shape == (3, 8, (side + 1) // 2, (side + 1) // 2)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    meta = torch.empty(3, 4, side, side, device="meta")
    assert not conv._routes_around_onednn(meta)
    assert not ShortcutConv2d(8, 16, kernel_size=1, stride=2)._routes_around_onednn(x)
    assert not ShortcutConv2d(4, 8, kernel_size=1, stride=1)._routes_around_onednn(x)
