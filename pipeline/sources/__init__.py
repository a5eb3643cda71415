"""Sources: one split of a converted dataset -> batches on the device. See base.Source.

    memory     the whole split as one uint8 tensor on the device        (memory.py)
    dali       WebDataset JPEG shards, nvJPEG decode (CPU without a GPU)  (dali.py)
    torchvision  the same shards decoded by torchvision.io.decode_jpeg:
               nvJPEG on a GPU, libjpeg-turbo on the CPU; no DALI needed  (tvjpeg.py)
    ffcv       a .beton decoded by FFCV threads                          (ffcv.py)
    reference  the paper's CPU path, PIL per patch in DataLoader workers;
               yields the patches themselves (``yields_patches = True``)  (reference.py)

The dali, torchvision and ffcv modules (and their libraries) are imported only when asked for.
"""
from __future__ import annotations

from ..errors import UserError
from .base import Source, SourceOptions

SOURCES = ("memory", "dali", "torchvision", "ffcv", "reference")


def build_source(name: str, root, split: str, opts: SourceOptions, **kwargs) -> Source:
    """The source ``name`` for ``split`` of the converted dataset at ``root``.

    kwargs go to the source's constructor (the reference source needs num_patches,
    patch_size, out_size, mean, std, augment). Sources that yield the patches themselves
    have ``yields_patches = True``; every other source has ``yields_patches = False`` (the Source base).
    """
    if name == "memory":
        from .memory import MemorySource as cls
    elif name == "dali":
        from .dali import DaliSource as cls
    elif name == "torchvision":
        from .tvjpeg import TorchvisionSource as cls
    elif name == "ffcv":
        from .ffcv import FfcvSource as cls
    elif name == "reference":
        from .reference import ReferenceSource as cls
    else:
        raise UserError(f"--source {name!r}: unknown source; choose one of {', '.join(SOURCES)}")
    return cls(root, split, opts, **kwargs)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] is None
        return False


def choose_source(name: str, root, split: str, device) -> str:
    """``--source auto``: memory when the split fits on the device; else the shards on a GPU,
    decoded by DALI when it is installed and by torchvision (nvJPEG) otherwise; else FFCV
    (the shards again when FFCV is missing or the dataset has no .beton). Other names pass."""
    if name != "auto":
        return name
    from ..formats import load_manifest
    from .memory import fits_in_memory

    if fits_in_memory(root, split, device):
        return "memory"
    formats = load_manifest(root).formats
    shards = "dali" if installed("nvidia.dali") else "torchvision"
    if "dali" in formats and (device.type == "cuda" or "ffcv" not in formats or not installed("ffcv")):
        return shards
    return "ffcv"


__all__ = ["SOURCES", "Source", "SourceOptions", "build_source", "choose_source", "installed"]
