"""probe.py and model/linear_probe.py: the probe math on synthetic features, then the CLI end
to end on real pictures (conftest.py's) (CPU, a width-16 encoder): outputs, the feature cache, transfer,
the random-init baseline and every bad-input case."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_tool
from emp_ssl.checkpoints import save_checkpoint
from model.encoder import EncoderConfig, build_encoder
from emp_ssl.classifiers import knn_predict, knn_top1, train_linear_probe
from pipeline.formats import (Manifest, SplitInfo, load_manifest, memory_images_path,
                              memory_labels_path, save_manifest)

import probe


# --------------------------------------------------------------------------- synthetic math

def clusters(n: int, num_classes: int = 10, dim: int = 32, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs around well separated centres: linearly separable features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_separates_separable_features():
    xtr, ytr = clusters(1000)
    xte, yte = clusters(300, seed=1)
    r = train_linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=10, progress=False)
    assert r["final_top1"] >= 0.99 and r["final_train_top1"] >= 0.99
    assert len(r["history"]) == 10 and r["best_top1"] >= r["final_top1"]
    lrs = [h["lr"] for h in r["history"]]
    assert lrs[0] == pytest.approx(0.03) and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert r["test_pred"].shape == (300,) and r["test_pred"].dtype == torch.int64


def test_linear_probe_is_at_chance_on_shuffled_labels():
    xtr, ytr = clusters(1000)
    xte, yte = clusters(1000, seed=1)
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(5))]
    r = train_linear_probe(xtr, shuffled, xte, yte, num_classes=10, epochs=10, progress=False)
    assert r["final_top1"] < 0.2  # chance is 0.1; the same features with true labels give ~100%


def test_linear_probe_equals_torch_sgd_on_nn_linear():
    """The hand-written step is torch.optim.SGD on nn.Linear + cross-entropy (same init/order)."""
    xtr, ytr = clusters(250, spread=3.0)
    xte, yte = clusters(50, seed=1, spread=3.0)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    r = train_linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=4, batch_size=64, seed=3,
                           progress=False, **kw)

    gen = torch.Generator().manual_seed(3)  # the function's draws: weight, bias, one order per epoch
    bound = 1 / math.sqrt(32)
    lin = torch.nn.Linear(32, 10)
    with torch.no_grad():
        lin.weight.copy_((torch.rand(10, 32, generator=gen) * 2 - 1) * bound)
        lin.bias.copy_((torch.rand(10, generator=gen) * 2 - 1) * bound)
    opt = torch.optim.SGD(lin.parameters(), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(4):
        order = torch.randperm(250, generator=gen)
        for i in range(0, 250, 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
    torch.testing.assert_close(r["weight"], lin.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["bias"], lin.bias.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(r["test_pred"], lin(xte).argmax(1))


def test_linear_probe_is_deterministic_and_seeded():
    xtr, ytr = clusters(300, spread=4.0)
    xte, yte = clusters(100, seed=1, spread=4.0)
    kw = dict(num_classes=10, epochs=3, progress=False)
    a = train_linear_probe(xtr, ytr, xte, yte, seed=1, **kw)
    b = train_linear_probe(xtr, ytr, xte, yte, seed=1, **kw)
    c = train_linear_probe(xtr, ytr, xte, yte, seed=2, **kw)
    assert a["history"] == b["history"]
    assert a["history"] != c["history"]


def test_linear_probe_graph_epoch_matches_eager():
    """The static epoch a GPU captures as a CUDA graph (device lr, static order), run uncaptured
    on the CPU, trains the same classifier as the eager epochs (CUDA: the test below)."""
    xtr, ytr = clusters(330, spread=3.0)  # 330 = 3 full batches and a partial one
    xte, yte = clusters(100, seed=1, spread=3.0)
    kw = dict(num_classes=10, epochs=4, seed=4, progress=False)
    a = train_linear_probe(xtr, ytr, xte, yte, graph=False, **kw)
    b = train_linear_probe(xtr, ytr, xte, yte, graph=True, **kw)
    torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-5, atol=1e-6)
    assert [h["test_top1"] for h in a["history"]] == [h["test_top1"] for h in b["history"]]
    assert torch.equal(a["test_pred"], b["test_pred"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_probe_cuda_graph_matches_cpu():
    xtr, ytr = clusters(330, spread=3.0)
    xte, yte = clusters(100, seed=1, spread=3.0)
    kw = dict(num_classes=10, epochs=4, seed=4, progress=False)
    cpu = train_linear_probe(xtr, ytr, xte, yte, **kw)
    gpu = train_linear_probe(xtr.cuda(), ytr.cuda(), xte.cuda(), yte.cuda(), device="cuda", **kw)
    torch.testing.assert_close(cpu["weight"], gpu["weight"], rtol=1e-3, atol=1e-4)
    assert abs(cpu["final_top1"] - gpu["final_top1"]) <= 0.02


def test_linear_probe_rejects_bad_shapes():
    x, y = clusters(10)
    with pytest.raises(ValueError):
        train_linear_probe(x, y, x[:, :5], y, progress=False)
    with pytest.raises(ValueError):
        train_linear_probe(x, y, x, y, num_classes=3, progress=False)


def test_knn_on_clusters_and_weighted_votes():
    xtr, ytr = clusters(500, spread=2.0)
    xte, yte = clusters(200, seed=1, spread=2.0)
    assert knn_top1(xtr, ytr, xte, yte, num_classes=10) >= 0.98
    # random labels: chance
    rnd = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(3))
    assert knn_top1(xtr, rnd, xte, yte, num_classes=10) < 0.25

    # one very close neighbour of class 1 against two farther ones of class 0 (k = 3): a low
    # temperature lets the close one win, a high one lets the majority win.
    angles = torch.tensor([0.05, 0.3, 0.31])
    train = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [5.0], [0.2]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.01).item() == 1
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=1.0).item() == 0
    assert knn_predict(train, labels, test, num_classes=2, k=1, temperature=1.0).item() == 1
    # chunking the similarity matrix does not change the answer
    full = knn_predict(xtr, ytr, xte, num_classes=10)
    chunked = knn_predict(xtr, ytr, xte, num_classes=10, chunk_elems=1000)
    assert torch.equal(full, chunked)


# --------------------------------------------------------------------------- CLI helpers

ENC = EncoderConfig(arch="resnet18", stem="cifar", width=16, projector=(64, 32))
PATCH = {"patch_size": 16, "out_size": 16}
FAST = ["--num-patches", "4", "--probe-epochs", "5", "--device", "cpu", "--quiet"]


def make_checkpoint(path: Path, data: Path, *, seed: int = 0, enc: EncoderConfig = ENC,
                    state_dict: dict | None = None, patch: dict = PATCH) -> Path:
    """A checkpoint in train.py's layout: a seeded (untrained) encoder, trained 'on' data."""
    m = load_manifest(data)
    torch.manual_seed(seed)
    model = build_encoder(enc)
    save_checkpoint(path, {
        "model": state_dict if state_dict is not None else model.state_dict(),
        "encoder": enc.to_dict(), "patch": dict(patch),
        "data": {"name": m.name, "classes": list(m.classes), "mean": list(m.mean),
                 "std": list(m.std), "image_shape": m.splits["train"].shape},
        "step": 0, "epoch": 0, "config": {"augment": {"blur_p": 0.0}}, "git_commit": "test"})
    return path


def make_dataset(root: Path, *, name: str, num_classes: int, side: int, per_split=(60, 30),
                 seed: int = 0) -> Path:
    """A tiny synthetic dataset in the memory format: class c is a colour ramp + noise."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for split, n in zip(("train", "test"), per_split):
        y = np.arange(n) % num_classes
        base = (y[:, None, None, None] * 255 // max(num_classes - 1, 1)).astype(np.int64)
        x = np.clip(base + g.integers(-40, 40, (n, side, side, 3)), 0, 255).astype(np.uint8)
        np.save(memory_images_path(root, split), x)
        np.save(memory_labels_path(root, split), y.astype(np.int64))
        splits[split] = SplitInfo(count=n, shape=[side, side, 3],
                                  class_counts=np.bincount(y, minlength=num_classes).tolist())
    save_manifest(root, Manifest(name=name, source="synthetic",
                                 classes=[f"c{i}" for i in range(num_classes)], splits=splits,
                                 mean=[0.5] * 3, std=[0.25] * 3, formats=["memory"]))
    return root


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cache_files(run: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "features").glob("*.pt")}


# --------------------------------------------------------------------------- CLI end to end

def test_cli_end_to_end_writes_results_and_plots(cifar_subset_data, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", cifar_subset_data)
    proc = run_tool("probe.py", "--checkpoint", str(ckpt), "--data", str(cifar_subset_data), *FAST)
    out = tmp_path / "run" / "probe"
    r = read_results(out)
    assert "linear" in proc.stdout and str(out / "results.json") in proc.stdout
    for key in ("linear_top1", "linear_best_top1", "knn_top1"):
        assert 0.0 <= r[key] <= 1.0  # fractions
    assert r["linear_best_top1"] >= r["linear_top1"]
    assert r["linear_top1"] == r["linear_history"][-1]["test_top1"] and len(r["linear_history"]) == 5
    m = load_manifest(cifar_subset_data)
    assert r["num_train"] == m.splits["train"].count and r["num_test"] == m.splits["test"].count
    assert r["feature"] == "pre_projector" and r["feature_dim"] == 64  # the default: first projector block
    assert r["test_patches"] == 4 and r["eval_mode"] == "augmented" and r["random_init"] is False
    assert r["dataset"]["name"] == m.name == cifar_subset_data.name and r["dataset"]["test_split"] == "test"
    assert r["checkpoint"]["sha256"] == probe.sha256_file(ckpt)
    assert r["checkpoint"]["augment"]["blur_p"] == 0.0  # the recipe saved with the run
    assert r["features_cached"] == {"train": False, "test": False}
    assert r["timings_s"]["extraction"] > 0 and r["timings_s"]["linear_probe"] > 0
    assert is_png(out / "tsne.png") and is_png(out / "confusion.png")
    assert len(cache_files(tmp_path / "run")) == 2
    assert not list(out.glob(".*tmp*")) and not list((tmp_path / "run" / "features").glob(".*"))


def test_feature_cache_is_reused_and_invalidated(cifar_subset_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = make_checkpoint(run / "ckpt.pt", cifar_subset_data)
    args = ["--checkpoint", str(ckpt), "--data", str(cifar_subset_data), "--no-plots", *FAST]
    assert probe.main(args) == 0
    first = read_results(run / "probe")
    files = cache_files(run)
    assert len(files) == 2 and first["features_cached"] == {"train": False, "test": False}
    assert not (run / "probe" / "tsne.png").exists()

    calls = []
    real = probe.embed
    monkeypatch.setattr(probe, "embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert probe.main(args) == 0
    second = read_results(run / "probe")
    assert calls == [] and second["features_cached"] == {"train": True, "test": True}
    assert cache_files(run) == files  # nothing rewritten
    assert second["knn_top1"] == first["knn_top1"] and second["linear_top1"] == first["linear_top1"]

    # a different recipe is a different key
    assert probe.main(args + ["--eval-mode", "crops"]) == 0
    assert len(calls) == 2 and len(cache_files(run)) == 4
    assert read_results(run / "probe")["eval_mode"] == "crops"

    # so is another extraction precision (bf16 autocast runs on the CPU too); auto = fp32 here
    assert first["amp"] == "fp32"
    assert probe.main(args + ["--amp", "bf16"]) == 0
    bf16 = read_results(run / "probe")
    assert len(calls) == 4 and len(cache_files(run)) == 6 and bf16["amp"] == "bf16"
    assert bf16["features_cached"] == {"train": False, "test": False}

    # a new checkpoint at the same path (other weights): the key changes, features recomputed
    make_checkpoint(ckpt, cifar_subset_data, seed=1)
    assert probe.main(args) == 0
    third = read_results(run / "probe")
    assert len(calls) == 6 and third["features_cached"] == {"train": False, "test": False}
    assert len(cache_files(run)) == 8
    assert third["checkpoint"]["sha256"] != first["checkpoint"]["sha256"]


def test_random_init_subset_pre_projector_and_transfer(cifar_subset_data, tmp_path):
    run = tmp_path / "run"
    ckpt = make_checkpoint(run / "ckpt.pt", cifar_subset_data)
    other = make_dataset(tmp_path / "other", name="synthetic3", num_classes=3, side=24)
    args = ["--checkpoint", str(ckpt), "--data", str(cifar_subset_data), *FAST,
            "--random-init", "--max-images", "40", "--feature", "pre_projector",
            "--transfer-to", str(other)]
    assert probe.main(args) == 0
    out = run / "probe-random-init"
    r = read_results(out)
    assert r["random_init"] is True and r["feature"] == "pre_projector" and r["feature_dim"] == 64
    assert r["num_train"] == 40 and r["num_test"] == 40
    t = r["transfer"]
    assert t["dataset"]["name"] == "synthetic3" and t["dataset"]["num_classes"] == 3
    assert t["dataset"]["normalization"]["mean"] == [0.5] * 3  # the target's own mean/std
    assert t["num_train"] == 40 and t["num_test"] == 30
    # the synthetic classes differ in brightness: even random features separate them
    assert t["knn_top1"] > 0.6 and 0.0 <= t["linear_top1"] <= 1.0
    for name in ("tsne.png", "confusion.png", "transfer_tsne.png", "transfer_confusion.png"):
        assert is_png(out / name), name

    # the seeded subset is a mix of classes, not the first 40 of a class-sorted split
    cached = [torch.load(p, weights_only=True)
              for p in (run / "features").glob(f"{cifar_subset_data.name}-train-*.pt")]
    n_classes = len(load_manifest(cifar_subset_data).classes)  # 10 or 4
    assert len(cached) == 1 and len(cached[0]["labels"].unique()) >= min(5, n_classes)


def bad(args: list[str], capsys) -> str:
    assert probe.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(cifar_subset_data, tmp_path, capsys):
    data = ["--data", str(cifar_subset_data)]
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", cifar_subset_data)

    assert "no such checkpoint" in bad(["--checkpoint", str(tmp_path / "nope.pt"), *data, *FAST], capsys)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a loadable checkpoint" in bad(["--checkpoint", str(garbage), *data, *FAST], capsys)

    # the saved config says width 32, the weights are width 16
    wide = EncoderConfig(arch="resnet18", stem="cifar", width=32, projector=(64, 32))
    sd = build_encoder(ENC).state_dict()
    wrong = make_checkpoint(tmp_path / "wrong" / "ckpt.pt", cifar_subset_data, enc=wide, state_dict=sd)
    assert "does not match" in bad(["--checkpoint", str(wrong), *data, *FAST], capsys)

    # --data with other classes than the checkpoint was trained on
    other = make_dataset(tmp_path / "other", name="synthetic3", num_classes=3, side=32)
    err = bad(["--checkpoint", str(ckpt), "--data", str(other), *FAST], capsys)
    assert "classes" in err and "--transfer-to" in err

    # images smaller than the checkpoint's patches (for --data and for --transfer-to)
    small = make_dataset(tmp_path / "small", name="tiny8", num_classes=3, side=8)
    err = bad(["--checkpoint", str(ckpt), *data, "--transfer-to", str(small), *FAST], capsys)
    assert "8x8" in err and "16px" in err
    big = make_checkpoint(tmp_path / "big" / "ckpt.pt", cifar_subset_data,
                          patch={"patch_size": 48, "out_size": 32})
    assert "32x32" in bad(["--checkpoint", str(big), *data, *FAST], capsys)

    assert "no manifest" in bad(["--checkpoint", str(ckpt), "--data", str(tmp_path), *FAST], capsys)
    assert "--num-patches" in bad(["--checkpoint", str(ckpt), *data, "--num-patches", "0"], capsys)
    if not torch.cuda.is_available():
        assert "CUDA" in bad(["--checkpoint", str(ckpt), *data, "--device", "cuda"], capsys)
    assert not (tmp_path / "run" / "probe").exists()  # nothing written on bad input


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    proc = run_tool("probe.py", "--checkpoint", str(tmp_path / "missing.pt"),
                    "--data", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("probe: error: ") and len(proc.stderr.strip().splitlines()) == 1
