"""The one place that builds and runs train.py / probe.py command lines for the accuracy drivers
(benchmarks/accuracy_runs.py, time_to_accuracy.py, vs_reference.py (train.py through
ref_bootstrap.py, in-process) and tools/demo.py).

    train_command(config, data, out, *extra)        -> [python, "train.py", --config, --data, --out, *extra]
    probe_command(checkpoint, data, out, *extra,
                  random_init=False)                -> [python, "probe.py", --checkpoint, --data, --out,
                                                        [--random-init], *extra]
    run_logged(cmd, log=None, env=None)             -> seconds; RunFailed (one line: script, exit code,
                                                       log and its last lines) on a non-zero exit
    read_probe(out)                                 -> OUT/results.json, dataset.source relative to the repo

Commands run from the repository root with this interpreter. Each driver keeps its own extra
flags (variants, --test-like, max_steps, --resume, ...) and passes them as ``extra``.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RunFailed(RuntimeError):
    """A command exited non-zero; ``str()`` is one line naming the script, the code and the log."""

    def __init__(self, cmd: list[str], code: int, log: Path | None = None):
        self.cmd, self.code, self.log = list(cmd), code, log
        script = next((c for c in cmd[1:] if not c.startswith("-")), cmd[0]) if cmd else "?"
        msg = f"{script} exited {code}"
        if log is not None:
            msg += f" (log: {log})"
            tail = log_tail(log)
            if tail:
                msg += f": {tail}"
        super().__init__(msg)


def train_command(config, data, out, *extra: str) -> list[str]:
    """``python train.py --config CONFIG --data DATA --out OUT *extra``."""
    return [sys.executable, "train.py", "--config", str(config), "--data", str(data),
            "--out", str(out), *map(str, extra)]


def probe_command(checkpoint, data, out, *extra: str, random_init: bool = False) -> list[str]:
    """``python probe.py --checkpoint CKPT --data DATA --out OUT [--random-init] *extra``
    (``random_init``: probe a freshly initialised encoder of the checkpoint's architecture)."""
    return [sys.executable, "probe.py", "--checkpoint", str(checkpoint), "--data", str(data),
            "--out", str(out), *(["--random-init"] if random_init else []), *map(str, extra)]


def shown(cmd: list[str]) -> str:
    """A command as result files record it: `python` for this interpreter, no absolute paths."""
    return " ".join(shlex.quote("python" if c == sys.executable else c) for c in cmd)


def log_tail(log: Path, lines: int = 3) -> str:
    """The last ``lines`` non-blank lines of ``log`` joined into one line ('' when unreadable)."""
    try:
        text = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(l.strip()[-200:] for l in text[-lines:])


def run_logged(cmd: list[str], log: Path | None = None, env: dict | None = None) -> float:
    """Run ``cmd`` from the repository root and return its wall seconds. With ``log`` its output
    is appended there (after a ``+ command`` line); without, it goes to this process's stdout and
    stderr (after the same line on stdout). Raises :class:`RunFailed` on a non-zero exit."""
    header = "+ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n"
    t = time.perf_counter()
    if log is None:
        print(header, end="", flush=True)
        code = subprocess.call(cmd, cwd=ROOT, env=env)
    else:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(header.encode())
            f.flush()
            code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RunFailed(cmd, code, log)
    return time.perf_counter() - t


def relative(path: str) -> str:
    """``path`` relative to the repository root when it is absolute (result files hold no
    machine-specific paths; :func:`portable` does the same inside any strings of a result)."""
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


def portable(obj, extra: dict | None = None):
    """``obj`` with this machine's folders written relative to the repository ('.' for the
    checkout, '..' for the folder beside it) and ``extra``'s {folder: name} replaced, in every
    string of nested dicts and lists: result files hold no machine-specific paths."""
    subs = sorted({**{str(k): v for k, v in (extra or {}).items()}, str(ROOT): ".",
                   str(ROOT.parent): ".."}.items(), key=lambda kv: -len(kv[0]))
    if isinstance(obj, str):
        for old, new in subs:
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, dict):
        return {k: portable(v, extra) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, extra) for v in obj]
    return obj


def read_probe(out, relative_source: bool = True) -> dict:
    """probe.py's ``OUT/results.json``; its ``dataset.source`` made relative to the repository
    unless ``relative_source`` is false."""
    result = json.loads((Path(out) / "results.json").read_text())
    dataset = result.get("dataset")
    if relative_source and isinstance(dataset, dict) and isinstance(dataset.get("source"), str):
        dataset["source"] = relative(dataset["source"])
    return result
