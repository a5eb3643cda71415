"""Command-line helpers shared by train.py, probe.py, tools/ and benchmarks/: one vocabulary.

The same idea has the same flag everywhere: ``--num-patches`` (patches per image),
``--batch-size`` (images per training step), ``--epochs`` (training epochs),
``--probe-epochs`` / ``--probe-batch-size`` / ``--probe-lr`` (the linear classifier),
``--device`` (auto | cpu | cuda | cuda:K). Old spellings keep working with a one-line note.
"""
from __future__ import annotations

import sys

import yaml

from pipeline.errors import UserError


def rename_flags(argv: list[str], renamed: dict[str, str], prog: str) -> list[str]:
    """``argv`` with deprecated flags (``--old`` or ``--old=value``) replaced by their new names;
    one note per deprecated flag on stderr."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in renamed:
            new = renamed[flag]
            print(f"{prog}: note: {flag} is deprecated; use {new}", file=sys.stderr)
            arg = new + eq + value
        out.append(arg)
    return out


def split_equals(argv: list[str]) -> list[str]:
    """``--key=value`` -> ``--key value`` for every long flag."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            out.extend(arg.split("=", 1))
        else:
            out.append(arg)
    return out


def parse_list(value: str, flag: str) -> list:
    """``1024,256``, ``[1024, 256]`` or ``'[1024, 256]'`` -> a list (items parsed as YAML
    scalars: numbers stay numbers)."""
    text = value.strip()
    try:
        parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, list):
        raise UserError(f"{flag}: cannot read {value!r} as a list; write 1024,256 or '[1024, 256]'")
    return parsed


def print_config(obj: dict) -> None:
    """The resolved configuration as YAML on stdout (``--print-config``)."""
    print(yaml.safe_dump(obj, sort_keys=False), end="")
