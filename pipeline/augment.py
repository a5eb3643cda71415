"""Batched photometric ops with one parameter per patch, for float images in [0, 1].

Every function takes ``x`` float (N, 3, H, W) with values in [0, 1] and one parameter per
patch as a tensor of shape (N,) on the same device, works on the whole batch at once (no
per-patch loop, no host-device sync) and modifies ``x`` IN PLACE (it also returns it).

Each op equals the torchvision function of the same name applied to each patch alone with
that patch's parameter (``torchvision.transforms.v2.functional``), to float rounding: 1e-6
for brightness, contrast, saturation, grayscale, blur and solarize, 1e-5 for hue (the HSV
round trip is written in a different, equivalent closed form). tests/test_augment.py checks
each against a per-patch torchvision loop.

The identity parameter (brightness/contrast/saturation 1, hue 0) leaves a patch unchanged
(hue 0: to float rounding); saturation 0 is exactly grayscale. pipeline.patches calls each op
on the subset of patches that drew it.

Written for speed in eager mode on CPU as well as GPU: in-place arithmetic, float masks
instead of bool ``where``, no ``remainder`` (all several times slower per element on CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def per_patch(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma of each pixel, (N, 3, H, W) -> (N, 1, H, W), a new tensor (rgb_to_grayscale)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """x <- clamp(factor * x, 0, 1)."""
    return x.mul_(per_patch(factor)).clamp_(0.0, 1.0)


def adjust_contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """x <- clamp(f * x + (1 - f) * m, 0, 1), m = the patch's mean luma."""
    m = grayscale(x).mean(dim=(1, 2, 3))  # (N,)
    return x.mul_(per_patch(factor)).add_(per_patch((1.0 - factor) * m)).clamp_(0.0, 1.0)


def adjust_saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """x <- clamp(f * x + (1 - f) * gray(x), 0, 1)."""
    gray = grayscale(x).mul_(per_patch(1.0 - factor))  # (N, 1, H, W)
    return x.mul_(per_patch(factor)).add_(gray).clamp_(0.0, 1.0)


def adjust_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5]), keeping saturation and value.

    With V = max(r, g, b), m = min, C = V - m and H in [0, 6) the hexcone hue (torchvision's
    _rgb_to_hsv, ties resolved r, then g, then b) plus 6 * shift, wrapped once, the rotated
    pixel is
        r = m + C * clamp(|H - 3| - 1, 0, 1)
        g = V - C * clamp(|H - 2| - 1, 0, 1)
        b = V - C * clamp(|H - 4| - 1, 0, 1)
    the same function as torchvision's _hsv_to_rgb sector table (6 cases and a gather).
    """
    r, g, b = x.unbind(1)  # (N, H, W) each
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # H * C: (g - b) if r is the max, else 2C + (b - r) if g is, else 4C + (r - g)
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))  # float 0/1 masks: bool where is slow
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    num_b = (r - g).add_(chroma, alpha=4.0)
    num_g = (b - r).add_(chroma, alpha=2.0)
    num = num_g.sub_(num_b).mul_(is_g).add_(num_b)  # g ? num_g : num_b
    num = (g - b).sub_(num).mul_(is_r).add_(num)  # r ? g - b : num
    hue = num.div_(chroma + 1e-30)  # in [-1, 5]; C == 0 gives num == 0 and hue 0
    hue.add_(per_patch(shift * 6.0).squeeze(1))  # + (N, 1, 1): in (-4, 8)
    hue.sub_(torch.floor(hue * (1.0 / 6.0)), alpha=6.0)  # mod 6, without the slow remainder
    w = is_r  # reuse as scratch
    for ch, center, base, sign in ((r, 3.0, minc, 1.0), (g, 2.0, maxc, -1.0), (b, 4.0, maxc, -1.0)):
        torch.sub(hue, center, out=w).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(base, w, chroma, value=sign, out=ch)  # writes x's channel
    return x


def blur_kernel_size(sigma_max: float) -> int:
    """Odd taps covering +-3 sigma_max: 13 for the paper's sigma in [0.1, 2.0].

    The Gaussian is truncated at 3 sigma whatever the image size (torchvision's ImageNet
    recipe uses 23 taps at 224 px, 10% of the side; for 32 px CIFAR patches that rule gives
    3 taps, which cuts a sigma = 2 Gaussian to a box). gaussian_blur() caps it below the
    image side because reflect padding needs pad < side.
    """
    return 2 * math.ceil(3.0 * sigma_max) + 1


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalized 1-D Gaussians exp(-t^2 / (2 sigma^2)), one per patch: (N,) -> (N, K)."""
    t = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - (kernel_size - 1) / 2
    k = torch.softmax(-0.5 * (t / sigma[:, None]) ** 2, dim=1)  # (N, K)
    # tails below 1e-30 would be float32 denormals, which make CPU convolutions ~10x slower
    return torch.where(k > 1e-30, k, 0.0)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each patch with its own sigma, reflect padding; returns a new tensor.

    Separable: a horizontal then a vertical depthwise conv with per-patch kernels (one grouped
    conv over the N*3 channels each), equal to torchvision's 2-D conv with the outer product.
    """
    n, c, h, w = x.shape
    kernel_size = min(kernel_size, 2 * min(h, w) - 1)  # reflect pad must be < side
    pad = kernel_size // 2
    k = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (N*3, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def solarize_(x: Tensor, threshold: float) -> Tensor:
    """x <- 1 - x where x >= threshold: x + [x >= t] * (1 - 2x) with a float mask."""
    inv = x.mul(-2.0).add_(1.0)  # 1 - 2x
    return x.add_(torch.ge(x, threshold, out=torch.empty_like(x)).mul_(inv))
