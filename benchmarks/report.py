"""Collect benchmarks/results/**/*.json into one Markdown report with plots, and regenerate
the tables that docs/*.md quote.

    python benchmarks/report.py            # results/REPORT.md + plots, and every table in docs/*.md
    python benchmarks/report.py --check    # exit 1 naming each doc whose tables are stale (a test runs it)
    python benchmarks/report.py --results DIR --out FILE   # another results folder (docs untouched)

Every figure in the tables carries where (hardware) and when (date) it was measured, taken
from the JSON that holds it. Files are grouped by name (``GROUPS``: pipeline*, train_throughput*,
loss_and_model*, conversion*, convert_memory*, probe*, time_to_accuracy*, reencode*, compare*,
vs_reference*, lars_update*, startup*, monitor_cost*, augment_ops*, downstream_check*,
test_suite*, summary.json; train_<step>/env_* files of accuracy_runs.py are counted, not
tabulated; others are listed as unrecognised), and each named table (``VIEWS``) is drawn from
one group. REPORT.md has a section per table with rows; plots beside it: pipeline patches/s per
source, training patches/s per option, the fused loss's speed-up over the per-group loop, and
the authors' code vs ours.

A doc quotes a table as a generated block; the globs (relative to benchmarks/results/) pick
its files, and report.py rewrites what lies between the markers:

    <!-- report:begin seeds paired_cpu2_20261130/*/summary.json -->
    <!-- report:end -->
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.formats import save_figure_atomic, write_bytes_atomic  # noqa: E402


def where(d: dict) -> str:
    hw = d.get("hardware", {}) or {}
    name = hw.get("gpu") or hw.get("cpu_model") or "?"
    if not hw.get("gpu") and hw.get("nproc"):
        name = f"{name} ({hw['nproc']} cores)"
    return name


def when(d: dict, path: Path) -> str:
    """The file's own date, else the one its result name carries (`<what>_<device>_<YYYYMMDD>`)."""
    date = str(d.get("date", "") or "")[:10]
    if date:
        return date
    m = re.search(r"_(\d{4})(\d{2})(\d{2})(\.json)?$", _name(path).split("/")[0])
    return "-".join(m.groups()[:3]) if m else "?"


def _name(path: Path) -> str:
    """The path below benchmarks/results/ (the last folder named ``results``); elsewhere the
    file name with its folder."""
    parts = path.parts
    if "results" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("results")
        return "/".join(parts[i + 1:])
    return f"{path.parent.name}/{path.name}"


def _fmt(x, digits=0) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _rows_table(files, columns: list[str], align: str, cells, keep=lambda r: "patches_per_s" in r) -> list[str]:
    """A table of every row ``keep(row)`` accepts (default: rows with a ``patches_per_s``
    figure): ``cells(row)`` gives the first columns; hardware, date and file of the result it
    came from are appended."""
    out = ["| " + " | ".join(columns + ["hardware", "date", "file"]) + " |",
           "|" + "|".join(align) + "|---|---|---|"]
    for path, d in files:
        for r in d.get("rows", []):
            if keep(r):
                out.append("| " + " | ".join([*cells(r), where(d), when(d, path), _name(path)]) + " |")
    return out


def pipeline_table(files) -> list[str]:
    def cells(r):
        vs, share = r.get("vs_reference"), r.get("share_of_step")
        pps = r["patches_per_s"]
        return [r["source"], r["device"], str(r["n"]), _fmt(pps, 2 if pps < 100 else 0),
                _fmt(r.get("images_per_s", 0), 2 if pps < 100 else 0), f"{vs:.1f}x" if vs else "",
                f"{100 * share:.1f}%" if share is not None else ""]
    return _rows_table(files, ["source", "device", "n", "patches/s", "images/s", "vs reference",
                               "share of a serial step (--model-step)"],
                       ["---"] * 3 + ["---:"] * 4, cells)


def convert_memory_table(files) -> list[str]:
    def cells(r):
        return [r["converter"], f"{r['n']:,}", str(r["side"]), _fmt(r["peak_rss_main_mib"]),
                _fmt(r["peak_pss_tree_mib"]), _fmt(r["images_bytes_mib"]), _fmt(r["images_per_s"])]
    return _rows_table(files, ["converter", "images", "side", "peak RSS MiB", "tree PSS MiB",
                               "images+JPEGs MiB", "images/s"], ["---"] * 3 + ["---:"] * 4,
                       cells, keep=lambda r: "peak_rss_main_mib" in r)


def train_table(files) -> list[str]:
    def cells(r):
        ov = r.get("pipeline_overhead")
        tf, mfu = r.get("tflops"), r.get("mfu")
        return [r["source"], r["option"], str(r["n"]), r["device"], r.get("amp", ""),
                _fmt(r["patches_per_s"]), f"{100 * ov:.1f}%" if ov is not None else "",
                f"{tf:.3g}" if tf is not None else "", f"{100 * mfu:.1f}%" if mfu is not None else ""]
    return _rows_table(files, ["source", "option", "n", "device", "amp", "patches/s", "pipeline overhead",
                               "TFLOP/s", "MFU"], ["---"] * 5 + ["---:"] * 4, cells)


def _times(x, digits: int) -> str:
    """A speed-up cell: '12.3x', or empty where the file has no such number."""
    return f"{x:,.{digits}f}x" if isinstance(x, (int, float)) else ""


def loss_rows(files) -> list[str]:
    """loss_and_model.py's loss part: the fused objective against the per-group loop (the
    reference's) and plain autograd through the batched ops, with the loss values' agreement."""
    def cells(r):
        a, b = r.get("loss_fused"), r.get("loss_fp64_naive")
        gap = abs(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        return [str(r.get("n", "?")), str(r.get("b", "?")), str(r.get("d", "?")),
                _fmt(r.get("fused_ms", "?"), 2), _fmt(r.get("batched_autograd_ms", "?"), 2),
                _fmt(r.get("naive_ms", "?"), 1), _times(r.get("naive_over_fused"), 1),
                "?" if gap is None else f"{gap:.1e}"]
    return _rows_table(files, ["n", "b", "d", "fused ms", "batched autograd ms", "per-group loop ms",
                               "loop / fused", "loss diff vs fp64 loop"], ["---:"] * 8, cells,
                       keep=lambda r: r.get("part") == "loss")


def step_rows(files) -> list[str]:
    """loss_and_model.py's train_step part: EmpStep per precision, layout and compile mode."""
    def cells(r):
        mem = r.get("peak_mem_gib")
        return [str(r.get("width", "?")), f"{r.get('images', '?')} x {r.get('patches', '?')}",
                r.get("dtype", "?"), r.get("layout", "?"), r.get("mode", "?"),
                _fmt(r.get("patches_per_s", "?")),
                _times(r.get("speedup_vs_fp32_contiguous_eager_w64"), 2),
                "" if mem is None else f"{mem:.1f}"]
    return _rows_table(files, ["width", "images x patches", "precision", "layout", "mode", "patches/s",
                               "vs fp32 contiguous eager (w64)", "peak GiB"],
                       ["---:"] * 2 + ["---"] * 3 + ["---:"] * 3, cells,
                       keep=lambda r: r.get("part") == "train_step")


def conversion_rows(files) -> list[str]:
    """tools/convert_datasets.py --timings-json: images/s per format (end to end) and in all,
    the decode rate, the wall time, the converter's peak memory and how many JPEGs the DALI
    shards keep byte for byte."""
    out = ["| data | images | per format (images/s, end to end) | total images/s | decode images/s | total s | "
           "peak RSS MiB | JPEGs kept untouched | hardware | date | file |",
           "|---|---:|---|---:|---:|---:|---:|---|---|---|---|"]
    for path, d in files:
        ips, ds = d.get("images_per_s", {}), d.get("dataset", {})
        per = ", ".join(f"{k.split('_')[0]} {_fmt(v)}" for k, v in ips.items() if k.endswith("end_to_end"))
        shape = ds.get("shape")
        data = f"{Path(ds.get('source') or '?').name} ({shape[0]} px)" if shape else Path(ds.get("source") or "?").name
        kept = ds.get("dali_jpegs_untouched")
        kept = ", ".join(f"{k} {_fmt(v)}" for k, v in kept.items()) if isinstance(kept, dict) else ""
        rss = d.get("peak_rss_mib")
        out.append(f"| {data} | {_fmt(ds.get('images', '?'))} | {per} | {_fmt(ips.get('total', 0))} | "
                   f"{_fmt(ips.get('decode', ''))} | {_fmt((d.get('seconds') or {}).get('total', ''), 1)} | "
                   f"{_fmt(rss) if rss is not None else ''} | {kept} | {where(d)} | {when(d, path)} | {_name(path)} |")
    return out


def reencode_rows(files) -> list[str]:
    """tools/reencode_jpeg.py statistics: how far each re-encoding moved the pixels."""
    out = ["| quality | chroma | split | images | mean abs error (/255) | PSNR dB | bytes/image | date | file |",
           "|---:|---|---|---:|---:|---:|---:|---|---|"]
    for path, d in sorted(files, key=lambda f: -f[1].get("quality", 0)):
        for split, st in d.get("splits", {}).items():
            n = max(1, st.get("images", 0))
            psnr = st.get("psnr_db")
            out.append(f"| {d.get('quality', '?')} | {d.get('subsampling', '?')} | {split} | "
                       f"{_fmt(st.get('images', 0))} | {st.get('mae', 0):.2f} | "
                       f"{'inf' if psnr is None else f'{psnr:.1f}'} | {st.get('bytes', 0) / n:.0f} | "
                       f"{when(d, path)} | {_name(path)} |")
    return out


def _points(x: float) -> float:
    """An accuracy in percent: probe.py reports fractions; results from before that change hold
    percent."""
    return 100 * x if x <= 1 else x


def _pct(x) -> str:
    return f"{_points(x):.2f}%" if isinstance(x, (int, float)) else "?"


def probe_rows(files) -> list[str]:
    out = ["| checkpoint | data | test images | epochs | feature | eval mode | test patches | linear top-1 | "
           "kNN top-1 | file |", "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for path, d in files:
        ck = d.get("checkpoint", {})
        init = " (random init)" if d.get("random_init") else ""
        ds = d.get("dataset") if isinstance(d.get("dataset"), dict) else {}
        src = Path(ds.get("source") or "").name
        data = f"{ds.get('name', '?')}" + (f" ({src})" if src else "")
        out.append(f"| {ck.get('path', '?')}{init} | {data} | {_fmt(d.get('num_test', '?'))} | "
                   f"{ck.get('epoch', '')} | {d.get('feature')} | {d.get('eval_mode', 'augmented')} | {d.get('test_patches')} | "
                   f"{_pct(d.get('linear_top1'))} | {_pct(d.get('knn_top1'))} | {_name(path)} |")
    return out


def _ci(ci) -> str:
    return f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def compare_rows(files) -> list[str]:
    """tools/compare_probes.py (and accuracy_runs.py's compare_*.json): one row per pair
    of probes and metric; accuracies on the paired pictures only."""
    out = ["| A | B | metric | pairs | A top-1 | B top-1 | A - B (points) | 95% CI (paired bootstrap) | "
           "McNemar p | file |", "|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for path, d in files:
        for p in d.get("pairs", []):
            for m in ("linear", "knn"):
                s = p.get(m) or {}
                if "diff" not in s:
                    continue
                out.append(f"| {Path(p.get('a', '?')).stem} ({p.get('a_dataset', '?')}) | "
                           f"{Path(p.get('b', '?')).stem} ({p.get('b_dataset', '?')}) | {m} | "
                           f"{_fmt(s['pairs'])} | {_pct(s['acc_a'])} | {_pct(s['acc_b'])} | "
                           f"{100 * s['diff']:+.2f} | {_ci(s.get('ci95'))} | {s.get('mcnemar_p', 0):.3g} | "
                           f"{_name(path)} |")
    return out


def seed_summary_rows(files) -> list[str]:
    """accuracy_runs.py's summary.json: per variant, the mean over seeds of the paired
    difference lossless - variant, with its intervals."""
    out = ["| scale | B (vs A = lossless, same seed) | metric | seeds | A mean (sd) | B mean (sd) | "
           "mean A - B (points) | 95% CI, t over seeds | 95% CI, seeds + pictures bootstrap | date | file |",
           "|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for path, d in files:
        for variant, c in sorted(d.get("comparisons", {}).items()):
            sm = c.get("summary") or {}
            for m in ("linear", "knn"):
                s = sm.get(m)
                if not s:
                    continue
                out.append(f"| {d.get('scale', '?')} | {variant} | {m} | {sm.get('seeds')} | "
                           f"{_pct(s['mean_acc_a'])} ({100 * s['sd_acc_a']:.2f}) | "
                           f"{_pct(s['mean_acc_b'])} ({100 * s['sd_acc_b']:.2f}) | "
                           f"{100 * s['mean_diff']:+.2f} | {_ci(s.get('ci95_t_over_seeds'))} | "
                           f"{_ci(s.get('ci95_two_level_bootstrap'))} | {when(d, path)} | {_name(path)} |")
    return out


def _train_args(d: dict) -> str:
    """The run's extra train.py arguments (stored since 2026-11-22; else read from the command)."""
    if "train_args" in d:
        return d["train_args"]
    words = shlex.split(d.get("command", ""))
    return words[words.index("--train-args") + 1] if "--train-args" in words[:-1] else ""


def tta_rows(files) -> list[str]:
    """One row per probed point: the schedule length tells a 1-epoch run from the first epoch
    of a longer one."""
    out = ["| config | data | schedule (epochs) | extra train args | epoch | training min | linear top-1 | "
           "kNN top-1 | hardware | date | file |", "|---|---|---:|---|---:|---:|---:|---:|---|---|---|"]
    for path, d in files:
        env = d.get("environment", {})
        for pt in d.get("points", []):
            out.append(f"| {Path(d.get('config', '?')).name} | {d.get('dataset_name', '?')} | "
                       f"{d.get('epochs', '?'):g} | "
                       f"{_train_args(d) or ''} | {pt['epoch']:.3g} | {pt['train_minutes']:.2f} | "
                       f"{_pct(pt.get('linear_top1'))} | {_pct(pt.get('knn_top1'))} | {where(env)} | "
                       f"{when(env, path)} | {_name(path)} |")
    return out


def _med(spread) -> float | None:
    return spread.get("median") if isinstance(spread, dict) else None


def _range(spread, digits: int = 1, unit: str = "") -> str:
    """'12.3 (11.0-13.1)': the median over repeats and its range."""
    if not isinstance(spread, dict) or "median" not in spread:
        return ""
    if spread.get("n", 1) < 2:
        return f"{spread['median']:,.{digits}f}{unit}"
    return f"{spread['median']:,.{digits}f}{unit} ({spread['min']:,.{digits}f}-{spread['max']:,.{digits}f})"


def vs_reference_rows(files) -> list[str]:
    """benchmarks/vs_reference.py: the authors' main.py and our train.py on the same data,
    machine and schedule; patches/s as the median over repeats (range), the ratio per repeat,
    and the probe's linear top-1 of each with the paired difference (ours - theirs)."""
    out = ["| setting | repeats | theirs patches/s | ours patches/s | ours / theirs | steady ours / theirs | "
           "patches per CPU s, ours / theirs | peak MiB theirs / ours | theirs linear | ours linear | "
           "ours - theirs (95% CI) | their commit | hardware | date | file |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|---|---|"]
    for path, d in files:
        st, sm = d.get("setting", {}), d.get("summary", {})
        th, us = sm.get("theirs", {}), sm.get("ours", {})
        cap = f", {st.get('steps_per_epoch')} steps/epoch" if st.get("steps_cap") else ""
        setting = (f"n={st.get('num_patches', '?')}, {st.get('batch_images', '?')} images/step, "
                   f"{st.get('kept_epochs', '?')} of {st.get('schedule_epochs', '?')} epochs{cap}, "
                   f"{st.get('data_name', '?')} on {st.get('device', '?')}")
        mem_key = "peak_cuda_allocated_mib" if "peak_cuda_allocated_mib" in th else "peak_rss_mib"
        mem = (f"{th.get(mem_key, 0):,.0f} / {us.get(mem_key, 0):,.0f}"
               + (" (CUDA)" if mem_key.startswith("peak_cuda") else " (RSS)")) if th and us else ""
        lin, diff = {}, ""
        pa = sm.get("paired_accuracy") or {}
        if pa.get("pairs"):
            per = [p["linear"] for p in pa["pairs"]]
            lin = {"theirs": sum(p["acc_b"] for p in per) / len(per),
                   "ours": sum(p["acc_a"] for p in per) / len(per)}
            if len(per) == 1:
                diff = f"{100 * per[0]['diff']:+.2f} {_ci(per[0]['ci95'])}"
            else:
                lin_sum = (pa.get("summary") or {}).get("linear", {})
                diff = (f"{100 * lin_sum.get('mean_diff', 0):+.2f} "
                        f"{_ci(lin_sum.get('ci95_t_over_seeds'))} (mean over seeds)")
        ref = d.get("reference", {})
        out.append(f"| {setting} | {st.get('repeats', '?')} | {_range(th.get('patches_per_s'))} | "
                   f"{_range(us.get('patches_per_s'))} | {_range(sm.get('speedup_ours_over_theirs'), 2, 'x')} | "
                   f"{_range(sm.get('steady_speedup_ours_over_theirs'), 2, 'x')} | "
                   f"{_range(sm.get('cpu_efficiency_ours_over_theirs'), 2, 'x')} | {mem} | "
                   f"{_pct(lin['theirs']) if lin else ''} | {_pct(lin['ours']) if lin else ''} | {diff} | "
                   f"{str(ref.get('commit', '?'))[:12]} | {where(d)} | {when(d, path)} | {_name(path)} |")
    return out


def lars_rows(files) -> list[str]:
    """benchmarks/lars_update.py: ms and operators per LARS update, each kind beside the
    previous update (loaded from git history) on the same parameters."""
    def cells(r):
        proj = "-".join(str(x) for x in r.get("projector", []))
        return [str(r.get("width", "?")), proj, _fmt(r.get("params", "?")), r.get("kind", "?"),
                _fmt(r.get("ms_per_update", "?"), 1), _fmt(r.get("ops_per_update") or ""),
                _times(r.get("speedup_vs_previous"), 2), f"{r.get('max_param_diff_vs_previous', 0):.0e}"]
    return _rows_table(files, ["width", "projector", "parameters", "update", "ms/update", "ops/update",
                               "speed-up vs previous", "max param diff"],
                       ["---:", "---", "---:", "---", "---:", "---:", "---:", "---:"], cells,
                       keep=lambda r: "ms_per_update" in r)


STARTUP_ROWS = (("train.py process outside its loop, s", "outside_loop_s"),
                ("train.py time to first step, s", "time_to_first_step_s"),
                ("probe.py process, s", "probe_process_s"),
                ("probe.py linear probe, s", ("probe_timings_s", "linear_probe")),
                ("probe.py feature extraction, s", ("probe_timings_s", "extraction")))


def startup_rows(files) -> list[str]:
    """benchmarks/startup.py: medians over repeats, this revision beside the baseline's, and
    where the time to the first step went."""
    out = ["| measurement | baseline | this revision | baseline / this | hardware | date | file |",
           "|---|---:|---:|---:|---|---|---|"]
    for path, d in files:
        med = d.get("median", {})
        cur = med.get("current", {})
        base_key = next((k for k in med if k.startswith("baseline")), None)
        base = med.get(base_key, {}) if base_key else {}

        def get(m, key):
            return (m.get(key[0], {}) or {}).get(key[1]) if isinstance(key, tuple) else m.get(key)
        for label, key in STARTUP_ROWS:
            a, b = get(base, key), get(cur, key)
            if b is None:
                continue
            ratio = _times(a / b, 2) if isinstance(a, (int, float)) and b else ""
            out.append(f"| {label} | {_fmt(a, 1) if a is not None else ''} | {_fmt(b, 1)} | {ratio} | "
                       f"{where(d)} | {when(d, path)} | {_name(path)} |")
        parts = cur.get("startup_s") or {}
        if parts:
            split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            out.append(f"| time to first step, where it went (s) | | {split} | | {where(d)} | "
                       f"{when(d, path)} | {_name(path)} |")
    return out


def monitor_cost_rows(files) -> list[str]:
    """benchmarks/monitor_cost.py: a training step and a monitor evaluation timed in one
    process, and the monitor's share of the wall time per interval."""
    out = ["| preset (+ args) | n | steps/epoch | step s | evaluation s | evaluation / step | every (epochs) | "
           "share of wall time | hardware | date | file |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for path, d in files:
        setting = f"{Path(d.get('config', '?')).name} {d.get('train_args', '')}".strip()
        for r in d.get("rows", []):
            out.append(f"| {setting} | {d.get('num_patches', '?')} | {d.get('steps_per_epoch', '?')} | "
                       f"{_fmt(d.get('step_s', '?'), 1)} | {_fmt(d.get('eval_s', '?'), 1)} | "
                       f"{_fmt(d.get('eval_in_steps', '?'), 1)} | {r['every_epochs']:g} | "
                       f"{100 * r['share_of_wall']:.2f}% | {where(d)} | {when(d, path)} | {_name(path)} |")
    return out


def augment_ops_rows(files) -> list[str]:
    """make_patches with one augmentation op switched off at a time (patches/s)."""
    out = ["| variant | patches/s | vs all ops | hardware | date | file |", "|---|---:|---:|---|---|---|"]
    for path, d in files:
        rates = d.get("patches_per_s", {})
        base = rates.get("all ops")
        for k, v in rates.items():
            rel = _times(v / base, 2) if base else ""
            out.append(f"| {k} | {_fmt(v, 1)} | {rel} | {where(d)} | {when(d, path)} | {_name(path)} |")
    return out


def downstream_rows(files) -> list[str]:
    """benchmarks/downstream_check.py: the exported encoder loaded outside the trainer, its
    features against probe.py's, and a scikit-learn classifier against a random-init encoder."""
    out = ["| feature | loaded through | dim | train / test images | max diff vs probe.py | "
           "scikit-learn: trained | random init | trained - random (95% CI) | McNemar p | "
           "probe.py: trained / random init | hardware | date | file |",
           "|---|---|---:|---|---:|---:|---:|---|---:|---|---|---|---|"]
    for path, d in files:
        for feature, s in d.get("features", {}).items():
            eq = s.get("feature_equality", {})
            diffs = [v for split in ("train", "test") for k, v in (eq.get(split) or {}).items()
                     if k.endswith("_vs_probe_cache_max_abs")]
            sk = s.get("sklearn_logistic_regression", {})
            pair = sk.get("paired", {})
            pp = s.get("probe_py_linear_top1", {})
            out.append(f"| {feature} | {s.get('loaded_through', '?')} | {s.get('dim', '?')} | "
                       f"{_fmt(s.get('train_images', '?'))} / {_fmt(s.get('test_images', '?'))} | "
                       f"{max(diffs) if diffs else '?':g} | {_pct(sk.get('trained_top1'))} | "
                       f"{_pct(sk.get('random_init_top1'))} | {100 * pair.get('diff', 0):+.2f} "
                       f"{_ci(pair.get('ci95'))} | {pair.get('mcnemar_p', float('nan')):.2g} | "
                       f"{_pct(pp.get('trained'))} / {_pct(pp.get('random_init'))} | {where(d)} | "
                       f"{when(d, path)} | {_name(path)} |")
    return out


def test_suite_rows(files) -> list[str]:
    """benchmarks/ci_suite.py: `bash .ci/run` in fresh clones, with and without ../shared."""
    out = ["| mode | passed | skipped | failed | errors | minutes (set-up + tests) | pytest minutes | commit | "
           "hardware | date | file |", "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for path, d in files:
        for mode in ("with_shared", "without_shared"):
            r = d.get(mode)
            if not r:
                continue
            out.append(f"| {mode.replace('_', ' ')} | {r.get('passed')} | {r.get('skipped')} | {r.get('failed')} | "
                       f"{r.get('errors')} | {_fmt(r.get('wall_min'), 1)} | {_fmt(r.get('pytest_min'), 1)} | "
                       f"{str(d.get('git_commit', '?'))[:7]} | {where(d)} | {when(d, path)} | {_name(path)} |")
    return out


def seed_accuracy_rows(files) -> list[str]:
    """probe_<variant>_s<seed>.json files of one folder: linear top-1 per seed, and the mean
    linear and kNN top-1 over the seeds of each variant (accuracy_runs.py and the older gap
    runs name their probes so)."""
    import statistics

    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for path, d in files:
        m = re.fullmatch(r"probe_(.+)_s(\d+)\.json", path.name)
        if m is None or d.get("random_init"):
            continue
        groups.setdefault((_name(path).rsplit("/", 1)[0], m.group(1)), {})[int(m.group(2))] = d
    out = ["| folder | variant | linear top-1 per seed (seed 0, 1, ...) | seeds | mean linear (sd) | "
           "mean kNN | test images |", "|---|---|---|---:|---:|---:|---:|"]
    for (folder, variant), seeds in groups.items():
        lin = [_points(seeds[s]["linear_top1"]) for s in sorted(seeds)]
        knn = [_points(seeds[s]["knn_top1"]) for s in sorted(seeds) if "knn_top1" in seeds[s]]
        sd = f" ({statistics.stdev(lin):.2f})" if len(lin) > 1 else ""
        tests = sorted({seeds[s].get("num_test") for s in seeds}, key=str)
        out.append(f"| {folder} | {variant} | {' / '.join(f'{x:.1f}' for x in lin)} | {len(lin)} | "
                   f"{statistics.fmean(lin):.2f}%{sd} | "
                   f"{f'{statistics.fmean(knn):.2f}%' if knn else ''} | "
                   f"{', '.join(_fmt(t) for t in tests)} |")
    return out


def vs_reference_bars(files) -> list[tuple[str, float, str]]:
    """(label, median patches/s, file) per side of every theirs-vs-ours result."""
    rows = []
    for path, d in files:
        st, sm = d.get("setting", {}), d.get("summary", {})
        for side in ("theirs", "ours"):
            v = _med((sm.get(side) or {}).get("patches_per_s"))
            if isinstance(v, (int, float)):
                rows.append((f"{side} n={st.get('num_patches', '?')} b={st.get('batch_images', '?')} "
                             f"({where(d)})", v, _name(path)))
    return rows


def unique_labels(rows: list[tuple[str, float, str]]) -> list[tuple[str, float]]:
    """(label, value, file) -> (label, value), the file appended to labels that occur more than
    once (matplotlib would draw bars with equal labels on top of each other)."""
    count: dict[str, int] = {}
    for label, _, _ in rows:
        count[label] = count.get(label, 0) + 1
    out = [(f"{label} [{src}]" if count[label] > 1 else label, value) for label, value, src in rows]
    seen: dict[str, int] = {}
    for i, (label, value) in enumerate(out):  # still equal (same label, same file): number them
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            out[i] = (f"{label} #{seen[label]}", value)
    return out


def plot_bars(rows: list[tuple[str, float, str]], title: str, path: Path,
              xlabel: str = "patches / s (log)", left: float | None = None) -> bool:
    """Horizontal bars on a log axis, each labelled with its value; rows are (label, value,
    file). Bars start at ``left`` (default, and whenever a value is not above it: the power of
    ten below the smallest value). Returns whether a plot was written (False: no positive
    values)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = unique_labels([r for r in rows if r[1] > 0])
    if not rows:
        return False
    values = [v for _, v in rows]
    base = 10 ** math.floor(math.log10(min(values)))  # below the smallest value, or equal:
    base = base / 10 if base >= min(values) else base  # then a decade lower, so every bar shows
    left = base if left is None else min(left, base)
    longest = max(len(label) for label, _ in rows)
    fig, ax = plt.subplots(figsize=(6 + 0.075 * longest, 0.35 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [v - left for v in values], left=left, color="#4477aa")
    for y, v in enumerate(values):
        ax.text(v * 1.05, y, f"{v:,.3g}" if v < 100 else f"{v:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(left, max(values) * 8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return True


GROUPS = (  # (group, file-name test), first match wins
    ("pipeline", lambda n: n.startswith("pipeline")),
    ("train", lambda n: n.startswith("train_throughput")),
    ("loss", lambda n: n.startswith("loss_and_model")),
    ("conversion", lambda n: n.startswith("conversion")),
    ("memory", lambda n: n.startswith("convert_memory")),
    ("probe", lambda n: n.startswith("probe")),
    ("tta", lambda n: n.startswith("time_to_accuracy")),
    ("reencode", lambda n: n.startswith("reencode")),
    ("compare", lambda n: n.startswith("compare")),
    ("vs_reference", lambda n: n.startswith("vs_reference")),
    ("lars", lambda n: n.startswith("lars_update")),
    ("startup", lambda n: n.startswith("startup")),
    ("monitor_cost", lambda n: n.startswith("monitor_cost")),
    ("augment_ops", lambda n: n.startswith("augment_ops")),
    ("downstream", lambda n: n.startswith("downstream_check")),
    ("test_suite", lambda n: n.startswith("test_suite")),
    ("summary", lambda n: n == "summary.json"),
    ("runs", lambda n: n.startswith(("train_", "env_"))),
)

# Tables by name: REPORT.md's sections and the generated blocks of docs/*.md use the same ones.
VIEWS = {
    "vs_reference": ("vs_reference", vs_reference_rows),
    "conversion": ("conversion", conversion_rows),
    "convert_memory": ("memory", convert_memory_table),
    "pipeline": ("pipeline", pipeline_table),
    "augment_ops": ("augment_ops", augment_ops_rows),
    "train": ("train", train_table),
    "loss": ("loss", loss_rows),
    "step": ("loss", step_rows),
    "lars": ("lars", lars_rows),
    "startup": ("startup", startup_rows),
    "monitor_cost": ("monitor_cost", monitor_cost_rows),
    "seeds": ("summary", seed_summary_rows),
    "seed_accuracies": ("probe", seed_accuracy_rows),
    "compare": ("compare", compare_rows),
    "probe": ("probe", probe_rows),
    "tta": ("tta", tta_rows),
    "reencode": ("reencode", reencode_rows),
    "downstream": ("downstream", downstream_rows),
    "test_suite": ("test_suite", test_suite_rows),
}

DOCS = (ROOT / "docs",)
BLOCK = re.compile(r"(<!-- report:begin (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- report:end -->)", re.S)


def collect(res: Path) -> dict[str, list]:
    """Every result file under ``res``, by group (``GROUPS``; the rest under "other")."""
    groups: dict[str, list] = {name: [] for name, _ in GROUPS}
    groups["other"] = []
    for path in sorted(res.rglob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
            continue
        key = next((g for g, test in GROUPS if test(path.name)), "other")
        groups[key].append((path, d))
    return groups


def render_block(spec: str, groups: dict[str, list], res: Path) -> str:
    """The table a doc block asks for: ``VIEW GLOB [GLOB ...]``, the globs matched against
    result paths relative to ``res`` (e.g. ``seeds paired_cpu2_20261130/*/summary.json``)."""
    from fnmatch import fnmatch

    view, *globs = spec.split()
    if view not in VIEWS:
        raise ValueError(f"unknown table {view!r} (known: {', '.join(VIEWS)})")
    group, table = VIEWS[view]
    files = [(p, d) for p, d in groups[group]
             if not globs or any(fnmatch(p.relative_to(res).as_posix(), g) for g in globs)]
    rows = table(files)
    if len(rows) <= 2:
        raise ValueError(f"table {spec!r} has no rows: no result file under {res} matches")
    return "\n".join(rows) + "\n"


def refresh_docs(groups: dict[str, list], res: Path, docs=DOCS, write: bool = True) -> list[str]:
    """Regenerate every ``<!-- report:begin VIEW GLOB... -->`` block in docs/*.md. Returns the
    files that were stale (rewritten when ``write``)."""
    stale = []
    for folder in docs:
        for md in sorted(Path(folder).glob("*.md")):
            text = md.read_text()
            new = BLOCK.sub(lambda m: m.group(1) + render_block(m.group("spec"), groups, res) + m.group(4), text)
            if new != text:
                stale.append(str(md.relative_to(ROOT)) if md.is_relative_to(ROOT) else str(md))
                if write:
                    write_bytes_atomic(md, new.encode())
    return stale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--out", default=None, help="default: <results>/REPORT.md")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming every docs/*.md whose generated tables are stale")
    p.add_argument("--no-docs", action="store_true",
                   help="write REPORT.md only, not the tables in docs/*.md (those are regenerated only "
                        "from the repository's own benchmarks/results/)")
    a = p.parse_args(argv)
    res = Path(a.results)
    out = Path(a.out) if a.out else res / "REPORT.md"
    groups = collect(res)
    # docs/*.md quote the committed results: their tables come from benchmarks/results/ only
    docs = res.resolve() == (ROOT / "benchmarks" / "results").resolve() and not a.no_docs
    if a.check and not docs:
        p.error("--check compares docs/*.md with benchmarks/results/ (leave --results and --no-docs out)")
    if docs:
        try:
            stale = refresh_docs(groups, res, write=not a.check)
        except ValueError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
        if a.check:
            if stale:
                print("report: generated tables are stale in " + ", ".join(stale)
                      + ": run `python benchmarks/report.py`", file=sys.stderr)
                return 1
            print("report: every generated table in docs/ is current")
            return 0
        for name in stale:
            print(f"report: regenerated the tables in {name}")
    lines = ["# Benchmark report", "", f"Generated by `python benchmarks/report.py` from {len(sum(groups.values(), []))} "
             "result files. Each row names the hardware and date of its own measurement.", ""]

    def section(title: str, view: str, plot: tuple | None = None) -> None:
        """A section when its table has rows (beyond header and rule), with its plot if drawn."""
        group, fn = VIEWS[view]
        table = fn(groups[group])
        if len(table) <= 2:
            return
        lines.extend([f"## {title}", "", *table, ""])
        if plot is not None:
            rows, plot_title, name, kw = plot
            if plot_bars(rows, plot_title, out.parent / f"{name}.png", **kw):
                lines.extend([f"![{name}]({name}.png)", ""])

    section("Theirs vs ours: the authors' main.py beside train.py (benchmarks/vs_reference.py)", "vs_reference",
            (vs_reference_bars(groups["vs_reference"]), "training patches/s: the authors' code vs ours, "
             "same data and machine (median over repeats)", "vs_reference", {}))
    section("Dataset conversion", "conversion")
    section("Conversion memory vs the number of images (benchmarks/convert_memory.py)", "convert_memory")
    section("Input pipeline (source + on-device patches)", "pipeline",
            ([(f"{r['source']} {r['device']} n={r['n']} ({where(d)})", r["patches_per_s"], _name(f))
              for f, d in groups["pipeline"] for r in d.get("rows", []) if "patches_per_s" in r],
             "pipeline patches/s per source (reference = the paper's PIL path)", "pipeline", {}))
    section("Augmentation ops at 224 px (make_patches, one op off at a time)", "augment_ops")
    section("Training step", "train",
            ([(f"{r['source']} {r['option']} n={r['n']} {r['device']} ({where(d)})", r["patches_per_s"],
               _name(f))
              for f, d in groups["train"] for r in d.get("rows", []) if "patches_per_s" in r],
             "training patches/s per option", "train", {}))
    section("Loss (benchmarks/loss_and_model.py)", "loss",
            ([(f"{where(d)} n={r.get('n', '?')}", r["naive_over_fused"], _name(f))
              for f, d in groups["loss"] for r in d.get("rows", [])
              if r.get("part") == "loss" and isinstance(r.get("naive_over_fused"), (int, float))],
             "fused EMP-SSL loss (forward + backward) vs the per-group loop", "loss",
             dict(xlabel="speed-up, x (log)", left=1.0)))
    section("Training step, model only (benchmarks/loss_and_model.py)", "step")
    section("LARS update (benchmarks/lars_update.py)", "lars")
    section("Start-up (benchmarks/startup.py)", "startup")
    section("Accuracy monitor cost (benchmarks/monitor_cost.py)", "monitor_cost")
    section("Paired accuracy differences over seeds (benchmarks/accuracy_runs.py)", "seeds")
    section("Accuracy per seed (probe_<variant>_s<seed>.json)", "seed_accuracies")
    section("Paired comparisons (tools/compare_probes.py)", "compare")
    section("Probes", "probe")
    section("Time to accuracy (linear probe after E epochs of one run)", "tta")
    section("JPEG re-encodings of the data (tools/reencode_jpeg.py)", "reencode")
    section("The exported encoder outside the trainer (benchmarks/downstream_check.py)", "downstream")
    section("Test suite in fresh clones (benchmarks/ci_suite.py)", "test_suite")
    if groups["other"]:
        lines += ["Unrecognised result files: " + ", ".join(p.name for p, _ in groups["other"]), ""]
    write_bytes_atomic(out, "\n".join(lines).encode())
    print(f"report: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
