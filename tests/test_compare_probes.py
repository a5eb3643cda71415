"""Paired comparison of probes (tools/compare_probes.py) and the per-picture predictions
probe.py saves for it: the statistics against hand computations, then two tiny converted
datasets with a known pairing (the second a perturbed, longer copy of the first, as the JPEG
CIFAR-10 is of the lossless one) probed end to end and paired picture by picture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import compare_probes as cp
from conftest import run_tool
from emp_ssl.embedding import class_positions, split_rows
from test_probe import make_checkpoint



# --------------------------------------------------------------------------- statistics

def test_mcnemar_exact_matches_hand_computation():
    # b=1, c=3: 4 discordant pictures, P(X <= 1) = (C(4,0) + C(4,1)) / 2^4 = 5/16, two-sided 10/16
    assert cp.mcnemar_exact_p(1, 3) == pytest.approx(0.625)
    assert cp.mcnemar_exact_p(3, 1) == pytest.approx(0.625)
    assert cp.mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert cp.mcnemar_exact_p(0, 0) == 1.0 and cp.mcnemar_exact_p(4, 4) == 1.0
    # b=2, c=10: 2 * (1 + 12 + 66) / 4096
    assert cp.mcnemar_exact_p(2, 10) == pytest.approx(2 * 79 / 4096)


def test_bootstrap_interval_degenerate_and_normal_limit():
    same = np.array([True, False, True, True])
    assert cp.bootstrap_diff_interval(same, same) == (0.0, 0.0)
    # N = 4000 pictures: 400 only A right, 200 only B right. The difference of paired proportions
    # has sd sqrt(((b + c)/N - diff^2) / N); the percentile interval is close to +-1.96 sd.
    n, b, c = 4000, 400, 200
    ca = np.zeros(n, bool)
    cb = np.zeros(n, bool)
    ca[:b] = True
    cb[b:b + c] = True
    ca[b + c:b + c + 2000] = cb[b + c:b + c + 2000] = True
    diff = (b - c) / n
    sd = math.sqrt(((b + c) / n - diff ** 2) / n)
    lo, hi = cp.bootstrap_diff_interval(ca, cb, resamples=20000)
    assert lo == pytest.approx(diff - 1.96 * sd, abs=0.0015)
    assert hi == pytest.approx(diff + 1.96 * sd, abs=0.0015)
    assert cp.bootstrap_diff_interval(ca, cb, seed=3) == cp.bootstrap_diff_interval(ca, cb, seed=3)


def test_t_interval_and_two_level_bootstrap():
    lo, hi = cp.t_interval([0.01, 0.03, 0.02])  # mean 0.02, sd 0.01, t(0.975, 2) = 4.303
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert lo == pytest.approx(0.02 - half, rel=1e-5) and hi == pytest.approx(0.02 + half, rel=1e-5)
    assert cp.t_interval([0.5]) is None
    d = np.zeros((4, 50))
    d[:, :10] = 1  # every seed: A right on 10 more pictures of 50
    lo, hi = cp.two_level_bootstrap(d, resamples=2000)
    assert lo < 0.2 < hi and lo > 0.0  # the pictures vary, the seeds agree


def fake_results(path: Path, classes, keys, labels, linear, knn, *, seed=None, dataset="d",
                 skipped=0, sha="s") -> Path:
    """A probe results.json holding only what compare_probes reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "linear_top1": float(np.mean(np.array(linear) == np.array(labels))),
        "knn_top1": float(np.mean(np.array(knn) == np.array(labels))),
        "checkpoint": {"train_seed": seed},
        "test_predictions": {"dataset": dataset, "manifest_sha256": sha, "classes": classes,
                             "skipped_files": skipped, "label": list(labels),
                             "class_position": [k[1] for k in keys], "linear": list(linear),
                             "knn": list(knn)}}))
    return path


def test_pairs_by_picture_and_counts_by_hand(tmp_path, capsys):
    """A: 10 pictures, 7 linear-correct; B: the same 10 (in another order) + 3 more, 5 correct
    on the common ones: b = 3 (only A), c = 1 (only B)."""
    classes = ["x", "y"]
    keys = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
    labels = [k[0] for k in keys]
    a_ok = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    b_ok = [1, 1, 1, 0, 0, 0, 1, 1, 0, 0]  # both: 0,1,2,6; A only: 3,4,5; B only: 7
    wrong = lambda y: 1 - y  # noqa: E731
    a_lin = [y if ok else wrong(y) for y, ok in zip(labels, a_ok)]
    b_lin = [y if ok else wrong(y) for y, ok in zip(labels, b_ok)]
    perm = [9, 3, 0, 7, 1, 5, 2, 8, 4, 6]
    b_keys = [keys[i] for i in perm] + [(0, 5), (1, 5), (1, 6)]
    b_labels = [labels[i] for i in perm] + [0, 1, 1]
    b_pred = [b_lin[i] for i in perm] + [0, 1, 1]  # extra pictures: ignored by the pairing
    a = fake_results(tmp_path / "a" / "results.json", classes, keys, labels, a_lin, labels)
    b = fake_results(tmp_path / "b.json", classes, b_keys, b_labels, b_pred, b_labels)
    res = cp.compare([tmp_path / "a"], [b], resamples=2000)
    s = res["pairs"][0]["linear"]
    assert s["pairs"] == 10 and s["acc_a"] == pytest.approx(0.7) and s["acc_b"] == pytest.approx(0.5)
    assert s["diff"] == pytest.approx(0.2)
    assert (s["both_right"], s["a_only"], s["b_only"], s["both_wrong"]) == (4, 3, 1, 2)
    assert s["mcnemar_p"] == pytest.approx(0.625)
    assert s["ci95"][0] <= 0.2 <= s["ci95"][1] and -1 <= s["ci95"][0] and s["ci95"][1] <= 1
    assert res["pairs"][0]["knn"]["diff"] == 0.0  # both kNNs always right

    assert cp.main([str(a), str(b), "--json", str(tmp_path / "cmp.json"), "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    assert "A 70.00%  B 50.00%  A-B +20.00 points" in out and "10 pairs" in out
    assert "McNemar exact p = 0.625" in out and "paired bootstrap" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["pairs"][0]["linear"]["a_only"] == 3 and "hardware" in saved


def test_several_seeds_pair_by_seed_and_summarise(tmp_path, capsys):
    classes = ["x", "y"]
    keys = [(0, i) for i in range(5)] + [(1, i) for i in range(5)]
    labels = [k[0] for k in keys]
    for s, (na, nb) in enumerate([(8, 6), (7, 7), (9, 6)]):  # correct counts of A and B per seed
        fake_results(tmp_path / f"a_s{s}.json", classes, keys, labels,
                     [y if i < na else 1 - y for i, y in enumerate(labels)], labels, seed=s)
        # B's files carry the seeds in reverse name order: pairing must follow the seed
        fake_results(tmp_path / f"b_s{2 - s}.json", classes, keys, labels,
                     [y if i < nb else 1 - y for i, y in enumerate(labels)], labels, seed=s)
    res = cp.compare(cp.expand(str(tmp_path / "a_s*.json"), "A"),
                     cp.expand(str(tmp_path / "b_s*.json"), "B"), resamples=1000)
    assert [p["linear"]["diff"] for p in res["pairs"]] == pytest.approx([0.2, 0.0, 0.3])
    sm = res["summary"]["linear"]
    assert sm["mean_diff"] == pytest.approx(0.5 / 3) and sm["sd_diff"] == pytest.approx(0.152753, rel=1e-4)
    lo, hi = sm["ci95_t_over_seeds"]
    assert lo < sm["mean_diff"] < hi
    assert "ci95_two_level_bootstrap" in sm
    assert cp.main([str(tmp_path / "a_s*.json"), str(tmp_path / "b_s*.json")]) == 0
    assert "over 3 seed pairs" in capsys.readouterr().out


def test_refuses_what_cannot_be_paired_in_one_line(tmp_path, capsys):
    keys = [(0, 0), (1, 0)]
    a = fake_results(tmp_path / "a.json", ["x", "y"], keys, [0, 1], [0, 1], [0, 1])
    other_classes = fake_results(tmp_path / "c.json", ["x", "z"], keys, [0, 1], [0, 1], [0, 1])
    disjoint = fake_results(tmp_path / "d.json", ["x", "y"], [(0, 5), (1, 5)], [0, 1], [0, 1], [0, 1])
    lossy = fake_results(tmp_path / "e.json", ["x", "y"], keys, [0, 1], [0, 1], [0, 1], skipped=2, sha="t")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"linear_top1": 0.5}))
    cases = [(other_classes, "different classes"), (disjoint, "no test picture in common"),
             (lossy, "--skip-bad"), (old, "no per-picture test predictions"),
             (tmp_path / "missing.json", "no such probe result")]
    for b, why in cases:
        assert cp.main([str(a), str(b)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and why in err and "Traceback" not in err
    three = [str(a)] * 2
    assert cp.main([",".join(three), str(a)]) == 2
    assert "one B per A" in capsys.readouterr().err


# --------------------------------------------------------------------------- probe.py identity

def test_class_positions_and_split_rows():
    labels = np.array([2, 0, 2, 1, 0, 0])
    assert class_positions(labels, 3).tolist() == [0, 0, 1, 0, 1, 2]
    rows = split_rows(labels, "train", num_classes=3, batch_size=4, seed=0, max_images=None,
                            per_class=[2, 1, 1])
    assert rows.tolist() == [0, 1, 3, 4]  # first 2 of class 0, first of classes 1 and 2
    sub = split_rows(labels, "train", num_classes=3, batch_size=4, seed=7, max_images=3, per_class=None)
    assert len(sub) == 3 and len(set(sub.tolist())) == 3  # a seeded subset


SIDE = 16


def picture(uid: int, noise: int = 0) -> np.ndarray:
    """A picture that carries its id: pixel (0, 0) holds uid, the rest a class-free pattern."""
    g = np.random.default_rng(uid)
    x = g.integers(0, 256, (SIDE, SIDE, 3)).astype(np.int64)
    x = np.clip(x + noise, 0, 255)
    x[0, 0] = [uid % 256, uid // 256, 7]
    return x.astype(np.uint8)


def write_folder(root: Path, layout: dict, name_fmt: str, noise: int) -> None:
    """layout: split -> class -> picture ids in order; files named so their name order is that
    order (``name_fmt`` differs between the copies, as 00000.png vs 0000.jpg do)."""
    for split, per_class in layout.items():
        for cls, ids in per_class.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for k, uid in enumerate(ids):
                Image.fromarray(picture(uid, noise)).save(d / name_fmt.format(k))


def test_probe_pairs_two_copies_picture_by_picture(tmp_path):
    """'orig' holds the first pictures of each class; 'copy' holds the same pictures (perturbed,
    like a lossy re-encoding) at the same positions, and more. probe.py --test-like restricts the
    copy's test split to orig's pictures; compare_probes pairs them; every pair is checked to be
    one picture (by the id it carries) and the counts are recomputed by hand."""
    rng = np.random.default_rng(0)
    ids = iter(rng.permutation(10_000).tolist())
    train = {c: [next(ids) for _ in range(12)] for c in ("ant", "bee", "cow")}
    test_copy = {c: [next(ids) for _ in range(n)] for c, n in (("ant", 9), ("bee", 7), ("cow", 8))}
    test_orig = {c: v[:n] for (c, v), n in zip(test_copy.items(), (4, 6, 3))}
    write_folder(tmp_path / "orig_src", {"train": train, "test": test_orig}, "{:05d}.png", 0)
    write_folder(tmp_path / "copy_src", {"train": train, "test": test_copy}, "{:04d}.png", 3)
    data = tmp_path / "data"
    for name in ("orig", "copy"):
        run_tool("tools/convert_datasets.py", str(tmp_path / f"{name}_src"), "--name", name,
                 "--out", str(data), "--formats", "memory", "--no-progress")
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", data / "orig",
                           patch={"patch_size": 8, "out_size": 16})
    fast = ["--num-patches", "2", "--probe-epochs", "3", "--device", "cpu", "--quiet", "--no-plots"]
    run_tool("probe.py", "--checkpoint", str(ckpt), "--data", str(data / "orig"),
             "--out", str(tmp_path / "p_orig"), *fast)
    run_tool("probe.py", "--checkpoint", str(ckpt), "--data", str(data / "copy"),
             "--out", str(tmp_path / "p_copy"), "--test-like", str(data / "orig"), *fast)
    ro = json.loads((tmp_path / "p_orig" / "results.json").read_text())
    rc = json.loads((tmp_path / "p_copy" / "results.json").read_text())
    assert ro["num_test"] == 13 and rc["num_test"] == 13  # copy: only orig's 13 pictures
    assert rc["dataset"]["test_like"] == str(data / "orig")

    # By hand: which picture each prediction is about, read from the pixels of the rows.
    def by_picture(r, root):
        x = np.load(root / "test.u8.npy")
        tp = r["test_predictions"]
        uid = [int(x[row, 0, 0, 0]) + 256 * int(x[row, 0, 0, 1]) for row in tp["row"]]
        return {u: (lab, lin, kn) for u, lab, lin, kn in zip(uid, tp["label"], tp["linear"], tp["knn"])}

    po, pc = by_picture(ro, data / "orig"), by_picture(rc, data / "copy")
    assert set(po) == set(pc) == {u for v in test_orig.values() for u in v}
    common = sorted(po)
    a_ok = np.array([po[u][1] == po[u][0] for u in common])
    b_ok = np.array([pc[u][1] == pc[u][0] for u in common])
    assert a_ok.mean() == pytest.approx(ro["linear_top1"]) and b_ok.mean() == pytest.approx(rc["linear_top1"])

    res = cp.compare([tmp_path / "p_orig"], [tmp_path / "p_copy"], resamples=500)
    s = res["pairs"][0]["linear"]
    b, c = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    assert s["pairs"] == 13 and (s["a_only"], s["b_only"]) == (b, c)
    assert s["diff"] == pytest.approx(a_ok.mean() - b_ok.mean())
    assert s["mcnemar_p"] == pytest.approx(min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)))

    # Without --test-like the copy is probed on all 24 of its pictures; the pairing still finds 13.
    run_tool("probe.py", "--checkpoint", str(ckpt), "--data", str(data / "copy"),
             "--out", str(tmp_path / "p_all"), *fast)
    assert json.loads((tmp_path / "p_all" / "results.json").read_text())["num_test"] == 24
    assert cp.compare([tmp_path / "p_orig"], [tmp_path / "p_all"], resamples=500)["pairs"][0]["linear"]["pairs"] == 13

    bad = run_tool("probe.py", "--checkpoint", str(ckpt), "--data", str(data / "copy"), "--out",
                   str(tmp_path / "p_bad"), "--test-like", str(tmp_path / "nowhere"), *fast, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nowhere" in bad.stderr
