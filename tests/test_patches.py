"""make_patches / flatten_patches: layout, crop geometry, the composition against a per-patch
torchvision loop, determinism, probabilities, normalization."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipeline import patches as P
from pipeline.patches import AugmentParams, flatten_patches, make_patches

OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
ZERO, ONE = [0.0] * 3, [1.0] * 3


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _coord_images(b: int, h: int, w: int) -> torch.Tensor:
    """R = 8 * row, G = 8 * col, B = 16 * image: a pixel tells where it came from."""
    y = torch.arange(h).view(1, h, 1).expand(b, h, w) * 8
    x = torch.arange(w).view(1, 1, w).expand(b, h, w) * 8
    k = torch.arange(b).view(b, 1, 1).expand(b, h, w) * 16
    return torch.stack([y, x, k], dim=-1).to(torch.uint8)  # (B, H, W, 3)


def _patches(images, n, p, s, seed=0, augment=None, mean=ZERO, std=ONE, **kw):
    return make_patches(images, num_patches=n, patch_size=p, out_size=s, mean=mean, std=std,
                        generator=torch.Generator().manual_seed(seed), augment=augment, **kw)


def test_layout_and_flatten():
    imgs = _images(5, 32, 32)
    out = _patches(imgs, 3, 16, 32, augment=AugmentParams())
    assert out.shape == (3, 5, 3, 32, 32) and out.dtype == torch.float32
    flat = flatten_patches(out)
    assert flat.shape == (15, 3, 32, 32)
    assert flat.is_contiguous(memory_format=torch.channels_last)
    assert flat.data_ptr() == out.data_ptr()  # a view: no copy
    for i in range(3):  # patch-major: row i*B + b is patch i of image b
        for b in range(5):
            assert torch.equal(flat[i * 5 + b], out[i, b])
    # (B, 3, H, W) input gives the same patches as (B, H, W, 3)
    chw = _patches(imgs.permute(0, 3, 1, 2).contiguous(), 3, 16, 32, augment=AugmentParams())
    assert torch.equal(chw, out)
    # a plain contiguous (n, B, 3, S, S) tensor is flattened to channels_last too
    flat2 = flatten_patches(out.contiguous())
    assert flat2.is_contiguous(memory_format=torch.channels_last) and torch.equal(flat2, flat)
    bf = _patches(imgs, 3, 16, 32, augment=AugmentParams(), dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), out, atol=0.02, rtol=0.01)
    with pytest.raises(ValueError):
        _patches(imgs, 2, 33, 33)


def test_crops_are_exact_windows_and_normalized():
    """P == S, no augmentation: every patch is exactly (window / 255 - mean) / std of its image."""
    imgs = _images(4, 20, 24, seed=1)
    n, p = 100, 8
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out = _patches(imgs, n, p, p, mean=mean, std=std)  # (n, 4, 3, 8, 8)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = imgs.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
    windows = x.unfold(2, p, 1).unfold(3, p, 1)  # (B, 3, 13, 17, P, P)
    windows = (windows - m[..., None, None]) / s[..., None, None]
    tops, lefts = set(), set()
    for i in range(n):
        for b in range(4):
            d = (windows[b] - out[i, b][:, None, None]).abs().amax(dim=(0, 3, 4))  # (13, 17)
            assert d.min() < 1e-6, "patch is not a window of its own image"
            t, l = divmod(int(d.argmin()), d.shape[1])
            tops.add(t)
            lefts.add(l)
    # uniform positions: over 400 crops every row/col offset shows up, extremes included
    assert tops == set(range(13)) and lefts == set(range(17))


def test_crop_resize_matches_torchvision():
    imgs = _coord_images(6, 32, 28)
    n, p, s = 10, 12, 29  # non-integer scale
    out = _patches(imgs, n, p, s)  # mean 0, std 1: values = resized pixels / 255
    for i in range(n):
        for b in range(6):
            corner = out[i, b, :, 0, 0] * 255  # output (0, 0) samples the crop's (0, 0) exactly
            top, left = round(float(corner[0]) / 8), round(float(corner[1]) / 8)
            assert round(float(corner[2]) / 16) == b
            crop = TF.crop(imgs[b].permute(2, 0, 1).float() / 255, top, left, p, p)
            ref = TF.resize(crop, [s, s], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
            torch.testing.assert_close(out[i, b], ref, atol=2e-6, rtol=0)


def _torchvision_patch(img, u, a: AugmentParams, p, s, mean, std):
    """One patch the slow way, from its row of uniform draws (column layout in patches' docstring)."""
    h, w = img.shape[-2:]
    top, left = math.floor(u[0] * (h - p + 1)), math.floor(u[1] * (w - p + 1))
    x = TF.crop(img, top, left, p, p)
    x = TF.resize(x, [s, s], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    if u[2] < a.flip_p:
        x = TF.hflip(x)

    def factor(v, amount):
        lo = max(0.0, 1.0 - amount)
        return lo + v * (1.0 + amount - lo)

    if u[3] < a.jitter_p:  # torchvision's ColorJitter with the patch's op order
        order = (itertools.permutations(range(4)) if a.jitter_order == "random" else [range(4)])
        ops = [(TF.adjust_brightness, factor(u[4], a.brightness)),
               (TF.adjust_contrast, factor(u[5], a.contrast)),
               (TF.adjust_saturation, factor(u[6], a.saturation)),
               (TF.adjust_hue, (2 * u[7] - 1) * a.hue)]
        for k in list(order)[math.floor(24 * u[12]) if a.jitter_order == "random" else 0]:
            fn, v = ops[k]
            x = fn(x, v)
    if u[8] < a.gray_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if u[9] < a.blur_p:
        sigma = a.blur_sigma[0] + u[10] * (a.blur_sigma[1] - a.blur_sigma[0])
        x = TF.gaussian_blur(x, [a.blur_kernel_size] * 2, [sigma, sigma])
    if u[11] < a.solarize_p:
        x = TF.solarize(x, a.solarize_threshold)
    return TF.normalize(x, mean, std)


@pytest.mark.parametrize("order", ["random", "fixed"])
@pytest.mark.parametrize("exact", [True, False])  # CPU subsets / the GPU's fixed-capacity subsets
def test_composition_matches_torchvision_loop(monkeypatch, exact, order):
    if not exact:
        orig = P._apply_to_subset_
        monkeypatch.setattr(P, "_apply_to_subset_",
                            lambda x, sel, p, fn, exact=None: orig(x, sel, p, fn, exact=False))
    # every op shows up often; 120 patches, ~96 jittered: each of the 24 orders ~4 times
    a = AugmentParams(gray_p=0.4, blur_p=0.4, solarize_p=0.4, jitter_order=order)
    imgs = _images(4, 24, 24, seed=2)
    n, p, s = 30, 12, 20
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    ours = _patches(imgs, n, p, s, seed=7, augment=a, mean=mean, std=std)
    u = torch.rand(n * 4, 13, generator=torch.Generator().manual_seed(7)).tolist()
    chw = imgs.permute(0, 3, 1, 2).float() / 255
    ref = torch.stack([_torchvision_patch(chw[k % 4], u[k], a, p, s, mean, std)
                       for k in range(n * 4)]).view(n, 4, 3, s, s)
    err = (ours - ref).abs()
    # float rounding (~1e-5 after /std); a value within rounding of the solarize threshold may
    # land on the other side, so allow a handful of such pixels
    assert (err > 1e-4).float().mean() < 1e-4, float(err.max())
    assert err.median() < 1e-6


def test_determinism():
    imgs = _images(3, 32, 32)
    a = AugmentParams()
    one = _patches(imgs, 5, 16, 32, seed=3, augment=a)
    assert torch.equal(one, _patches(imgs, 5, 16, 32, seed=3, augment=a))
    assert not torch.equal(one, _patches(imgs, 5, 16, 32, seed=4, augment=a))
    # turning an op off does not move the others' draws (same crops)
    assert torch.equal(_patches(imgs, 5, 16, 32, seed=3, augment=AugmentParams(**OFF)),
                       _patches(imgs, 5, 16, 32, seed=3, augment=None))


def test_threads_and_chunks_do_not_change_patches(monkeypatch):
    imgs = _images(8, 32, 32, seed=4)
    a = AugmentParams(gray_p=0.5, blur_p=0.5, solarize_p=0.5)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _patches(imgs, 60, 16, 32, seed=5, augment=a)  # 480 patches, 3 chunks
        torch.set_num_threads(2)
        two = _patches(imgs, 60, 16, 32, seed=5, augment=a)  # the chunks on 2 threads
    finally:
        torch.set_num_threads(saved)
    monkeypatch.setattr(P, "_CPU_CHUNK_BYTES", 7 * 3 * 32 * 32 * 4)  # 7 patches a chunk
    small = _patches(imgs, 60, 16, 32, seed=5, augment=a)
    assert torch.equal(one, two) and torch.equal(one, small)


@pytest.mark.parametrize("op,p", [("flip_p", 0.5), ("jitter_p", 0.8), ("gray_p", 0.2),
                                  ("blur_p", 0.1), ("solarize_p", 0.1)])
def test_probabilities(op, p):
    imgs = _images(50, 12, 12, seed=5)
    n = 40  # 2000 patches: the standard error of a fraction is <= 0.011
    base = _patches(imgs, n, 10, 10, seed=9, augment=AugmentParams(**OFF))
    out = _patches(imgs, n, 10, 10, seed=9, augment=AugmentParams(**{**OFF, op: p}))
    if op == "flip_p":
        hit = (out == base.flip(-1)).flatten(2).all(-1)
    elif op == "gray_p":
        raw = out * 1.0  # mean 0, std 1: raw values
        hit = ((raw[:, :, 0] - raw[:, :, 1]).abs().amax((-2, -1)) < 1e-6)
    elif op == "blur_p":
        hit = (out - base).abs().flatten(2).amax(-1) > 1e-5
    else:  # patches an op does not pick are left bit-exact
        hit = (out != base).flatten(2).any(-1)
    frac = hit.float().mean().item()
    expected = p * (0.95 if op == "blur_p" else 1.0)  # sigma < ~0.2 blurs by < 1e-5
    assert abs(frac - expected) < 0.04, (op, frac)


def test_apply_to_subset_paths_agree():
    x = torch.rand(300, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    sel = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.1
    fn = lambda t, i: t.mul_(0.5).add_(i.view(-1, 1, 1, 1).float())  # noqa: E731
    a, b = x.clone(), x.clone()
    P._apply_to_subset_(a, sel, 0.1, fn, exact=True)
    P._apply_to_subset_(b, sel, 0.1, fn, exact=False)
    assert torch.equal(a, b)
    assert torch.equal(a[~sel], x[~sel]) and not torch.equal(a[sel], x[sel])
    assert P._capacity(300, 0.1) >= 30 + 6 * math.sqrt(27)


@pytest.mark.cuda
def test_cuda_no_sync_and_deterministic():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    imgs = _images(16, 32, 32).cuda()

    def run(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return make_patches(imgs, num_patches=20, patch_size=16, out_size=32, mean=ZERO, std=ONE,
                            generator=g)

    run(0)  # first call builds the per-device constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (20, 16, 3, 32, 32) and out.is_cuda
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))


def test_jitter_orders_are_uniform_over_the_24_permutations():
    u = torch.rand(24_000, P._NUM_DRAWS, generator=torch.Generator().manual_seed(3))
    order = P._draw_params(u, AugmentParams())["order"]
    counts = torch.bincount(order, minlength=24)
    assert len(counts) == 24 and len(set(P.JITTER_ORDERS)) == 24
    assert (counts - 1000).abs().max() < 5 * 31  # 5 sigma of Binomial(24000, 1/24)
    assert P._draw_params(u, AugmentParams(jitter_order="fixed"))["order"] is None
    with pytest.raises(ValueError, match="jitter_order"):
        AugmentParams(jitter_order="shuffled")
