"""The "Use your encoder" snippet (docs/use_your_encoder.md, and README.md where it carries the
same marked block) runs as written against a tiny checkpoint, so it cannot rot."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import ROOT
from emp_ssl.checkpoints import save_checkpoint
from model.encoder import EncoderConfig, build_encoder

MARKED = re.compile(r"<!-- snippet:use-encoder -->\s*```python\n(.*?)```\s*<!-- /snippet:use-encoder -->", re.S)


def snippets() -> list[tuple[str, str]]:
    found = []
    for name in ("docs/use_your_encoder.md", "README.md"):
        path = ROOT / name
        if path.is_file():
            found += [(name, code) for code in MARKED.findall(path.read_text())]
    return found


def test_the_docs_carry_the_snippet():
    names = [n for n, _ in snippets()]
    assert "docs/use_your_encoder.md" in names


@pytest.mark.parametrize("name,code", snippets(), ids=lambda v: v if v.endswith(".md") else "")
def test_snippet_runs(name, code, tmp_path, monkeypatch):
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(width=8, projector=(32, 16))).eval()
    ckpt = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(ckpt, {"model": enc.state_dict(), "encoder": enc.cfg.to_dict(),
                           "patch": {"patch_size": 16, "out_size": 32},
                           "data": {"name": "toy", "mean": [0.5] * 3, "std": [0.25] * 3,
                                    "image_shape": [32, 32, 3]}, "git_commit": "test"})
    monkeypatch.setenv("CKPT", str(ckpt))
    monkeypatch.setenv("EXPORT", str(tmp_path / "export"))
    monkeypatch.chdir(ROOT)  # torch.hub.load(".", ...) is the repository
    g = np.random.default_rng(0)
    labels = np.arange(20) % 2
    images = np.clip(labels[:, None, None, None] * 120 + g.integers(0, 120, (20, 32, 32, 3)), 0, 255).astype(np.uint8)
    exec(compile(code, f"{name}:snippet", "exec"), {"images": images, "labels": labels})
    assert (tmp_path / "export" / "export.json").is_file()
