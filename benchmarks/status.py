"""The README's status table, generated from committed result files (never typed by hand).

    python benchmarks/status.py            # print the table
    python benchmarks/status.py --write    # rewrite the block between the status markers in README.md

Each row: what the paper (or the reference README) reports, and ours, read from the named file
under benchmarks/results/ ("waiting for a GPU run" where none exists yet). tests/test_docs.py
fails when README.md's block differs from what this prints.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- status:begin (benchmarks/status.py --write) -->", "<!-- status:end -->"


def _load(rel: str) -> dict | None:
    path = RESULTS / rel
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _probe_pair(trained: str, random: str, compare: str | None = None) -> str:
    a, b = _load(trained), _load(random)
    if a is None or b is None:
        return "missing result file"
    out = (f"{_pct(a['linear_top1'])} vs {_pct(b['linear_top1'])} random init "
           f"({a['num_test']:,} test images)")
    if compare is not None:  # tools/compare_probes.py's paired test on the same pictures
        c = _load(compare)
        if c is None:
            return out + "; missing comparison file"
        out += _significance(c["pairs"][0]["linear"])
    return out


def _significance(pair: dict) -> str:
    lo, hi = pair["ci95"]
    verdict = "significant" if pair["mcnemar_p"] < 0.05 else "not significant"
    return (f"; {100 * pair['diff']:+.1f} pts, 95% CI {100 * lo:+.1f}..{100 * hi:+.1f}, "
            f"McNemar p={pair['mcnemar_p']:.2g} ({verdict})")


def _downstream(rel: str) -> str:
    d = _load(rel)
    if d is None:
        return "not recorded"
    parts, diffs = [], []
    for feature, s in d["features"].items():
        sk = s["sklearn_logistic_regression"]
        parts.append(f"{feature} ({s['loaded_through']}): {_pct(sk['trained_top1'])} vs "
                     f"{_pct(sk['random_init_top1'])} random init, McNemar p={sk['paired']['mcnemar_p']:.2g}")
        diffs += [v for r in s["feature_equality"].values() if isinstance(r, dict)
                  for k, v in r.items() if k.endswith("_vs_probe_cache_max_abs")]
    s = next(iter(d["features"].values()))
    return ("; ".join(parts) + f" ({s['train_images']:,} train / {s['test_images']:,} test images); "
            f"features = probe.py's (max diff {max(diffs):.0e})")


def _trained(rel: str, where: str) -> str:
    """The Setting cell of a probed run, read from its probe file: where it ran, the encoder's
    width and the training steps behind the checkpoint."""
    d = _load(rel)
    if d is None:
        return "missing result file"
    ck = d["checkpoint"]
    return f"{where}, width {ck['encoder']['width']}, {ck['step']:,} steps"


def _tta(rel: str, epoch: float) -> str:
    d = _load(rel)
    if d is None:
        return "missing result file"
    p = next(p for p in d["points"] if abs(p["epoch"] - epoch) < 1e-9)
    return f"{_pct(p['linear_top1'])} ({60 * p['train_minutes']:.0f} s of training)"


def _tests(rel: str, mode: str) -> str:
    d = _load(rel)
    if d is None or mode not in d:
        return "not recorded"
    r = d[mode]
    failed = r.get("failed", 0) + r.get("errors", 0)
    return (f"{r['passed']} passed, {r['skipped']} skipped" + (f", {failed} FAILED" if failed else "")
            + f", {r['wall_min']:.0f} min")


# (what, paper / reference, ours, data and where, result file)
ROWS = [
    ("CIFAR-10, 1 epoch, n=20", "84.2% (reference README)",
     lambda: _tta("accuracy_h100_20261122/time_to_accuracy_c10_n20_e1_sched2.json", 1.0),
     "H100, JPEG copy, 128-patch probe", "accuracy_h100_20261122/time_to_accuracy_c10_n20_e1_sched2.json"),
    ("CIFAR-10, 10 epochs, n=20", "90.7% (reference README)",
     lambda: _tta("accuracy_h100_20261122/time_to_accuracy_c10_n20_e10.json", 10.0),
     "H100, JPEG copy", "accuracy_h100_20261122/time_to_accuracy_c10_n20_e10.json"),
    ("CIFAR-10, 1 epoch, lossless pixels, beside the authors' code", "84.2% (reference README)",
     lambda: "waiting for a GPU run", "one GPU, lossless pixels, benchmarks/vs_reference.py", "-"),
    ("CIFAR-10 demo (`make demo`)", "-",
     lambda: _probe_pair("demo_cpu2_20261201/probe.json", "demo_cpu2_20261201/probe_random_init.json"),
     lambda: _trained("demo_cpu2_20261201/probe.json", "2-core CPU"), "demo_cpu2_20261201/"),
    ("Tiny ImageNet, 1 epoch / 10 epochs, n=20", "38.1% / 51.5% (paper)",
     lambda: "waiting for a GPU run (recipe smoke-tested)", "one GPU, benchmarks/accuracy_runs.py tiny steps",
     "tinyimagenet_recipe_smoke_cpu2_20261206/"),
    ("Tiny ImageNet, CPU demo scale", "-",
     lambda: _probe_pair("tinyimagenet_demo_cpu2_20261206/probe_tiny_s0.json",
                         "tinyimagenet_demo_cpu2_20261206/probe_tiny_s0.random_init.json",
                         "tinyimagenet_demo_cpu2_20261206/compare_tiny_s0_vs_random_init.json"),
     lambda: _trained("tinyimagenet_demo_cpu2_20261206/probe_tiny_s0.json", "200 classes"),
     "tinyimagenet_demo_cpu2_20261206/"),
    ("Imagewoof at 224 px (`imagenet100` preset), CPU scale", "-",
     lambda: _probe_pair("imagewoof224_demo_cpu2_20261206/probe_in100_s0.json",
                         "imagewoof224_demo_cpu2_20261206/probe_in100_s0.random_init.json",
                         "imagewoof224_demo_cpu2_20261206/compare_in100_s0_vs_random_init.json"),
     lambda: _trained("imagewoof224_demo_cpu2_20261206/probe_in100_s0.json", "10 classes"),
     "imagewoof224_demo_cpu2_20261206/"),
    ("Exported demo encoder via torchvision + scikit-learn (CIFAR-10)", "-",
     lambda: _downstream("downstream_check_cpu2_20261206.json"),
     "`make demo` encoder, exported", "downstream_check_cpu2_20261206.json"),
    ("Test suite, with `../shared` (CIFAR-10)", "-",
     lambda: _tests("test_suite_cpu2_20261206.json", "with_shared"), "2-core CPU, fresh clone; minutes of set-up + tests",
     "test_suite_cpu2_20261206.json"),
    ("Test suite, without `../shared`", "-",
     lambda: _tests("test_suite_cpu2_20261206.json", "without_shared"), "2-core CPU, fresh clone; minutes of set-up + tests",
     "test_suite_cpu2_20261206.json"),
]


def table() -> str:
    lines = ["| What | Paper / reference | Ours | Setting | Result file |", "|---|---|---|---|---|"]
    for what, paper, ours, setting, rel in ROWS:
        link = f"[{rel}](benchmarks/results/{rel})" if rel != "-" else "-"
        setting = setting() if callable(setting) else setting
        lines.append(f"| {what} | {paper} | {ours()} | {setting} | {link} |")
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[a:b].strip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite README.md's status block")
    a = p.parse_args(argv)
    t = table()
    if not a.write:
        print(t, end="")
        return 0
    sys.path.insert(0, str(ROOT))
    from pipeline.formats import write_bytes_atomic

    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"status: error: {README} has no status markers ({BEGIN} ... {END})", file=sys.stderr)
        return 2
    i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
    write_bytes_atomic(README, (text[:i] + "\n" + t + text[j:]).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
