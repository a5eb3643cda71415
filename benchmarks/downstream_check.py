"""Downstream check: the exported encoder, loaded through torchvision and torch.hub, gives
probe.py's features, and a scikit-learn classifier on them beats a random-init encoder's.

    python benchmarks/downstream_check.py [--run runs/demo] [--data data/cifar10]

Needs a trained run (``make demo`` leaves ``runs/demo/ckpt.pt``). In one run it
1. exports the checkpoint (``emp_ssl.export_checkpoint``, what ``tools/export.py`` does);
2. runs probe.py's protocol on the two feature kinds (``backbone``, the pooled ResNet feature;
   ``pre_projector``, the probe's default), for the trained encoder and for a random-init one of
   the same architecture (probe seed), caching the features as probe.py does;
3. embeds the same train and test pictures with ``emp_ssl.embed``: the backbone feature through
   torchvision's ``resnet18`` loaded from the export, the pre-projector feature through the
   export's own module (``load_backbone``; torchvision has no projector block), both also through
   ``torch.hub.load(..., source="local")``, and compares them with probe.py's cached features
   (max |difference|, fp32 tolerance);
4. fits scikit-learn's LogisticRegression (as the README's snippet does) on them and on the
   random-init encoder's features, and compares the two on the same test pictures (exact
   McNemar, paired bootstrap 95% interval, Wilson intervals per accuracy).
Writes ``benchmarks/results/downstream_check_<host>_<date>.json``; exits 1 when features differ
beyond the tolerance or, on the probe's default feature, the trained encoder does not beat
random init with p < 0.01.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, results_path, write_json  # noqa: E402
from benchmarks.runner import portable  # noqa: E402

import torch  # noqa: E402

import probe  # noqa: E402
from emp_ssl.embedding import embed  # noqa: E402
from emp_ssl.export import export_checkpoint, load_backbone, torchvision_resnet18  # noqa: E402
from model.checkpoint import CheckpointError  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.sources.memory import load_memory_arrays  # noqa: E402
from tools.compare_probes import compare_pair  # noqa: E402

ATOL = 1e-4  # fp32 rounding of two implementations of the same convolutions, features ~O(1)
META_KEYS = ("patch_size", "out_size", "mean", "std", "augment")
FEATURES = ("backbone", "pre_projector")  # the torchvision model has no projector block


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def probe_feature(args, work: Path, feature: str, random_init: bool):
    """probe.py's protocol on one feature kind; returns (cfg, dataset, results,
    {split: SplitFeatures}) with the features read back from probe.py's cache."""
    kind = f"{feature}-{'random-init' if random_init else 'trained'}"
    argv = ["--checkpoint", str(args.run / "ckpt.pt"), "--data", str(args.data),
            "--feature", feature, "--num-patches", str(args.num_patches),
            "--probe-epochs", str(args.probe_epochs), "--seed", str(args.seed),
            "--out", str(work / f"probe-{kind}"), "--cache-dir", str(work / f"features-{kind}"),
            "--device", args.device, "--no-plots", "--quiet"]
    if args.max_train_images:
        argv += ["--max-train-images", str(args.max_train_images)]
    if random_init:
        argv.append("--random-init")
    cfg, _ = probe.resolve_config(argv)
    results = probe.run(cfg)  # extracts and caches the features, trains the linear probe
    device = torch.device(cfg.device)
    loaded = probe.load_model(cfg.checkpoint, random_init=random_init, seed=cfg.seed, device=device)
    ds = probe.open_dataset(cfg.data, test_split=cfg.test_split, patch_size=loaded.patch_size,
                            flag="--data", trained_classes=loaded.data.get("classes"),
                            checkpoint_data=loaded.data)
    feats = {split: probe.split_features(loaded, ds, split, cfg, device)
             for split in (ds.train_split, ds.test_split)}
    assert all(f.cached for f in feats.values()), "probe.py's feature cache was not reused"
    return cfg, ds, results, feats


def logistic(train_x, train_y, test_x, seed: int):
    """The README snippet's classifier: scikit-learn's LogisticRegression on the raw features."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y).predict(test_x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run dir with ckpt.pt")
    p.add_argument("--data", type=Path, default=Path("data/cifar10"), help="converted dataset")
    p.add_argument("--num-patches", type=int, default=8, help="patches per image (demo's CPU probe: 8)")
    p.add_argument("--probe-epochs", type=int, default=30, help="probe.py's linear probe epochs")
    p.add_argument("--max-train-images", type=int, default=20000, help="train images (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="probe seed (patches, random init)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/)")
    args = p.parse_args(argv)
    ckpt = args.run / "ckpt.pt"
    if not ckpt.is_file():
        print(f"downstream_check: error: {ckpt} not found; run `make demo` first or pass --run",
              file=sys.stderr)
        return 2
    work = args.run / "downstream"
    t0 = time.perf_counter()
    try:
        export_dir = export_checkpoint(ckpt, work / "export")
        probes = {(f, r): probe_feature(args, work, f, r) for f in FEATURES for r in (False, True)}
    except (UserError, CheckpointError) as e:
        print(f"downstream_check: error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()

    cfg, ds, trained, _ = probes[("backbone", False)]
    device = torch.device(cfg.device)
    ours = load_backbone(export_dir, device=device)  # the export's own module (+ projector block)
    meta = {k: ours.emp_ssl_meta[k] for k in META_KEYS}
    hub = torch.hub.load(str(ROOT), "emp_ssl_resnet18", source="local", weights=str(export_dir),
                         device=device)
    loaders = {"backbone": ("torchvision", torchvision_resnet18(export_dir, device=device)),
               "pre_projector": ("load_backbone", ours)}
    tr, te = ds.train_split, ds.test_split
    images = {split: load_memory_arrays(ds.root, split)[0] for split in (tr, te)}
    sections, ok_eq, ok_win = {}, True, {}
    for feature in FEATURES:
        name, module = loaders[feature]
        _, _, res_t, feats = probes[(feature, False)]
        _, _, res_r, rand_feats = probes[(feature, True)]
        equality, embedded = {}, {}
        for split, sf in feats.items():
            common = dict(rows=sf.rows, num_patches=cfg.num_patches, feature=feature, seed=cfg.seed,
                          split=split, amp=cfg.amp, device=device, **meta)
            embedded[split] = embed(images[split], module, **common).cpu()
            cached = sf.features.cpu()
            row = {"pictures": len(sf.rows),
                   f"{name}_vs_probe_cache_max_abs": float((embedded[split] - cached).abs().max()),
                   "feature_scale_max_abs": float(cached.abs().max())}
            if split == te:  # torch.hub: the same module class, so the test split is enough
                row["hub_vs_probe_cache_max_abs"] = float(
                    (embed(images[split], hub, **common).cpu() - cached).abs().max())
            row["equal_to_fp32_rounding"] = all(v <= ATOL for k, v in row.items()
                                                if k.endswith("_vs_probe_cache_max_abs"))
            ok_eq &= row["equal_to_fp32_rounding"]
            equality[split] = row
        y_tr, y_te = feats[tr].labels.cpu().numpy(), feats[te].labels.cpu().numpy()
        assert np.array_equal(y_te, rand_feats[te].labels.cpu().numpy())
        ct = logistic(embedded[tr].numpy(), y_tr, embedded[te].numpy(), args.seed) == y_te
        cr = logistic(rand_feats[tr].features.cpu().numpy(), y_tr,
                      rand_feats[te].features.cpu().numpy(), args.seed) == y_te
        paired = compare_pair(ct, cr, seed=args.seed)
        ok_win[feature] = paired["diff"] > 0 and paired["mcnemar_p"] < 0.01
        n = len(y_te)
        sections[feature] = {
            "loaded_through": name, "dim": int(embedded[te].shape[1]),
            "train_images": len(y_tr), "test_images": n,
            "feature_equality": {"tolerance_abs": ATOL, **equality},
            "sklearn_logistic_regression": {
                "trained_top1": float(ct.mean()), "trained_top1_wilson95": wilson(int(ct.sum()), n),
                "random_init_top1": float(cr.mean()),
                "random_init_top1_wilson95": wilson(int(cr.sum()), n), "paired": paired},
            "probe_py_linear_top1": {"trained": res_t["linear_top1"], "random_init": res_r["linear_top1"]},
        }
    t2 = time.perf_counter()

    result = {
        **environment(),
        "what": "export -> torchvision / the export's module / torch.hub -> emp_ssl.embed -> "
                "scikit-learn LogisticRegression, against a random-init encoder on the same pictures",
        "checkpoint": {"path": str(ckpt), "encoder": trained["checkpoint"].get("encoder"),
                       "git_commit": trained["checkpoint"].get("git_commit"),
                       "epoch": trained["checkpoint"].get("epoch"), "step": trained["checkpoint"].get("step")},
        "export": str(export_dir),
        "data": trained["dataset"],
        "protocol": {"num_patches": cfg.num_patches, "eval_mode": cfg.eval_mode, "amp": cfg.amp,
                     "seed": cfg.seed, "probe_epochs": cfg.probe_epochs,
                     "classifier": "scikit-learn LogisticRegression(max_iter=2000) on the raw features",
                     "random_init": "same architecture, weights drawn from the probe seed",
                     "interval": "paired bootstrap 95% of the difference; exact McNemar"},
        "features": sections,
        "timings_s": {"export_and_probes": t1 - t0, "embed_and_sklearn": t2 - t1},
        "passed": {"features_equal": ok_eq,
                   **{f"{f}_beats_random_init_p_lt_0.01": v for f, v in ok_win.items()}},
    }
    out = write_json(args.out or results_path("downstream_check"), portable(result))
    for feature, s in sections.items():
        eq, sk = s["feature_equality"], s["sklearn_logistic_regression"]
        diff = max(v for r in eq.values() if isinstance(r, dict) for k, v in r.items()
                   if k.endswith("_vs_probe_cache_max_abs"))
        pr = sk["paired"]
        print(f"{feature} ({s['loaded_through']} + torch.hub): max |diff| to probe.py's cache "
              f"{diff:.1e} (tolerance {ATOL:g}); LogisticRegression on {s['train_images']} / "
              f"{s['test_images']} pictures: trained {100 * sk['trained_top1']:.2f}% vs random init "
              f"{100 * sk['random_init_top1']:.2f}% ({100 * pr['diff']:+.2f} pts, 95% CI "
              f"{100 * pr['ci95'][0]:+.2f}..{100 * pr['ci95'][1]:+.2f}, McNemar p={pr['mcnemar_p']:.2g})")
    print(f"wrote {out}")
    return 0 if ok_eq and ok_win["pre_projector"] else 1


if __name__ == "__main__":
    sys.exit(main())
