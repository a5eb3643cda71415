"""Export a trained encoder: ckpt.pt -> backbone (.safetensors, torchvision state dict), the
projector's first block, and export.json (see emp_ssl/export.py for the layout).

    python tools/export.py --checkpoint runs/demo/ckpt.pt --out runs/demo/export [--no-projector]

Then, in Python:

    from emp_ssl import load_backbone, embed
    encoder = load_backbone("runs/demo/export")
    feats = embed(images_uint8, encoder)          # (N, d): the probe's bag-of-features feature
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.checkpoint import CheckpointError  # noqa: E402
from pipeline.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a ckpt.pt written by train.py (or converted)")
    ap.add_argument("--out", required=True, help="export directory (created)")
    ap.add_argument("--no-projector", action="store_true",
                    help="leave out the projector's first block (then only the 'backbone' feature)")
    a = ap.parse_args(argv)
    from emp_ssl.export import export_checkpoint

    try:
        meta_path = export_checkpoint(a.checkpoint, a.out, projector=not a.no_projector)
    except (UserError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta_path.parent} ({', '.join(sorted(p.name for p in meta_path.parent.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
