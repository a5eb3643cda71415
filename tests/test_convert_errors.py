"""Bad input to tools/convert_datasets.py: one line naming the path, exit code 2, and nothing
left under the output that looks like a dataset; unsafe archive members are refused."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_tool


@pytest.fixture(scope="module")
def cli():
    """tools/convert_datasets.py imported as a module (importing it must have no side effects)."""
    spec = importlib.util.spec_from_file_location("convert_datasets_cli",
                                                  ROOT / "tools" / "convert_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _img(path: Path, color=(10, 20, 30), fmt="PNG", size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _good(root: Path) -> Path:
    for c in ("a", "b"):
        for i in range(2):
            _img(root / "train" / c / f"{i}.png", (i, 50, 100))
    return root


def _fail(cli, capsys, *args) -> str:
    """Run the CLI in-process; assert exit 2 and a single-line error; return the line."""
    code = cli.main([*map(str, args), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("convert_datasets: error: ") and "\n" not in err, err
    return err


def _nothing_left(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


# ------------------------------------------------------------------ bad image files


@pytest.mark.parametrize("kind,reason", [
    ("garbage", "not an image PIL can read"),
    ("text", "not an image PIL can read"),
    ("truncated", "corrupt or truncated image"),
])
def test_bad_file_stops_with_its_path(cli, capsys, tmp_path, kind, reason):
    src = _good(tmp_path / "src")
    bad = src / "train" / "b" / "bad.jpg"
    if kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    elif kind == "text":
        bad.write_text("this is not an image\n")
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
            buf, "JPEG")
        bad.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    out = tmp_path / "out"
    err = _fail(cli, capsys, src, "--name", "ds", "--out", out, "--formats", "memory,dali")
    assert f"{bad}: {reason}" in err and "--skip-bad" in err
    _nothing_left(out)


def test_skip_bad_lists_skipped_files(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    (src / "train" / "a" / "x.jpg").write_text("nope")
    (src / "train" / "b" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    code = cli.main([str(src), "--name", "ds", "--out", str(out), "--formats", "memory,dali",
                     "--skip-bad", "--workers", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "ds" / "manifest.json").read_text())
    assert [s["path"] for s in m["skipped"]] == [str(src / "train/a/x.jpg"),
                                                 str(src / "train/b/y.png")]
    assert all(s["reason"] for s in m["skipped"])
    assert m["splits"]["train"]["count"] == 4 and m["splits"]["train"]["class_counts"] == [2, 2]
    assert np.load(out / "ds" / "train.labels.npy").tolist() == [0, 0, 1, 1]
    assert "skipped 2 bad files" in capsys.readouterr().out


def test_corrupt_archive_member_names_archive_and_member(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src).as_posix())
    blob = bytearray(archive.read_bytes())
    payload = (src / "train/b/1.png").read_bytes()
    at = blob.rfind(payload)  # the last of the identical files: train/b/1.png
    blob[at + len(payload) // 2] ^= 0xFF  # flip a byte inside train/b/1.png: bad CRC
    archive.write_bytes(bytes(blob))
    err = _fail(cli, capsys, archive, "--name", "ds", "--out", tmp_path / "out")
    assert f"{archive}:train/b/1.png: unreadable in the archive" in err
    assert cli.main([str(archive), "--name", "ds", "--out", str(tmp_path / "out"),
                     "--skip-bad", "--formats", "memory", "--no-progress"]) == 0
    m = json.loads((tmp_path / "out/ds/manifest.json").read_text())
    assert [s["path"] for s in m["skipped"]] == [f"{archive}:train/b/1.png"]


# ------------------------------------------------------------------ bad layouts and paths


def test_empty_class_dir(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    (src / "train" / "c").mkdir()
    err = _fail(cli, capsys, src, "--name", "ds", "--out", tmp_path / "out")
    assert f"{src / 'train' / 'c'}: empty class directory" in err


def test_split_without_images(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    (src / "test").mkdir()
    (src / "test" / "README").write_text("no class folders here")
    err = _fail(cli, capsys, src, "--name", "ds", "--out", tmp_path / "out")
    assert f"{src / 'test'}: no images" in err


def test_missing_and_non_dataset_paths(cli, capsys, tmp_path):
    err = _fail(cli, capsys, tmp_path / "nope", "--name", "ds", "--out", tmp_path / "out")
    assert f"{tmp_path / 'nope'}: no such file or directory" in err
    txt = tmp_path / "notes.tar.gz"
    txt.write_text("not an archive at all")
    err = _fail(cli, capsys, txt, "--name", "ds", "--out", tmp_path / "out")
    assert f"{txt}: not a directory or a .tar, .tar.gz, .tar.xz or .zip archive" in err
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "cat" / "1.png")
    err = _fail(cli, capsys, tmp_path / "flat", "--name", "ds", "--out", tmp_path / "out")
    assert "no train/, val/ or test/ directory" in err
    _nothing_left(tmp_path / "out")


def test_truncated_archive(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    for f in src.rglob("*.png"):  # incompressible content, so the archive is long enough
        f.write_bytes(f.read_bytes() + np.random.default_rng(1).bytes(4000))
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="ds")
    archive.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
    err = _fail(cli, capsys, archive, "--name", "ds", "--out", tmp_path / "out")
    assert f"{archive}: corrupt or truncated archive" in err


def test_existing_output_needs_overwrite(cli, capsys, tmp_path):
    src = _good(tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main([str(src), "--name", "ds", "--out", str(out), "--formats", "memory",
                     "--workers", "1", "--no-progress"]) == 0
    before = (out / "ds" / "manifest.json").read_text()
    err = _fail(cli, capsys, src, "--name", "ds", "--out", out, "--formats", "memory")
    assert f"{out / 'ds'}: already exists; pass --overwrite" in err
    assert (out / "ds" / "manifest.json").read_text() == before
    _img(src / "train" / "a" / "new.png")
    assert cli.main([str(src), "--name", "ds", "--out", str(out), "--formats", "memory",
                     "--overwrite", "--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / "ds" / "manifest.json").read_text())["splits"]["train"]["count"] == 5
    assert [p.name for p in out.iterdir()] == ["ds"]  # the old copy and the temp dir are gone


@pytest.mark.parametrize("args,needle", [
    (["--formats", "memory,png"], "--formats memory,png: choose from memory,ffcv,dali"),
    (["--resize", "0"], "--resize 0: must be a positive side"),
    (["--jpeg-quality", "101"], "--jpeg-quality 101: must be in 1..100"),
    (["--name", "a/b"], "--name 'a/b': must be a plain directory name"),
    (["--name", ".hidden"], "--name '.hidden'"),
])
def test_bad_flags(cli, capsys, tmp_path, args, needle):
    src = _good(tmp_path / "src")
    argv = [src, "--out", tmp_path / "out", *args]
    if "--name" not in args:
        argv += ["--name", "ds"]
    assert needle in _fail(cli, capsys, *argv)


def test_missing_name_and_source(cli, capsys, tmp_path):
    assert "--name: missing" in _fail(cli, capsys, _good(tmp_path / "src"))
    assert "SOURCE: missing" in _fail(cli, capsys, "--name", "x")
    assert "no manifest" in _fail(cli, capsys, "--verify", tmp_path / "src")
    assert "no such dataset directory" in _fail(cli, capsys, "--verify", tmp_path / "none")


# ------------------------------------------------------------------ unsafe archives


def _tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("train/a/ok.png")
        ok.size = len(png.getvalue())
        tf.addfile(ok, io.BytesIO(png.getvalue()))
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _member(name: str, type_=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info


@pytest.mark.parametrize("member,data,needle", [
    (_member("../evil.png"), b"x", "has an absolute or '..' path"),
    (_member("train/a/../../../evil.png"), b"x", "has an absolute or '..' path"),
    (_member("/tmp/evil.png"), b"x", "has an absolute or '..' path"),
    (_member("train/a/link.png", tarfile.SYMTYPE, "/etc/passwd"), b"", "is a link"),
    (_member("train/a/hard.png", tarfile.LNKTYPE, "train/a/ok.png"), b"", "is a link"),
    (_member("train/a/dev.png", tarfile.CHRTYPE), b"", "is a device file or FIFO"),
    (_member("train/a/fifo.png", tarfile.FIFOTYPE), b"", "is a device file or FIFO"),
])
def test_unsafe_tar_members_refused(cli, capsys, tmp_path, member, data, needle):
    archive = _tar_with(tmp_path / "evil.tar", member, data)
    out = tmp_path / "work" / "out"
    err = _fail(cli, capsys, archive, "--name", "ds", "--out", out)
    assert f"{archive}: member {member.name!r} {needle}" in err
    _nothing_left(out)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "work" / "evil.png").exists()


def test_unsafe_zip_members_refused(cli, capsys, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/ok.png", b"x")
        zf.writestr("../../evil.png", b"x")
    err = _fail(cli, capsys, archive, "--name", "ds", "--out", tmp_path / "out")
    assert "member '../../evil.png' has an absolute or '..' path" in err

    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("train/a/link.png")
        link.create_system = 3
        link.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(link, "/etc/passwd")
    err = _fail(cli, capsys, archive, "--name", "ds", "--out", tmp_path / "out")
    assert "member 'train/a/link.png' is a symlink" in err
    _nothing_left(tmp_path / "out")


# ------------------------------------------------------------------ failures mid-run


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_or_interrupted_write_leaves_nothing(cli, capsys, tmp_path, monkeypatch, exc):
    import pipeline.shards

    def boom(out_dir, samples, samples_per_shard=5000):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "shard-00000.tar").write_bytes(b"half")
        raise exc
    monkeypatch.setattr(pipeline.shards, "write_shards", boom)
    src = _good(tmp_path / "src")
    out = tmp_path / "out"
    argv = [str(src), "--name", "ds", "--out", str(out), "--formats", "memory,dali",
            "--workers", "1", "--no-progress"]
    if isinstance(exc, KeyboardInterrupt):
        assert cli.main(argv) == 130
    else:
        with pytest.raises(RuntimeError):
            cli.main(argv)
    _nothing_left(out)


def test_stale_temp_dirs_of_dead_runs_are_removed(cli, tmp_path):
    import subprocess
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer exists
    out = tmp_path / "out"
    stale = out / f".ds.tmp-{dead.pid}-abcd1234"
    (stale / "train").mkdir(parents=True)
    live = out / f".ds.tmp-{1}-abcd1234"  # pid 1 is alive: not ours to touch
    live.mkdir()
    assert cli.main([str(_good(tmp_path / "src")), "--name", "ds", "--out", str(out),
                     "--formats", "memory", "--workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [live.name, "ds"]


def test_download_without_network_is_one_line(cli, capsys, tmp_path, monkeypatch):
    from urllib.error import URLError

    class Offline:
        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train, download):
            raise URLError("[Errno -3] Temporary failure\nin name resolution")
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=Offline, CIFAR100=Offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    out = tmp_path / "out"
    err = _fail(cli, capsys, "cifar10", "--download", "--name", "c10", "--out", out)
    assert "--download cifar10: download failed" in err and "cifar-10-python.tar.gz" in err
    err = _fail(cli, capsys, "mnist", "--download", "--name", "m", "--out", out)
    assert "only cifar10 and cifar100" in err
    assert not (out / "c10").exists()


def test_script_exit_code_and_stderr(tmp_path):
    proc = run_tool("tools/convert_datasets.py", str(tmp_path / "missing"), "--name", "x",
                    "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"convert_datasets: error: {tmp_path / 'missing'}: "
                                   f"no such file or directory")
