"""Convert a raw image dataset into the project's on-disk formats, and verify a converted one.

    SOURCE: a directory, or a .tar / .tar.gz / .tar.xz / .zip of one (read in place, never
            extracted), holding CIFAR-10/100 python pickles, Tiny ImageNet's own layout, or
            any ImageFolder tree <split>/<class>/<image>
      └─ open_tree ──▶ Tree                           trees.py
          └─ plan_dataset ──▶ DatasetPlan             layouts.py   classes + per split: paths, labels
              └─ convert                              run.py
                   decode in a Pool ─────────────────  decode.py, parallel.py  (any PIL mode -> RGB
                   │                                   uint8, optional --resize; bounded look-ahead)
                   ├─▶ memory .npy rows in place ────  writers.py
                   ├─▶ FFCV .beton page by page ─────  pipeline.beton.BetonWriter
                   └─▶ DALI shards ──────────────────  pipeline.shards
                   checkpoint every samples_per_shard images; --resume continues  (resume.py)
                   ──▶ OUT/.NAME.tmp-*  ──rename──▶  OUT/NAME   (manifest.json last)
    verify(OUT/NAME): checksums, counts, labels, and that the formats decode to the same pixels
                      (verify.py).

Every format is written as images are decoded: resident memory depends on the workers and
the image size, not on the number of images. File names and the manifest schema come from
pipeline.formats. Bad input raises UserError naming the path.
"""
from ..formats import default_workers
from .decode import Decoded, DecodeSettings, decode_image, encode_jpeg, pixel_stats, \
    pixel_sums, resize_center_crop, to_rgb
from .layouts import DatasetPlan, SplitPlan, plan_dataset, read_classes_file, restrict_classes
from .parallel import parallel_map
from .run import (DEFAULT_JPEG_QUALITY, FFCV_RAW_MAX_SIDE, SAMPLES_PER_SHARD, TOOL_VERSION,
                  BadImage, ConvertOptions, ConvertResult, Interrupted, convert, validate_name)
from .trees import DirTree, TarTree, Tree, ZipTree, download_cifar, open_tree
from .verify import JPEG_MAX_TOL, JPEG_MEAN_TOL, jpeg_tolerance, verify

__all__ = [
    "DEFAULT_JPEG_QUALITY", "FFCV_RAW_MAX_SIDE", "JPEG_MAX_TOL", "JPEG_MEAN_TOL",
    "SAMPLES_PER_SHARD", "TOOL_VERSION", "BadImage", "ConvertOptions", "ConvertResult",
    "DatasetPlan", "DecodeSettings", "Decoded", "DirTree", "Interrupted", "SplitPlan", "TarTree",
    "Tree", "ZipTree", "convert", "decode_image", "default_workers", "download_cifar",
    "encode_jpeg", "jpeg_tolerance", "open_tree", "parallel_map", "pixel_stats", "pixel_sums",
    "plan_dataset", "read_classes_file", "resize_center_crop", "restrict_classes", "to_rgb",
    "validate_name", "verify",
]
