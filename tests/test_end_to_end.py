"""train.py -> probe.py on real CIFAR-10 images: a briefly trained encoder beats its random init."""
from __future__ import annotations

import json

import pytest

from conftest import run_tool

import train


# time limit: 112-210 s measured on busy 2-core CPUs, plus the shared data's conversion when first
@pytest.mark.timeout(630)
def test_trained_encoder_beats_random_init(cifar_subset_data, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--config", "configs/demo.yaml", "--data", str(cifar_subset_data), "--out", str(run),
                       "--epochs", "6", "--num-patches", "8", "--data.batch_size", "50",
                       "--data.max_images", "0", "--model.projector", "512,128", "--run.tensorboard",
                       "false", "--device", "cpu"]) == 0
    common = ["--checkpoint", str(run / "ckpt.pt"), "--data", str(cifar_subset_data), "--num-patches", "8",
              "--probe-epochs", "40", "--no-plots", "--quiet", "--device", "cpu"]
    run_tool("probe.py", *common, "--out", str(tmp_path / "trained"))
    run_tool("probe.py", *common, "--out", str(tmp_path / "random"), "--random-init")
    trained = json.loads((tmp_path / "trained" / "results.json").read_text())
    rand = json.loads((tmp_path / "random" / "results.json").read_text())
    assert trained["random_init"] is False and rand["random_init"] is True
    # 100 test images: demand a clear margin on the linear probe (the demo at 5,000 images shows ~13 points)
    assert trained["linear_top1"] >= rand["linear_top1"] + 0.05, (trained["linear_top1"], rand["linear_top1"])
    assert trained["knn_top1"] >= rand["knn_top1"], (trained["knn_top1"], rand["knn_top1"])
