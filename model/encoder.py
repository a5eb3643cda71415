"""ResNet backbone + MLP projector: x -> h (pooled features) -> z (L2-normalized embedding).

The backbone is a ResNet of ``BasicBlock``s (the torchvision block: same layers, parameter names
and construction order, so the same seed gives the same weights; written here so that building
the model does not import torchvision, seconds of every start-up) with a configurable base width
(64 gives the standard ResNet-18 with a 512-d ``h``; 16 gives a 128-d ``h`` for fast CPU tests)
and one of two stems:

    cifar    : conv 3x3 / stride 1, BN, ReLU, no max-pool        (32 px inputs)
    imagenet : conv 7x7 / stride 2, BN, ReLU, max-pool 3x3 / 2   (64 px and larger)

The projector follows the EMP-SSL reference code: one ``Linear -> BN -> ReLU`` block per hidden
width, then a final ``Linear`` to the output width; ``projector=(4096, 4096, 1024)`` is
512 -> 4096 -> 4096 -> 1024. The output of the first hidden block is what the reference
averages over patches for evaluation; ``features(x, "pre_projector")`` returns it.

Initialisation is the reference's: torchvision's ResNet init (kaiming-normal fan-out convs,
BatchNorm weight 1 / bias 0), PyTorch's defaults for the Linear layers, and for the cifar
stem's conv PyTorch's default Conv2d init (the reference swaps that conv in after
torchvision's init loop).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCH_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
STEMS = ("cifar", "imagenet")
FEATURE_KINDS = ("backbone", "pre_projector")


@dataclass
class EncoderConfig:
    """What ``build_encoder`` needs; saved in checkpoints via ``to_dict`` / ``from_dict``.

    arch      : "resnet18" | "resnet34" (BasicBlock ResNets)
    stem      : "cifar" (3x3/1, no max-pool) | "imagenet" (7x7/2 + max-pool)
    width     : base width; stage widths are width * (1, 2, 4, 8), so h has 8 * width dims
    projector : hidden widths..., output width (the last entry is the dimension d of z)
    """

    arch: str = "resnet18"
    stem: str = "cifar"
    width: int = 64
    projector: tuple[int, ...] = (4096, 4096, 1024)

    def __post_init__(self) -> None:
        if self.arch not in ARCH_BLOCKS:
            raise ValueError(f"EncoderConfig.arch={self.arch!r} is not supported; "
                             f"choose one of {sorted(ARCH_BLOCKS)}")
        if self.stem not in STEMS:
            raise ValueError(f"EncoderConfig.stem={self.stem!r} is not supported; "
                             f"choose one of {list(STEMS)}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"EncoderConfig.width must be a positive int, got {self.width!r}")
        proj = tuple(self.projector) if isinstance(self.projector, (list, tuple)) else ()
        if not proj or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in proj):
            raise ValueError("EncoderConfig.projector must be a non-empty sequence of positive "
                             f"ints (hidden widths..., output width), got {self.projector!r}")
        self.projector = proj

    def to_dict(self) -> dict:
        d = asdict(self)
        d["projector"] = list(self.projector)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class BasicBlock(nn.Module):
    """x -> relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 3x3 / ``stride``,
    conv2 3x3 / 1, no biases; shortcut = ``downsample`` (1x1 conv + BN) or the identity.
    (N, inplanes, H, W) -> (N, planes, H / stride, W / stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ShortcutConv2d(nn.Conv2d):
    """The downsample shortcut's 1x1 / ``stride`` conv; an ``nn.Conv2d`` with the same
    parameters and state-dict keys, whose forward on CPU tensors with fewer than 8 input
    channels is the strided subsample ``x[..., ::s, ::s]`` followed by the same conv at stride
    1 (a 1x1 conv without padding reads only those pixels, so this is the same function, and
    its weight gradient is the same sum over the same products).

    Why: oneDNN's AVX2 1x1 convolution, backward of the weights
    (``jit_1x1:avx2`` / ``jit_avx2_1x1_convolution_bwd_weights_t``), is broken for a 1x1
    stride-2 conv on channels-last input with 2..7 input channels and a batch of 2 or more:
    wrong weight gradients (relative error ~0.5), hangs at 100% CPU, bus errors, segfaults,
    ``free(): invalid next size``, with any number of OpenMP threads. Seen with torch 2.14.1
    (oneDNN v3.12.0, commit 80afa71049cd69a3df32adcccb623b12cd7baa22, as
    ``torch.__config__.show()`` reports) on an AVX2-only AMD EPYC, and reproduced on an
    AVX-512 Xeon with ``ONEDNN_MAX_CPU_ISA=AVX2`` (which makes oneDNN pick the AVX2 kernels):

        conv = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(24, 4, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
        conv(x).sum().backward()   # wrong conv.weight.grad, or never returns, or crashes

    Measured under the AVX2 cap (tools/onednn_sweep.py -> docs/results/onednn_avx2_sweep.md,
    3 trials of 5 passes per case): 2..7 input channels hang or give wrong gradients at every
    batch from 2 and output widths 4..64; 1 input channel, 8 or more, batch 1, stride 1 or 3,
    NCHW, a 3x3 stride-2 conv, and the native AVX-512 kernels are fine (docs/troubleshooting.md;
    tests/test_onednn_hazard.py runs the reproduction in a subprocess). In this ResNet
    the affected shortcut occurs only for widths below 8 (stage 2's input has ``width``
    channels), e.g. the tests' width-4 nets; real widths (16 and up) never take this path.
    The stride-1 1x1 conv it runs instead is not affected. The check is on static properties
    (device type, channel count, kernel), so torch.compile traces one branch; the subsample
    copies only the tiny (< 8-channel) input, and CUDA / meta tensors take the plain conv."""

    def _routes_around_onednn(self, x: Tensor) -> bool:
        return (x.device.type == "cpu" and self.in_channels < 8 and self.groups == 1
                and self.kernel_size == (1, 1) and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.stride != (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self._routes_around_onednn(x):
            sh, sw = self.stride
            return F.conv2d(x[..., ::sh, ::sw], self.weight, self.bias)  # stride 1
        return super().forward(x)


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            ShortcutConv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    layers = [BasicBlock(inplanes, planes, stride=stride, downsample=downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetBackbone(nn.Module):
    """x (N, 3, S, S) -> h (N, 8 * width): stem, four BasicBlock stages, global average pool."""

    def __init__(self, arch: str, stem: str, width: int):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        widths = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 2]
        stages, inplanes = [], width
        for planes, blocks, stride in zip(widths, ARCH_BLOCKS[arch], strides):
            stages.append(_make_stage(inplanes, planes, blocks, stride))
            inplanes = planes
        self.stages = nn.Sequential(*stages)
        self.out_dim = inplanes

        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if stem == "cifar":
            # The reference builds torchvision's resnet18 and then swaps in this 3x3 conv, after
            # torchvision's init loop: it keeps PyTorch's default Conv2d init (kaiming-uniform,
            # a=sqrt(5): U(+-1/sqrt(27)) here, std 0.111 vs kaiming-normal fan-out's 0.059).
            self.stem[0].reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))           # (N, 8w, S', S')
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 8w)


class EMPEncoder(nn.Module):
    """Backbone + projector. ``forward(x) -> (h, z)`` with z L2-normalized in fp32."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.arch, cfg.stem, cfg.width)
        self.embed_dim = self.backbone.out_dim
        *hidden, out = cfg.projector
        blocks, prev = [], self.embed_dim
        for w in hidden:
            blocks.append(nn.Sequential(nn.Linear(prev, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True)))
            prev = w
        self.hidden = nn.ModuleList(blocks)
        self.head = nn.Linear(prev, out)
        self.proj_dim = out

    def _project(self, h: Tensor) -> Tensor:
        for block in self.hidden:
            h = block(h)                        # (N, hidden_k)
        return self.head(h)                     # (N, proj_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone(x)                    # (N, embed_dim)
        z = F.normalize(self._project(h).float(), dim=-1)  # (N, proj_dim), fp32, unit norm
        return h, z

    def features(self, x: Tensor, kind: str = "backbone") -> Tensor:
        """Evaluation features: "backbone" -> h (N, embed_dim);
        "pre_projector" -> first Linear+BN+ReLU block of the projector (N, projector[0])."""
        self._check_kind(kind)
        h = self.backbone(x)                    # (N, embed_dim)
        if kind == "backbone":
            return h
        return self.hidden[0](h)                # (N, projector[0])

    def feature_dim(self, kind: str = "backbone") -> int:
        self._check_kind(kind)
        return self.embed_dim if kind == "backbone" else self.cfg.projector[0]

    def _check_kind(self, kind: str) -> None:
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {kind!r}; choose one of {list(FEATURE_KINDS)}")
        if kind == "pre_projector" and not len(self.hidden):
            raise ValueError("feature kind 'pre_projector' needs a projector with at least one "
                             f"hidden layer; this one is {self.cfg.projector}")


def build_encoder(cfg: EncoderConfig) -> EMPEncoder:
    return EMPEncoder(cfg)
