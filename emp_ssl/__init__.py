"""The run-level layer above ``pipeline/`` (data) and ``model/`` (network, loss, optimizer).

``pipeline/`` and ``model/`` never import each other; what needs both lives here: the
evaluation protocol (bag-of-features embedding, linear/kNN heads, the training monitor), the
trainer's configuration and telemetry, checkpoint writing, and the exported encoder's API.
``train.py`` and ``probe.py`` are thin entry points over it.

    from emp_ssl import load_backbone, embed
    encoder = load_backbone("runs/demo/export")         # or a ckpt.pt
    feats = embed(images_uint8, encoder)                # (N, d): the probe's feature
"""
from __future__ import annotations

__all__ = ["embed", "load_backbone", "export_checkpoint"]


def __getattr__(name):  # lazy: importing emp_ssl does not import torch-heavy modules
    if name == "embed":
        from .embedding import embed
        return embed
    if name in ("load_backbone", "export_checkpoint"):
        from . import export
        return getattr(export, name)
    raise AttributeError(f"module 'emp_ssl' has no attribute {name!r}")
