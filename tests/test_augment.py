"""Each batched per-patch op of pipeline.augment against torchvision applied patch by patch.

The per-patch loops over torchvision calls live only here: they are the specification.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pipeline import augment as A
from pipeline.patches import resize_matrix

N = 24


@pytest.fixture
def x() -> torch.Tensor:
    """Float patches in [0, 1] with edge cases: a gray patch, saturated pixels, RGB ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, 12, 10, generator=g)
    x[0] = 0.5  # gray (chroma 0)
    x[1, 0] = x[1, 1]  # r == g ties
    x[2, :, :4] = 1.0  # saturated
    x[3, :, :, :3] = 0.0
    x[4] = torch.round(x[4] * 255) / 255  # exactly 8-bit levels (ties in max)
    return x


def _factors(lo: float, hi: float, seed: int) -> torch.Tensor:
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo


def _loop(fn, x, params) -> torch.Tensor:
    return torch.stack([fn(x[i], float(params[i])) for i in range(len(x))])


@pytest.mark.parametrize("op,tv,lo,hi", [
    (A.adjust_brightness_, TF.adjust_brightness, 0.0, 2.5),
    (A.adjust_contrast_, TF.adjust_contrast, 0.0, 2.5),
    (A.adjust_saturation_, TF.adjust_saturation, 0.0, 2.5),
])
def test_blend_ops_match_torchvision(x, op, tv, lo, hi):
    f = _factors(lo, hi, 1)
    f[5] = 1.0  # identity
    ours = op(x.clone(), f)
    ref = _loop(tv, x, f)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert torch.equal(ours[5], x[5])  # factor 1 leaves the patch exactly as it was


def test_hue_matches_torchvision(x):
    shift = _factors(-0.5, 0.5, 2)
    shift[5], shift[6], shift[7] = 0.5, -0.5, 0.0
    ours = A.adjust_hue_(x.clone(), shift)
    ref = _loop(TF.adjust_hue, x, shift)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[7], x[7], atol=1e-6, rtol=0)  # shift 0 ~ identity


def test_grayscale_matches_torchvision(x):
    ours = A.grayscale(x)  # (N, 1, H, W)
    ref = torch.stack([TF.rgb_to_grayscale(x[i], num_output_channels=1) for i in range(N)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # saturation 0 is grayscale, which is how make_patches never needs a separate op for it
    sat0 = A.adjust_saturation_(x.clone(), torch.zeros(N))
    torch.testing.assert_close(sat0, ref.expand_as(x), atol=1e-6, rtol=0)


def test_solarize_matches_torchvision(x):
    ours = A.solarize_(x.clone(), 128 / 255)
    ref = torch.stack([TF.solarize(x[i], 128 / 255) for i in range(N)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("kernel_size", [3, 13])
def test_blur_matches_torchvision(x, kernel_size):
    sigma = _factors(0.1, 2.0, 3)
    ours = A.gaussian_blur(x, sigma, kernel_size)
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
                       for i in range(N)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_blur_kernel_sizes():
    assert A.blur_kernel_size(2.0) == 13  # +-3 sigma of the paper's sigma_max
    k = A.gaussian_kernels(torch.tensor([0.1, 2.0]), 13)
    torch.testing.assert_close(k.sum(1), torch.ones(2))
    assert k[0, 6] > 0.999 and (k >= 0).all()  # sigma 0.1: a delta; no denormal tails
    assert ((k == 0) | (k > 1e-30)).all()
    # a kernel wider than the image is capped (reflect padding needs pad < side)
    small = torch.rand(2, 3, 5, 5)
    out = A.gaussian_blur(small, torch.tensor([2.0, 2.0]), 13)
    ref = TF.gaussian_blur(small[0], [9, 9], [2.0, 2.0])
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("src,dst", [(16, 32), (16, 16 * 3 + 1), (7, 32), (32, 20), (112, 224)])
def test_resize_matrix_is_torchvision_bilinear(src, dst):
    img = torch.rand(2, 3, src, src, generator=torch.Generator().manual_seed(src))
    r = resize_matrix(src, dst, "cpu")  # (dst, src)
    ours = r @ img @ r.T
    ref = TF.resize(img, [dst, dst], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours, F.interpolate(img, size=(dst, dst), mode="bilinear",
                                                   align_corners=False), atol=2e-6, rtol=0)
