"""Compare two probe results paired on the same test pictures: accuracies, difference, 95% interval.

    python tools/compare_probes.py A B [--json OUT]
    python tools/compare_probes.py 'runs/lossless_s*/probe' 'runs/jpeg_s*/probe'   # several seeds

A and B are probe.py outputs (a results.json or the directory holding it). Each holds the linear
and kNN prediction of every test picture with the picture's identity (class, position within the
class: the k-th image of the class in the converted split's order), so two probes pair on the
pictures they share: the same dataset, or two copies of one dataset kept in the same order, such
as the shared lossless and JPEG CIFAR-10 (the k-th file of a class is the same picture in both).
Results that cannot be paired (no predictions, different classes, no common picture, positions
shifted by skipped files) are refused in one line.

Per pair of results, on the N common pictures, for each metric (linear, kNN):

    acc_A, acc_B, diff = acc_A - acc_B
    95% interval of diff: paired bootstrap (percentile; R resamples of the N pictures, with
        replacement, each picture carrying both of its predictions; seeded, so reproducible)
    exact McNemar test: b = pictures only A gets right, c = only B; two-sided
        p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))

With several results per side (glob patterns or comma lists) they are paired by the training
seed recorded in each result (in order when a side has none), and the summary adds the mean of
the per-seed differences with two intervals: Student's t over the seeds (training noise, on
these N pictures) and a two-level bootstrap that resamples seeds and pictures together
(training noise and the finite test set).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.errors import UserError  # noqa: E402
from pipeline.formats import write_json_atomic  # noqa: E402

METRICS = ("linear", "knn")
RESAMPLES = 10_000
LEVEL = 0.95


@dataclass
class Predictions:
    """One probe's test predictions, keyed by picture."""

    path: Path
    dataset: str
    manifest_sha256: str
    classes: list[str]
    keys: np.ndarray  # int64 (N,): class * KEY_STRIDE + position within class
    label: np.ndarray  # int64 (N,)
    pred: dict[str, np.ndarray]  # metric -> int64 (N,)
    skipped_files: int
    train_seed: int | None
    reported: dict[str, float]  # the accuracies results.json states (all its test pictures)
    num_test: int


KEY_STRIDE = 1 << 32


def results_file(path: Path | str) -> Path:
    path = Path(path)
    return path / "results.json" if path.is_dir() else path


def load_predictions(path: Path | str, label: str = "A") -> Predictions:
    """Read a probe result; UserError (one line) when it holds no usable per-picture predictions."""
    f = results_file(path)
    try:
        r = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"{label} {path}: no such probe result (a probe.py results.json or its "
                        f"directory)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{label} {f}: not a readable JSON file ({e})") from None
    tp = r.get("test_predictions") if isinstance(r, dict) else None
    if not isinstance(tp, dict):
        raise UserError(f"{label} {f}: holds no per-picture test predictions (written by an older "
                        f"probe.py?); re-run probe.py on its checkpoint")
    try:
        cls = np.asarray(tp["label"], dtype=np.int64)
        pos = np.asarray(tp["class_position"], dtype=np.int64)
        pred = {m: np.asarray(tp[m], dtype=np.int64) for m in METRICS}
        classes = [str(c) for c in tp["classes"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{label} {f}: malformed test_predictions ({e}); re-run probe.py") from None
    if not (len(cls) == len(pos) == len(pred["linear"]) == len(pred["knn"])) or len(cls) == 0:
        raise UserError(f"{label} {f}: test_predictions lists differ in length or are empty; "
                        f"re-run probe.py")
    keys = cls * KEY_STRIDE + pos
    if len(np.unique(keys)) != len(keys):
        raise UserError(f"{label} {f}: a test picture appears twice; re-run probe.py")
    seed = (r.get("checkpoint") or {}).get("train_seed")
    return Predictions(path=f, dataset=str(tp.get("dataset", "?")),
                       manifest_sha256=str(tp.get("manifest_sha256", "")), classes=classes,
                       keys=keys, label=cls, pred=pred, skipped_files=int(tp.get("skipped_files", 0)),
                       train_seed=seed if isinstance(seed, int) else None,
                       reported={"linear": r.get("linear_top1"), "knn": r.get("knn_top1")},
                       num_test=len(cls))


def pair(a: Predictions, b: Predictions) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Correctness of A and B on their common pictures: ({metric: bool (N,)}, same for B,
    keys (N,) sorted). Refuses (UserError) what cannot be paired."""
    if a.classes != b.classes:
        raise UserError(f"{a.path} and {b.path}: different classes ({len(a.classes)} vs "
                        f"{len(b.classes)}, or another order); they were not probed on copies of one "
                        f"dataset")
    if (a.skipped_files or b.skipped_files) and a.manifest_sha256 != b.manifest_sha256:
        bad = a.path if a.skipped_files else b.path
        raise UserError(f"{bad}: its dataset was converted with --skip-bad and lost files, so "
                        f"positions within a class no longer name the same pictures as in the "
                        f"other dataset; compare probes of one dataset, or re-convert without losses")
    keys, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    if len(keys) == 0:
        raise UserError(f"{a.path} and {b.path}: no test picture in common (different splits or "
                        f"disjoint subsets); probe both on the same pictures (see probe.py --test-like)")
    if not np.array_equal(a.label[ia], b.label[ib]):  # cannot happen: the class is part of the key
        raise UserError(f"{a.path} and {b.path}: labels disagree on common pictures")
    ca = {m: a.pred[m][ia] == a.label[ia] for m in METRICS}
    cb = {m: b.pred[m][ib] == b.label[ib] for m in METRICS}
    return ca, cb, keys


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the b + c discordant pictures split
    Binomial(b + c, 1/2); p = min(1, 2 P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def bootstrap_diff_interval(ca: np.ndarray, cb: np.ndarray, *, resamples: int = RESAMPLES,
                            seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of acc_A - acc_B over ``resamples`` paired bootstrap resamples of the
    pictures. A resample of N pictures only needs how many of each kind it draws (both right,
    A only, B only, both wrong): one multinomial draw per resample."""
    n = len(ca)
    d = ca.astype(np.int64) - cb.astype(np.int64)  # +1: A only, -1: B only, 0: agree
    counts = np.array([(d == 1).sum(), (d == -1).sum(), (d == 0).sum()])
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # (R, 3)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def compare_pair(ca: np.ndarray, cb: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The statistics of one metric on N paired pictures (accuracies as fractions)."""
    n = len(ca)
    b, c = int((ca & ~cb).sum()), int((~ca & cb).sum())
    lo, hi = bootstrap_diff_interval(ca, cb, resamples=resamples, seed=seed)
    return {"pairs": n, "acc_a": float(ca.mean()), "acc_b": float(cb.mean()),
            "diff": float(ca.mean() - cb.mean()), "ci95": [lo, hi],
            "both_right": int((ca & cb).sum()), "a_only": b, "b_only": c,
            "both_wrong": int((~ca & ~cb).sum()), "mcnemar_p": mcnemar_exact_p(b, c)}


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``values`` (None for fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    half = t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def two_level_bootstrap(d: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean difference when seeds and pictures are both resampled.

    ``d`` (K, N): per seed pair k and common picture j, correct_A - correct_B. A resample draws
    K seeds and N pictures with replacement (the same pictures for every seed: they share the
    test set) and takes the mean of d over them: v^T d w with multinomial weights v, w."""
    k, n = d.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for i in range(0, resamples, 1000):  # (r, K) @ (K, N) -> (r, N), bounded memory
        r = min(1000, resamples - i)
        v = rng.multinomial(k, np.full(k, 1 / k), size=r) / k  # (r, K)
        w = rng.multinomial(n, np.full(n, 1 / n), size=r) / n  # (r, N)
        out[i:i + r] = ((v @ d) * w).sum(1)
    lo, hi = np.quantile(out, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def expand(arg: str, label: str) -> list[Path]:
    """A side's results: a path, a glob pattern or a comma list of either."""
    out = []
    for part in [x for x in arg.split(",") if x]:
        hits = sorted({Path(h) for h in glob.glob(part)}, key=_natural_key) if glob.has_magic(part) else [Path(part)]
        if not hits:
            raise UserError(f"{label} {part}: matches no probe result")
        out += hits
    if not out:
        raise UserError(f"{label}: no probe result given")
    return out


def match_seeds(a: list[Predictions], b: list[Predictions]) -> list[tuple[Predictions, Predictions]]:
    """Pairs of results: by training seed when every result records a distinct one, else in order."""
    if len(a) != len(b):
        raise UserError(f"A has {len(a)} results and B {len(b)}; give one B per A (paired by seed)")
    if len(a) == 1:
        return [(a[0], b[0])]
    seeds_a, seeds_b = [p.train_seed for p in a], [p.train_seed for p in b]
    if None in seeds_a or None in seeds_b or len(set(seeds_a)) < len(a) or len(set(seeds_b)) < len(b):
        return list(zip(a, b))
    by_seed = {p.train_seed: p for p in b}
    if set(seeds_a) != set(by_seed):
        raise UserError(f"A's training seeds {sorted(seeds_a)} are not B's {sorted(by_seed)}; "
                        f"give results of the same seeds")
    return [(p, by_seed[p.train_seed]) for p in a]


def compare(a_paths: list[Path], b_paths: list[Path], *, resamples: int = RESAMPLES,
            seed: int = 0) -> dict:
    """Everything compare_probes prints, as a dict (fractions; the JSON it writes)."""
    a = [load_predictions(p, "A") for p in a_paths]
    b = [load_predictions(p, "B") for p in b_paths]
    pairs, per_metric_d, keys0 = [], {m: [] for m in METRICS}, None
    for pa, pb in match_seeds(a, b):
        ca, cb, keys = pair(pa, pb)
        row = {"a": str(pa.path), "b": str(pb.path), "a_dataset": pa.dataset, "b_dataset": pb.dataset,
               "train_seed_a": pa.train_seed, "train_seed_b": pb.train_seed,
               "a_num_test": pa.num_test, "b_num_test": pb.num_test}
        for m in METRICS:
            row[m] = compare_pair(ca[m], cb[m], resamples=resamples, seed=seed)
            per_metric_d[m].append(ca[m].astype(np.int64) - cb[m].astype(np.int64))
        pairs.append(row)
        keys0 = keys if keys0 is None else (keys0 if np.array_equal(keys0, keys) else False)
    out = {"method": {"interval": f"paired bootstrap percentile, {resamples} resamples, seed {seed}",
                      "test": "exact McNemar (two-sided binomial on the discordant pictures)",
                      "level": LEVEL, "pairing": "test picture = (class, position within class)"},
           "pairs": pairs}
    if len(pairs) > 1:
        summary = {"seeds": len(pairs)}
        for m in METRICS:
            diffs = [p[m]["diff"] for p in pairs]
            s = {"mean_acc_a": float(np.mean([p[m]["acc_a"] for p in pairs])),
                 "mean_acc_b": float(np.mean([p[m]["acc_b"] for p in pairs])),
                 "sd_acc_a": float(np.std([p[m]["acc_a"] for p in pairs], ddof=1)),
                 "sd_acc_b": float(np.std([p[m]["acc_b"] for p in pairs], ddof=1)),
                 "mean_diff": float(np.mean(diffs)), "sd_diff": float(np.std(diffs, ddof=1)),
                 "ci95_t_over_seeds": list(t_interval(diffs))}
            if keys0 is not False:  # every pair on the same pictures: resample both levels
                s["ci95_two_level_bootstrap"] = list(two_level_bootstrap(
                    np.stack(per_metric_d[m]), resamples=resamples, seed=seed))
            summary[m] = s
        out["summary"] = summary
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def format_report(res: dict) -> str:
    lines = []
    for p in res["pairs"]:
        seed = f" (seed {p['train_seed_a']})" if p["train_seed_a"] is not None else ""
        lines.append(f"A{seed}: {p['a']}  [{p['a_dataset']}, {p['a_num_test']} test pictures]")
        lines.append(f"B{seed}: {p['b']}  [{p['b_dataset']}, {p['b_num_test']} test pictures]")
        for m in METRICS:
            s = p[m]
            lines.append(f"  {m:<6} A {_pct(s['acc_a'])}  B {_pct(s['acc_b'])}  A-B {_pts(s['diff'])} "
                         f"points, 95% CI [{_pts(s['ci95'][0])}, {_pts(s['ci95'][1])}], "
                         f"{s['pairs']} pairs; McNemar exact p = {s['mcnemar_p']:.3g} "
                         f"(only A right {s['a_only']}, only B right {s['b_only']})")
    if "summary" in res:
        sm = res["summary"]
        lines.append(f"over {sm['seeds']} seed pairs:")
        for m in METRICS:
            s = sm[m]
            t = s["ci95_t_over_seeds"]
            extra = ""
            if "ci95_two_level_bootstrap" in s:
                lo, hi = s["ci95_two_level_bootstrap"]
                extra = f"; seeds + pictures bootstrap [{_pts(lo)}, {_pts(hi)}]"
            lines.append(f"  {m:<6} A {_pct(s['mean_acc_a'])} (sd {100 * s['sd_acc_a']:.2f})  "
                         f"B {_pct(s['mean_acc_b'])} (sd {100 * s['sd_acc_b']:.2f})  mean A-B "
                         f"{_pts(s['mean_diff'])} points, 95% CI t over seeds [{_pts(t[0])}, "
                         f"{_pts(t[1])}]{extra}")
    lines.append(f"interval: {res['method']['interval']}; test: {res['method']['test']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("a", help="probe result(s) A: results.json, its directory, a glob or a comma list")
    p.add_argument("b", help="probe result(s) B, paired with A's by training seed")
    p.add_argument("--json", type=Path, help="also write the comparison to this JSON file")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    a = p.parse_args(argv)
    try:
        if a.resamples < 100:
            raise UserError(f"--resamples {a.resamples}: use at least 100")
        res = compare(expand(a.a, "A"), expand(a.b, "B"), resamples=a.resamples, seed=a.seed)
    except UserError as e:
        print(f"compare_probes: error: {e}", file=sys.stderr)
        return 2
    print(format_report(res))
    if a.json:
        from benchmarks.common import environment

        write_json_atomic(a.json, {**res, **environment()})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
