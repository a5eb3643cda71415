"""The suite's time limit (setup.cfg: pytest-timeout, thread method) stops a test that hangs
inside C code, and the failure names the test."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HANGS = """
import ctypes, pytest

def test_before():
    pass

@pytest.mark.timeout(3)
def test_sleeps_in_c():
    print("about to block in libc")
    ctypes.CDLL(None).sleep(1000)   # C code: no Python bytecode runs, so no signal handler either

def test_after():
    pass
"""


def test_a_hang_in_c_fails_naming_the_test(tmp_path):
    (tmp_path / "test_hangs.py").write_text(HANGS)
    t0 = time.monotonic()
    # the repository's pytest configuration (setup.cfg) and its conftest's hook (as a plugin)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-c", str(ROOT / "setup.cfg"), "--rootdir", str(tmp_path),
                        "-p", "conftest", str(tmp_path / "test_hangs.py")],
                       cwd=ROOT / "tests", capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "test_hangs.py::test_sleeps_in_c ran past its limit of 3 s" in out, out
    assert "in test_sleeps_in_c" in out and "about to block in libc" in out, out
    assert wall < 60, f"the 3 s limit took {wall:.0f} s to fire"
