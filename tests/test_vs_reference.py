"""benchmarks/vs_reference.py end to end on a CPU, without the authors' code (CI has none): a
stand-in checkout written here with the interface the harness relies on (their file names,
argv, dataset constructor, transform class, .cuda() calls, nn.DataParallel, torch.save of
``save_models/<epoch>.pt``, a func.py importing torchmetrics), trained a few steps beside ours,
converted, probed, compared and reported; and the one-line refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_tool
from test_probe import make_dataset

from benchmarks.vs_reference import one_gpu
from pipeline.errors import UserError

STAND_IN = {
    "main.py": '''
import argparse, os
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from model.model import encoder
from dataset.datasets import load_dataset
from func import Unused
from lars import LARS_NAME
from loss import LOSS_NAME

parser = argparse.ArgumentParser()
for flag, kind, default in (("--patch_sim", int, 200), ("--tcr", int, 1), ("--num_patches", int, 100),
                            ("--arch", str, "resnet18-cifar"), ("--bs", int, 100), ("--lr", float, 0.3),
                            ("--eps", float, 0.2), ("--msg", str, "NONE"), ("--dir", str, "run"),
                            ("--data", str, "cifar10"), ("--epoch", int, 30)):
    parser.add_argument(flag, type=kind, default=default)
args = parser.parse_args()
train_dataset = load_dataset(args.data, train=True, num_patch=args.num_patches)
print("dataset:", type(train_dataset).__name__, len(train_dataset))
dataloader = DataLoader(train_dataset, batch_size=args.bs, shuffle=True, drop_last=True, num_workers=2)
net = nn.DataParallel(encoder(arch=args.arch))
net.cuda()
opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=(50000 // args.bs) * args.epoch)

def main():
    for epoch in range(args.epoch):
        for step, (data, label) in enumerate(dataloader):
            assert len(data) == args.num_patches and data[0].shape == (args.bs, 3, 32, 32)
            z = net(torch.cat(data, dim=0).cuda())
            loss = -torch.logdet(torch.eye(z.shape[1]) + 10 * z.T @ z / z.shape[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
        model_dir = f"./logs/{args.dir}/numpatch{args.num_patches}_{args.msg}/save_models/"
        os.makedirs(model_dir, exist_ok=True)
        torch.save(net.state_dict(), model_dir + str(epoch) + ".pt")
        print("saved epoch", epoch)

if __name__ == "__main__":
    main()
''',
    "model/model.py": '''
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet18

class encoder(nn.Module):
    def __init__(self, arch="resnet18-cifar"):
        super().__init__()
        self.backbone = resnet18()
        self.backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.backbone.maxpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.pre_feature = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.projection = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x):
        return F.normalize(self.projection(self.pre_feature(self.backbone(x))))
''',
    "dataset/datasets.py": '''
def load_dataset(data_name, train=True, num_patch=4, path="./data/"):
    raise RuntimeError("the stand-in's own dataset constructor ran: it should have been replaced")
''',
    "dataset/aug.py": '''
import torchvision.transforms as T

class ContrastiveLearningViewGenerator:
    def __init__(self, num_patch=4):
        self.num_patch = num_patch
        self.t = T.Compose([T.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)), T.ToTensor(),
                            T.Normalize([0.5] * 3, [0.5] * 3)])

    def __call__(self, x):
        return [self.t(x) for _ in range(self.num_patch)]
''',
    "func.py": '''
from torchmetrics.metric import Metric

class Unused(Metric):
    pass
''',
    "lars.py": "LARS_NAME = 'stand-in'\n",
    "loss.py": "LOSS_NAME = 'stand-in'\n",
}


def stand_in_checkout(root: Path, git: bool) -> Path:
    for name, text in STAND_IN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.lstrip())
    if git:
        for cmd in (["init", "-q"], ["add", "."],
                    ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "stand-in"]):
            subprocess.run(["git", "-C", str(root), *cmd], check=True, capture_output=True)
    return root


def test_vs_reference_end_to_end_on_a_stand_in_checkout(tmp_path):
    git = shutil.which("git") is not None
    ref = stand_in_checkout(tmp_path / "EMP-SSL", git)
    data = make_dataset(tmp_path / "cifar10", name="cifar10", num_classes=10, side=32, per_split=(60, 30))
    out, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["benchmarks/vs_reference.py", "--ref-dir", str(ref), "--data", str(data), "--out", str(out),
            "--runs", str(runs), "--batch-size", "4", "--num-patches", "2", "--steps", "2", "--warmup-steps", "1",
            "--device", "cpu", "--ours-args", "--model.width 16 --model.projector 64,16",
            "--probe-args", "--num-patches 2 --probe-epochs 2"]
    if not git:
        argv += ["--ref-commit", "abc123"]
    proc = run_tool(*argv)
    assert "ours / theirs, patches/s:" in proc.stdout and "patches per CPU second" in proc.stdout

    doc = json.loads((out / "vs_reference.json").read_text())
    ref_info = doc["reference"]
    head = (subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True)
            .stdout.strip() if git else "abc123")
    assert ref_info["commit"] == head and ref_info["unchanged_after_runs"] is True
    assert set(ref_info["files_sha256"]) == set(STAND_IN) and doc["complete"] is True
    assert not list(ref.rglob("__pycache__"))  # nothing written into their checkout

    st = doc["setting"]
    assert st["steps_per_epoch"] == 2 and st["kept_steps"] == 2 and st["schedule_steps"] == (50000 // 4) * 2
    theirs, ours = (next(r for r in doc["runs"] if r["side"] == s) for s in ("theirs", "ours"))
    for row in (theirs, ours):
        assert row["steps"] == 2 and row["patches_per_s"] > 0 and row["wall_s"] > 0
        assert row["peak_rss_mib"] > 0 and 0 <= row["probe"]["linear_top1"] <= 1
    # their DataLoader with its own worker count, over the converted split's subset; stopped
    # after the kept epoch (their --epoch 2 would save 1.pt next)
    assert theirs["dataloader"]["num_workers"] == 2 and theirs["dataloader"]["dataset_len"] == 8
    assert "--epoch" in theirs["argv"] and theirs["argv"][theirs["argv"].index("--epoch") + 1] == "2"
    assert Path(theirs["their_checkpoint"]).name == "0.pt"
    assert not (Path(theirs["their_checkpoint"]).parent / "1.pt").exists()
    log = Path(theirs["log"]).read_text()
    assert "dataset: ConvertedSplit 8" in log and "saved epoch" not in log  # stopped in its save
    assert any("cuda" in p for p in theirs["patches"])
    # ours: the same schedule length (in steps) and the same number of steps trained
    a = ours["argv"]
    assert float(a[a.index("--epochs") + 1]) * 2 == pytest.approx((50000 // 4) * 2)
    assert a[a.index("--run.max_steps") + 1] == "2" and a[a.index("--data.max_images") + 1] == "8"
    # both probed on the same pictures, paired; their checkpoint normalized as they trained it
    pa = doc["summary"]["paired_accuracy"]
    assert pa["a"] == "ours" and len(pa["pairs"]) == 1 and pa["pairs"][0]["linear"]["pairs"] == 30
    probe_theirs = json.loads((out / "probe_theirs_r0.json").read_text())
    assert probe_theirs["dataset"]["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert probe_theirs["checkpoint"]["git_commit"] == head
    assert doc["summary"]["speedup_ours_over_theirs"]["n"] == 1

    run_tool("benchmarks/report.py", "--results", str(out))
    report = (out / "REPORT.md").read_text()
    row = next(l for l in report.splitlines() if l.endswith("| vs_reference.json |"))
    assert row.startswith("| n=2, 4 images/step, 1 of 2 epochs, 2 steps/epoch, cifar10 on cpu | 1 | ")
    assert (out / "vs_reference.png").read_bytes()[:4] == b"\x89PNG"


def test_vs_reference_refuses_in_one_line(tmp_path):
    data = make_dataset(tmp_path / "cifar10", name="cifar10", num_classes=10, side=32, per_split=(20, 10))
    small = make_dataset(tmp_path / "c16", name="c16", num_classes=10, side=16, per_split=(20, 10))
    ref = stand_in_checkout(tmp_path / "EMP-SSL", git=shutil.which("git") is not None)
    (tmp_path / "empty").mkdir()
    cases = [(["--ref-dir", str(tmp_path / "empty"), "--data", str(data)], "not a checkout of"),
             (["--ref-dir", str(ref), "--data", str(small)], "32x32"),
             (["--ref-dir", str(ref), "--data", str(data), "--keep-epochs", "3"], "--keep-epochs"),
             (["--ref-dir", str(ref), "--data", str(data), "--device", "tpu"], "--device")]
    if shutil.which("git"):
        tampered = stand_in_checkout(tmp_path / "tampered", git=True)
        (tampered / "main.py").write_text((tampered / "main.py").read_text() + "\n# changed\n")
        cases.append((["--ref-dir", str(tampered), "--data", str(data)], "differ from commit"))
    for args, words in cases:
        proc = run_tool("benchmarks/vs_reference.py", *args, "--out", str(tmp_path / "o"), check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and words in err, (args, err)
        assert err.startswith("vs_reference: error: ")


def test_one_gpu_for_both_sides():
    assert one_gpu("cpu", "0,1") == ""
    assert one_gpu("cuda", None) == "0" and one_gpu("cuda:1", None) == "1"
    assert one_gpu("cuda", "3,5") == "3" and one_gpu("cuda:1", "3,5") == "5"
    with pytest.raises(UserError, match="shows 2 GPU"):
        one_gpu("cuda:2", "3,5")
