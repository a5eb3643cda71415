"""train.py end to end on real pictures (conftest.py's; CPU, narrow model): learning, exact resume,
signals, chunked backprop, DDP under torchrun, and every bad-input case."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_tool
from model.checkpoint import load_checkpoint
from model.encoder import EncoderConfig, build_encoder

import train

SMALL = ["--config", "configs/demo.yaml", "--num-patches", "4", "--data.batch_size", "50",
         "--data.max_images", "0", "--model.projector", "128,32", "--run.log_every", "1",
         "--run.tensorboard", "false", "--device", "cpu"]


def small_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL, "--data", str(data), "--out", str(out), *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_outputs_written(cifar_subset_data, tmp_path):
    out = tmp_path / "run"
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "3")) == 0
    rows = [r for r in metrics(out) if "summary" not in r]
    assert len(rows) == 30  # 500 images / 50 per step * 3 epochs
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine decays
    summary = metrics(out)[-1]
    assert summary["summary"] and summary["patches_per_s"] > 0
    # model FLOPs: counted once; TFLOP/s in every record; no MFU on a CPU (no peak stated)
    assert summary["flops_per_patch"] > 0 and "mfu" not in summary and summary["peak"] is None
    assert summary["tflops"] == pytest.approx(
        summary["patches_per_s_after_first_step"] * summary["flops_per_patch"] / 1e12)
    assert all(r["tflops"] > 0 and "mfu" not in r for r in rows)
    # where the start-up went, and the time to the first step (process start to its end)
    startup = summary["startup_s"]
    assert {"imports", "data", "model", "flop_count", "first_step", "final_checkpoint"} <= set(startup)
    assert all(v >= 0 for v in startup.values())
    assert summary["time_to_first_step_s"] >= startup["first_step"]
    ckpt = load_checkpoint(out / "ckpt.pt")  # weights_only=True inside
    assert ckpt["step"] == 30 and ckpt["patch"] == {"patch_size": 16, "out_size": 32}
    classes = json.loads((cifar_subset_data / "manifest.json").read_text())["classes"]
    assert ckpt["data"]["classes"] == classes  # ["airplane", ...] or ["china_lake", ...]
    saved = (out / "config.yaml").read_text()
    assert "git_commit" in saved and "num_patches: 4" in saved
    mask = os.umask(0)
    os.umask(mask)
    assert {(out / f).stat().st_mode & 0o777 for f in ("ckpt.pt", "config.yaml")} == {0o666 & ~mask}
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_resume_is_bit_exact(cifar_subset_data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(small_args(cifar_subset_data, full, "--epochs", "2")) == 0
    # stop after 7 steps (mid-epoch), then after 6 more (crossing the epoch boundary), then finish
    assert train.main(small_args(cifar_subset_data, part, "--epochs", "2", "--run.max_steps", "7")) == 0
    assert load_checkpoint(part / "ckpt.pt")["step"] == 7
    assert train.main(small_args(cifar_subset_data, part, "--epochs", "2", "--run.max_steps", "6",
                                 "--resume")) == 0
    assert train.main(small_args(cifar_subset_data, part, "--epochs", "2", "--resume")) == 0
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(part / "ckpt.pt")
    assert a["step"] == b["step"] == 20
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


def test_sigterm_leaves_loadable_checkpoint(cifar_subset_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *small_args(cifar_subset_data, out, "--epochs", "50")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert 2 <= ckpt["step"] < 500
    assert set(ckpt["model"]) == set(build_encoder(EncoderConfig(
        width=16, projector=(128, 32))).state_dict())


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_patch_chunk_gradient_matches_unchunked(cifar_subset_data, tmp_path):
    cfg, _ = train.parse_args(small_args(cifar_subset_data, tmp_path / "r", "--num-patches", "6"))
    tr = train.Trainer(cfg, resume=False)
    tr.source.set_epoch(0)
    batch = next(iter(tr.source))
    patches = tr.make_patches(batch[0], 0)  # (6, 50, 3, 32, 32)
    tr.model.eval()  # BatchNorm on running statistics: the chunked gradient must match exactly
    loss, _, _ = tr.step_fn.loss(tr.step_fn.encode(patches))
    loss.backward()
    g_full = _grads(tr.model)
    tr.model.zero_grad(set_to_none=True)
    loss_c, _, _ = tr.step_fn.chunked(patches, 4)  # chunks of 4 and 2 groups
    g_chunk = _grads(tr.model)
    assert torch.allclose(loss, loss_c, rtol=1e-6, atol=1e-6)
    # equal up to float32 summation order (which varies with the thread count: ~1e-5 relative
    # on the stem conv, whose gradient sums 300 x 32 x 32 terms); a wrong gradient is O(1) off
    for a, b in zip(g_full, g_chunk):
        rel = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, rel
    # train mode: per-chunk batch statistics, running stats untouched by the no-grad pass
    tr.model.train()
    tr.model.zero_grad(set_to_none=True)
    bn = next(m for m in tr.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loss_t, _, _ = tr.step_fn.chunked(patches, 3)
    assert torch.isfinite(loss_t)
    assert all(torch.isfinite(g).all() for g in _grads(tr.model))
    assert not torch.equal(before, bn.running_mean)  # the two grad passes did update them


def test_channels_last_setting_reaches_model_and_inputs(cifar_subset_data, tmp_path):
    """run.channels_last decides the layout of the weights and of what the encoder is fed; the
    two layouts train to the same loss (fp32 CPU)."""
    seen, losses = {}, {}
    for cl in (True, False):
        cfg, _ = train.parse_args(small_args(cifar_subset_data, tmp_path / f"cl{cl}",
                                             "--run.channels_last", str(cl).lower()))
        tr = train.Trainer(cfg, resume=False)
        conv = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d))  # the stem
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert conv.weight.is_contiguous(memory_format=fmt)
        def record(module, args, cl=cl, fmt=fmt):  # returns None: the input is left as it is
            seen.setdefault(cl, args[0].is_contiguous(memory_format=fmt))

        hook = conv.register_forward_pre_hook(record)
        tr.source.set_epoch(0)
        losses[cl] = tr.train_step(next(iter(tr.source)), 0)[0]
        hook.remove()
    assert seen == {True: True, False: True}
    assert torch.allclose(losses[True], losses[False], rtol=1e-4, atol=1e-4)


def test_cuda_graphs_and_peak_flag_on_cpu(cifar_subset_data, tmp_path, capsys):
    """--run.cuda_graphs without CUDA runs the static step uncaptured (one note line) and trains
    as the eager step does; --run.peak_tflops gives an MFU on any device."""
    eager, graphs = tmp_path / "eager", tmp_path / "graphs"
    assert train.main(small_args(cifar_subset_data, eager, "--run.max_steps", "3")) == 0
    capsys.readouterr()
    assert train.main(small_args(cifar_subset_data, graphs, "--run.max_steps", "3",
                                 "--run.cuda_graphs", "true", "--run.peak_tflops", "0.5")) == 0
    err = capsys.readouterr().err
    assert "--run.cuda_graphs without CUDA" in err
    a, b = [r for r in metrics(eager) if "summary" not in r], [r for r in metrics(graphs) if "summary" not in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-4)
    ma, mb = load_checkpoint(eager / "ckpt.pt")["model"], load_checkpoint(graphs / "ckpt.pt")["model"]
    for k in ma:  # the device lr rounds the update differently in the last bit; 3 steps grow
        # that to ~1e-4 of a weight: compare by norm (a wrong step is O(1) off)
        rel = ((ma[k].float() - mb[k].float()).norm() / ma[k].float().norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, (k, rel)
    summary = metrics(graphs)[-1]
    assert summary["cuda_graphs"] and summary["peak"] == "--run.peak_tflops"
    assert summary["mfu"] == pytest.approx(summary["tflops"] / 0.5)
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_train_step_has_no_host_sync(cifar_subset_data, tmp_path, graphs):
    """The whole step on the GPU: patches, forward, fused loss, backward, LARS: no host sync
    after the first step (eager, and a replayed CUDA graph)."""
    cfg, _ = train.parse_args([*small_args(cifar_subset_data, tmp_path / "r"), "--device", "cuda",
                               "--run.cuda_graphs", str(graphs).lower()])
    tr = train.Trainer(cfg, resume=False)
    tr.source.set_epoch(0)
    it = iter(tr.source)
    tr.train_step(next(it), 0)  # cuDNN autotuning, momentum buffers (graphs: the capture)
    batch = next(it)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tr.train_step(batch, 1)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_ddp_two_process_gloo(cifar_subset_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "train.py",
                           *small_args(cifar_subset_data, out, "--epochs", "1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(out) if "summary" not in r]
    assert len(rows) == 10  # global batch 50 (25 per rank) over 500 images: 10 steps, rank 0 logs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 10 and not any(k.startswith("module.") for k in ckpt["model"])


def _bad(args: list[str]) -> str:
    proc = run_tool("train.py", *args, check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("train: error: "), proc.stderr
    return lines[0]


def test_bad_inputs(cifar_subset_data, tmp_path):
    assert "no such preset" in _bad(["--config", "configs/nope.yaml"])
    assert "no manifest" in _bad(small_args(tmp_path / "missing", tmp_path / "o1"))
    assert "unknown key 'optim.lrr'" in _bad(small_args(cifar_subset_data, tmp_path / "o2", "--optim.lrr", "1"))
    assert "--optim.lr" in _bad(small_args(cifar_subset_data, tmp_path / "o3", "--optim.lr", "abc"))
    assert "--source" in _bad(small_args(cifar_subset_data, tmp_path / "o4", "--source", "tape"))
    assert "--resume" in _bad(small_args(cifar_subset_data, tmp_path / "o5", "--resume"))
    msg = _bad(small_args(cifar_subset_data, tmp_path / "o10", "--source", "reference",
                          "--augment.jitter_order", "fixed"))
    assert msg.startswith("train: error: --source reference") and "jitter_order fixed" in msg
    # a 64px dataset under the 32px cifar preset
    big = tmp_path / "tiny64"
    big.mkdir()
    man = json.loads((cifar_subset_data / "manifest.json").read_text())
    man["splits"]["train"]["shape"] = [64, 64, 3]
    (big / "manifest.json").write_text(json.dumps(man))
    assert "64x64" in _bad(small_args(big, tmp_path / "o6"))
    assert "cifar stem" in _bad(small_args(cifar_subset_data, tmp_path / "o7", "--data.out_size", "64"))
    assert "--run.cuda_graphs with --patch-chunk" in _bad(small_args(
        cifar_subset_data, tmp_path / "o11", "--run.cuda_graphs", "true", "--patch-chunk", "2"))
    assert "--run.peak_tflops" in _bad(small_args(cifar_subset_data, tmp_path / "o12",
                                                  "--run.peak_tflops", "-1"))
    # an existing run without --resume
    out = tmp_path / "o8"
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "0.2")) == 0
    assert "already holds a run" in _bad(small_args(cifar_subset_data, out))
    for key, value in (("--model.width", "0"), ("--model.projector", "128,-1"), ("--model.stem", "x")):
        msg = _bad(small_args(cifar_subset_data, tmp_path / "o9", key, value))
        assert msg.startswith("train: error: config model:") and key[8:] in msg and "\n" not in msg.strip()
    # a checkpoint written when the model section held the projector as a list resumes
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["config"]["model"]["projector"] == (128, 32)
    ckpt["config"]["model"]["projector"] = [128, 32]
    torch.save(ckpt, out / "ckpt.pt")
    msg = _bad(small_args(cifar_subset_data, out, "--epochs", "0.4", "--resume"))
    assert "optim.epochs" in msg and "model" not in msg  # only the real difference is named
    assert train.main(small_args(cifar_subset_data, out, "--epochs", "0.2", "--resume")) == 0


def test_trains_on_the_reference_source(cifar_subset_data, tmp_path):
    """train.py fed by the paper's CPU path (torchvision on PIL, patch by patch): the run
    records the source and a finite loss for every step."""
    out = tmp_path / "ref"
    assert train.main(small_args(cifar_subset_data, out, "--source", "reference", "--epochs", "0.2",
                                 "--data.num_workers", "1")) == 0
    rows = [r for r in metrics(out) if "summary" not in r]
    assert len(rows) == 2 and all(abs(r["loss"]) < 1e4 for r in rows)
    assert (out / "config.yaml").read_text().count("source_resolved: reference") == 1


def test_missing_optional_library_is_one_line(cifar_subset_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    code = train.main(small_args(cifar_subset_data, tmp_path / "o", "--source", "dali"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("train: error: --source dali") and "pip install" in err
