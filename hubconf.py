"""torch.hub entry points (no network needed with ``source="local"``):

    import torch
    encoder = torch.hub.load("path/to/this/repo", "emp_ssl_resnet18", source="local",
                             weights="runs/demo/export")   # an export directory or a ckpt.pt

The result is :func:`emp_ssl.load_backbone`'s module (eval mode): ``encoder(x)`` gives the
backbone feature, ``encoder.features(x, "pre_projector")`` the probe's default feature, and
``emp_ssl.embed(images, encoder)`` the bag-of-features embedding.
"""
dependencies = ["torch", "torchvision"]


def emp_ssl_resnet18(weights=None, **kwargs):
    """EMP-SSL ResNet-18 backbone. ``weights``: an export directory (tools/export.py), its
    export.json, or a ckpt.pt; None gives a randomly initialised CIFAR-stem ResNet-18
    (``stem``, ``width`` and ``projector`` keyword arguments change its shape).
    ``device`` (default "cpu") is where the module is placed."""
    from emp_ssl.export import ExportedBackbone, load_backbone
    from model.encoder import EncoderConfig

    device = kwargs.pop("device", "cpu")
    if weights is not None:
        if kwargs:
            raise TypeError(f"emp_ssl_resnet18: {sorted(kwargs)} only apply with weights=None")
        return load_backbone(weights, device=device)
    cfg = EncoderConfig(arch="resnet18", stem=kwargs.pop("stem", "cifar"),
                        width=kwargs.pop("width", 64), projector=tuple(kwargs.pop("projector", (4096, 4096, 1024))))
    if kwargs:
        raise TypeError(f"emp_ssl_resnet18: unknown keyword arguments {sorted(kwargs)}")
    return ExportedBackbone(cfg, cfg.projector[0] if len(cfg.projector) > 1 else None).to(device).eval()
