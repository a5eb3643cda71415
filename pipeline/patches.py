"""B images -> n augmented patches each, on the images' device: the one patch step of every source.

    images uint8 (B, H, W, 3) or (B, 3, H, W)
      -> n random P x P crops per image (uniform position, overlapping)   one index_select
      -> bilinear resize P -> S (torchvision's Resize, antialias off)     two matmuls
      -> horizontal flip                       p = flip_p      (folded into the crop gather)
      -> ColorJitter(b, c, s, h)               p = jitter_p    (ops in a random order per patch)
      -> grayscale                             p = gray_p
      -> Gaussian blur, sigma ~ U(blur_sigma)  p = blur_p      (K = 13 taps, see augment)
      -> solarize (x >= threshold -> 1 - x)    p = solarize_p
      -> (x - mean) / std                      -> (n, B, 3, S, S) float, channels_last strides

The patch tensor is patch-major: ``out[i]`` holds patch i of every image (the paper's Z_i);
patch i of image b is row ``i * B + b`` of the flattened batch.

Randomness: one ``torch.rand((n*B, 13), generator=generator)`` draw per call, whatever the
recipe, so the same generator state on the same device gives the same patches, and switching
an op off does not change the others' draws. Columns: 0 top, 1 left (crop origin =
floor(u * (size - P + 1))), 2 flip (u < flip_p), 3 jitter (u < jitter_p), 4 brightness,
5 contrast, 6 saturation (factor = lo + u * (1 + a - lo), lo = max(0, 1 - a)), 7 hue
((2u - 1) * hue), 8 gray (u < gray_p), 9 blur (u < blur_p), 10 sigma (lo + u * (hi - lo)),
11 solarize (u < solarize_p), 12 jitter order (JITTER_ORDERS[floor(24 u)]).

ColorJitter order: like torchvision's ColorJitter (a ``randperm(4)`` per call), each patch
applies brightness, contrast, saturation and hue in its own random order, one of the 24
permutations (``jitter_order="random"``, the default). Batched without a per-patch loop: three
passes each do every patch's next blend as one ``clamp(s x + b mean(gray) + c gray)`` with
per-patch (s, b, c), and hue rotates, between them, the ~1/4 of patches whose hue comes there.
``jitter_order="fixed"`` keeps brightness -> contrast -> saturation -> hue for every patch
(cheaper; the order of this project's results before 2026-11-22). Each op is in
pipeline.augment, tested there against torchvision; tests/test_patches.py checks the
composition against a per-patch torchvision loop.

No host-device sync on a GPU (no .item(), nonzero, bool(tensor)); on the CPU the batch is
cut into cache-sized chunks of patches (never one patch at a time) processed by
torch.get_num_threads() threads.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import augment as A

# columns of the per-patch uniform draws, in this fixed order
_TOP, _LEFT, _FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA, _SOLAR, _ORDER = range(13)
_NUM_DRAWS = 13

# ColorJitter op orders: the 24 permutations of (0 brightness, 1 contrast, 2 saturation, 3 hue)
# in lexicographic order; a patch's order is JITTER_ORDERS[floor(24 u)], u its column 12 draw
JITTER_ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
_BRIGHTNESS_OP, _CONTRAST_OP, _SATURATION_OP, _HUE_OP = range(4)

# Patches per chunk. CPU: a chunk's float tensor (3 * S * S * 4 bytes a patch, 2 MiB: 170
# CIFAR patches) stays in L2/L3 across the ~40 passes (~1.5x faster than the whole batch at
# once on the 2-core dev VM) while the per-op Python overhead stays small; chunks run on
# torch.get_num_threads() threads (see _cpu_pool).
# GPU: one chunk unless the crop index (8 bytes per crop pixel) would pass 256 MiB.
_CPU_CHUNK_BYTES = 1 << 21
_MAX_INDEX_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class AugmentParams:
    """The paper's augmentation recipe (EMP-SSL / VICReg / BYOL); each op's probability."""

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.1
    solarize_threshold: float = 128 / 255
    jitter_order: str = "random"  # "random": per patch, as torchvision | "fixed": b, c, s, h

    def __post_init__(self) -> None:
        if self.jitter_order not in ("random", "fixed"):
            raise ValueError(f"jitter_order must be 'random' or 'fixed', got {self.jitter_order!r}")

    @property
    def blur_kernel_size(self) -> int:
        return A.blur_kernel_size(self.blur_sigma[1])


def _as_hwc(images: Tensor) -> Tensor:
    """(B, H, W, 3) or (B, 3, H, W) -> a (B, H, W, 3) view."""
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"images must be (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
    return images if images.shape[3] == 3 else images.permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=32)
def _resize_matrix_cpu(src: int, dst: int) -> Tensor:
    """(dst, src) bilinear weights of F.interpolate(align_corners=False, antialias=False)."""
    scale = src / dst
    pos = ((torch.arange(dst, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)  # (dst,)
    i0 = pos.floor().long().clamp(max=src - 1)
    i1 = (i0 + 1).clamp(max=src - 1)
    frac = pos - i0
    m = torch.zeros(dst, src, dtype=torch.float64)
    m.scatter_add_(1, i0[:, None], (1.0 - frac)[:, None])
    m.scatter_add_(1, i1[:, None], frac[:, None])
    return m


def resize_matrix(src: int, dst: int, device: torch.device | str, scale: float = 1.0) -> Tensor:
    """(dst, src) float32 R with R @ img @ R.T == bilinear resize of img (times ``scale``):
    torchvision's Resize(dst, BILINEAR, antialias=False) of a square src x src image."""
    return (_resize_matrix_cpu(src, dst) * scale).to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _constants(p: int, s: int, mean: tuple, std: tuple, device: torch.device):
    """Small per-geometry tensors, built once per device (no host-to-device copy per call)."""
    def put(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    mean_t = put(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    std_t = put(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    if p == s:
        return mean_t, std_t, None, None
    # bilinear resize as two matmuls (3x faster than F.interpolate on CPU), /255 folded in
    rmat = put(resize_matrix(p, s, "cpu", 1.0 / 255.0))  # (S, P)
    rmat_t = put(resize_matrix(p, s, "cpu").T.contiguous())  # (P, S)
    return mean_t, std_t, rmat, rmat_t


@functools.lru_cache(maxsize=8)
def _jitter_orders(device: torch.device) -> tuple[Tensor, Tensor]:
    """Per JITTER_ORDERS entry, on ``device`` (built once per device): the three blend ops in
    their order (24, 3) int64, and the position of hue among the four (24,) int64."""
    blends = [[op for op in order if op != _HUE_OP] for order in JITTER_ORDERS]
    hue_pos = [order.index(_HUE_OP) for order in JITTER_ORDERS]
    return (torch.tensor(blends, dtype=torch.int64).to(device, non_blocking=True),
            torch.tensor(hue_pos, dtype=torch.int64).to(device, non_blocking=True))


def _capacity(count: int, p: float) -> int:
    """A fixed subset size that holds a Binomial(count, p) number of picks but with odds < 1e-9."""
    return min(count, math.ceil(count * p + 6.0 * math.sqrt(count * p * (1.0 - p))) + 1)


def _apply_to_subset_(x: Tensor, selected: Tensor, p: float, fn, exact: bool | None = None) -> None:
    """x[i] <- fn(x[i], i) for the patches where ``selected`` (N,) bool; in place.

    Every probabilistic op goes through here, so it does its work on ~p of the patches and
    leaves the others bit-exact. On CPU the exact subset (nonzero) is free. On a GPU,
    reading how many were selected would stall the stream, so a FIXED number of patches, a
    6-sigma upper bound of the binomial count, is gathered instead (selected ones first, by a
    stable sort of the mask), transformed, and written back where actually selected: the same
    result, ~p + 6 sqrt(p (1 - p) / N) of the full cost. A draw above the bound (odds < 1e-9
    per call) would leave the excess patches untransformed. ``exact`` overrides the choice.
    """
    if exact if exact is not None else x.device.type == "cpu":
        idx = selected.nonzero().squeeze(1)  # (k,)
        if idx.numel():
            x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))
        return
    k = _capacity(x.shape[0], p)
    idx = torch.sort(selected.to(torch.uint8), descending=True, stable=True).indices[:k]  # (k,)
    sub = x.index_select(0, idx)  # (k, 3, S, S)
    keep = selected.index_select(0, idx).view(-1, 1, 1, 1)
    x.index_copy_(0, idx, torch.where(keep, fn(sub.clone(), idx), sub))


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)


def _cpu_pool(threads: int) -> ThreadPoolExecutor | None:
    """``threads`` Python threads whose torch ops each run single-threaded, or None for 1.

    On the CPU the chunks are spread over these threads instead of splitting every op across
    OpenMP threads: ~100 small ops per chunk would each end in an OpenMP barrier, and when
    another process holds a core that barrier waits a scheduler slice for the descheduled
    thread (measured: 10-80x slower on a shared 2-core VM). Chunk-level threads never wait
    for each other. torch ops release the GIL, so the threads run in parallel; each sets its
    own OpenMP thread count to 1 once, and the caller's setting is restored after.
    """
    global _POOL
    if threads <= 1:
        return None
    if _POOL is not None and _POOL[:2] == (os.getpid(), threads):  # (a fork has no threads)
        return _POOL[2]
    saved = torch.get_num_threads()
    ready = threading.Barrier(threads + 1)

    def init():
        torch.get_num_threads()  # torch's per-thread lazy init, before the count is changed
        torch.set_num_threads(1)
        ready.wait()

    pool = ThreadPoolExecutor(threads, thread_name_prefix="make_patches", initializer=init)
    for _ in range(threads):  # every submit finds no idle thread (all wait in init): starts one
        pool.submit(lambda: None)
    ready.wait()
    torch.set_num_threads(saved)
    if _POOL is not None and _POOL[0] == os.getpid():
        _POOL[2].shutdown(wait=False)
    _POOL = (os.getpid(), threads, pool)
    return pool


def make_patches(images: Tensor, *, num_patches: int, patch_size: int, out_size: int,
                 mean: Sequence[float], std: Sequence[float], generator: torch.Generator,
                 augment: AugmentParams | None = AugmentParams(),
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """n augmented P x P -> S x S patches of every image: (n, B, 3, S, S), normalized.

    images: uint8 (B, H, W, 3) or (B, 3, H, W) on any device; ``generator`` on that device.
    augment: None -> crops, resize and normalize only (the probe's "crops only").
    dtype: of the output; the work is done in float32. The result has channels_last strides,
    so flatten_patches() is a free view.
    """
    hwc = _as_hwc(images)  # (B, H, W, 3)
    bsz, h, w, _ = hwc.shape
    n, p, s = num_patches, patch_size, out_size
    if p > h or p > w:
        raise ValueError(f"patch_size {p} is larger than the images ({h}x{w})")
    dev = images.device
    num = n * bsz
    u = torch.rand(num, _NUM_DRAWS, generator=generator, device=dev)  # (N, 13), N = n*B

    # crop origin and flip of every patch; patch-major: patch i of image b is row i*B + b
    b_idx = torch.arange(bsz, device=dev).repeat(n)  # (N,)
    top = torch.floor(u[:, _TOP] * (h - p + 1)).long().clamp_(max=h - p)  # (N,) in [0, H - P]
    left = torch.floor(u[:, _LEFT] * (w - p + 1)).long().clamp_(max=w - p)  # (N,) in [0, W - P]
    j = torch.arange(p, device=dev)
    rows = (b_idx * h + top)[:, None] + j  # (N, P) row of the (B*H) stacked images
    cols = left[:, None] + j  # (N, P)
    if augment is not None:  # hflip after the resize == reading the crop right to left
        cols = torch.where((u[:, _FLIP] < augment.flip_p)[:, None], cols.flip(1), cols)
    pixels = hwc.reshape(bsz * h * w, 3)  # a view when contiguous (a copy of B images if not)

    params = _draw_params(u, augment) if augment is not None else None
    mean_t, std_t, rmat, rmat_t = _constants(p, s, tuple(map(float, mean)), tuple(map(float, std)), dev)

    out = torch.empty(num, s, s, 3, device=dev, dtype=dtype)  # (N, S, S, 3)

    def run(sl: slice) -> None:  # patches sl: crop, resize, augment, normalize, write
        c = sl.stop - sl.start
        idx = rows[sl, :, None] * w + cols[sl, None, :]  # (c, P, P) flat pixel index
        crops = pixels.index_select(0, idx.view(-1)).view(c, p, p, 3)  # (c, P, P, 3) uint8
        x = crops.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        if rmat is None:
            x = x.div_(255.0)  # (c, 3, S, S)
        else:
            x = torch.matmul(rmat, x.view(c * 3, p, p) @ rmat_t).view(c, 3, s, s)  # (c, 3, S, S)
        if params is not None:
            _augment_(x, {k: None if v is None else v[sl] for k, v in params.items()}, augment)
        x.sub_(mean_t).div_(std_t)
        out[sl].copy_(x.permute(0, 2, 3, 1))

    if dev.type == "cpu":  # cache-sized chunks, spread over the torch thread count
        chunk = max(1, _CPU_CHUNK_BYTES // (3 * s * s * 4))
    else:  # one chunk unless the crop index gets large
        chunk = max(1, _MAX_INDEX_ELEMENTS // (p * p))
    work = [slice(i, min(i + chunk, num)) for i in range(0, num, chunk)]
    pool = _cpu_pool(torch.get_num_threads()) if dev.type == "cpu" and len(work) > 1 else None
    if pool is None:
        for sl in work:
            run(sl)
    else:
        for _ in pool.map(run, work):  # re-raises a chunk's exception
            pass
    return out.permute(0, 3, 1, 2).view(n, bsz, 3, s, s)  # (n, B, 3, S, S), channels_last strides


def _draw_params(u: Tensor, a: AugmentParams) -> dict[str, Tensor | None]:
    """Per-patch parameters from the uniform draws (column layout in the module docstring)."""
    def factor(col: int, amount: float) -> Tensor:  # U[max(0, 1 - a), 1 + a] like ColorJitter
        lo = max(0.0, 1.0 - amount)
        return u[:, col] * (1.0 + amount - lo) + lo

    lo, hi = a.blur_sigma
    order = (torch.floor(u[:, _ORDER] * len(JITTER_ORDERS)).long().clamp_(max=len(JITTER_ORDERS) - 1)
             if a.jitter_order == "random" else None)  # (N,) index into JITTER_ORDERS
    return {
        "order": order,
        "jitter": u[:, _JITTER] < a.jitter_p,
        "brightness": factor(_BRIGHT, a.brightness),
        "contrast": factor(_CONTRAST, a.contrast),
        "saturation": factor(_SAT, a.saturation),
        "hue": (u[:, _HUE] * 2.0 - 1.0) * a.hue,
        "gray": u[:, _GRAY] < a.gray_p,
        "blur": u[:, _BLUR] < a.blur_p,
        "sigma": u[:, _SIGMA] * (hi - lo) + lo,
        "solarize": u[:, _SOLAR] < a.solarize_p,
    }


def _color_jitter_(x: Tensor, q: dict[str, Tensor], idx: Tensor, a: AugmentParams) -> Tensor:
    """ColorJitter on x (k, 3, S, S), the patches ``idx`` of the chunk, in each patch's order."""
    if q["order"] is not None:
        return _color_jitter_random_order_(x, q, idx, a)
    if a.brightness > 0:
        A.adjust_brightness_(x, q["brightness"][idx])
    if a.contrast > 0:
        A.adjust_contrast_(x, q["contrast"][idx])
    if a.saturation > 0:
        A.adjust_saturation_(x, q["saturation"][idx])
    if a.hue > 0:
        A.adjust_hue_(x, q["hue"][idx])
    return x


def _color_jitter_random_order_(x: Tensor, q: dict[str, Tensor], idx: Tensor,
                                a: AugmentParams) -> Tensor:
    """ColorJitter with a per-patch op order, without a per-patch loop.

    A patch's order is its three blends in some order with hue inserted at one of 4 places.
    Three passes j = 0, 1, 2 each do every patch's j-th blend, as one affine pass with
    per-patch (s, b, c) (torchvision's _blend, clamped to [0, 1]):
        brightness  f x                       (s, b, c) = (f, 0, 0)
        contrast    f x + (1 - f) mean(gray)  (s, b, c) = (f, 1 - f, 0)
        saturation  f x + (1 - f) gray        (s, b, c) = (f, 0, 1 - f)
    and hue rotates the ~1/4 of patches whose hue comes before pass j (after pass 2 for the
    last quarter). Zero terms add exactly 0: each patch gets exactly its own sequence of ops
    (to float rounding, as pipeline.augment's ops).
    """
    blends, hue_pos = _jitter_orders(x.device)
    order = q["order"][idx]  # (k,)
    blends, hue_pos = blends.index_select(0, order), hue_pos.index_select(0, order)  # (k, 3), (k,)
    fb, fc, fs = q["brightness"][idx], q["contrast"][idx], q["saturation"][idx]  # (k,) each
    hue = q["hue"][idx]  # (k,)

    def hue_at(pos: int) -> None:  # hue on the patches whose hue is at position ``pos``
        if a.hue > 0:
            _apply_to_subset_(x, hue_pos == pos, 0.25, lambda t, i: A.adjust_hue_(t, hue[i]))

    for j in range(3):
        hue_at(j)
        op = blends[:, j]  # (k,)
        is_c, is_s = op == _CONTRAST_OP, op == _SATURATION_OP
        scale = torch.where(op == _BRIGHTNESS_OP, fb, torch.where(is_c, fc, fs))  # (k,)
        w_mean = torch.where(is_c, 1.0 - fc, 0.0)  # (k,)
        w_gray = torch.where(is_s, 1.0 - fs, 0.0)  # (k,)
        gray = A.grayscale(x)  # (k, 1, S, S)
        shift = w_mean * gray.mean(dim=(1, 2, 3))  # (k,)
        x.mul_(A.per_patch(scale)).add_(A.per_patch(shift))  # s x + b mean (addcmul out=x: 6x slower on CPU)
        x.addcmul_(gray, A.per_patch(w_gray)).clamp_(0.0, 1.0)  # + c gray, clamp
    hue_at(3)
    return x


def _augment_(x: Tensor, q: dict[str, Tensor], a: AugmentParams) -> None:
    """The photometric ops after crop/resize/flip, in place on x (c, 3, S, S) in [0, 1]."""
    if a.jitter_p > 0:
        _apply_to_subset_(x, q["jitter"], a.jitter_p, lambda t, i: _color_jitter_(t, q, i, a))
    if a.gray_p > 0:
        _apply_to_subset_(x, q["gray"], a.gray_p, lambda t, i: A.grayscale(t).expand_as(t))
    if a.blur_p > 0:
        sigma, ks = q["sigma"], a.blur_kernel_size
        _apply_to_subset_(x, q["blur"], a.blur_p, lambda t, i: A.gaussian_blur(t, sigma[i], ks))
    if a.solarize_p > 0:
        thr = a.solarize_threshold
        _apply_to_subset_(x, q["solarize"], a.solarize_p, lambda t, i: A.solarize_(t, thr))


def flatten_patches(p: Tensor) -> Tensor:
    """(n, B, 3, S, S) -> (n*B, 3, S, S) channels_last, patch-major (a view for make_patches' output)."""
    n, b, c, h, w = p.shape
    return p.reshape(n * b, c, h, w).contiguous(memory_format=torch.channels_last)
