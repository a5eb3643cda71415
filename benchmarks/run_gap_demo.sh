#!/usr/bin/env bash
# The accuracy-gap experiments at demo scale, on a CPU: the `demo` preset (ResNet-18 at width 16,
# 8 patches per image) trained for 150 steps of 100 images, SEEDS seeds per variant, every run
# probed as `make demo` probes (8 patches, 30 linear epochs, 4,000 train / 4,000 test images).
# About 5 minutes a run on our 2-core machine (12 runs with the defaults).
#
#   bash benchmarks/run_gap_demo.sh [OUTDIR] [SEEDS] [VARIANTS] [FIRST_SEED]
#
# SEEDS seeds per variant, numbered from FIRST_SEED (default 0): more seeds later, same files.
#
# VARIANTS (comma list, default q75,q50,q30,bn2):
#   q75   the CIFAR-10 here as it is (JPEG q75): the baseline
#   q50   the same re-encoded at JPEG quality 50 (benchmarks/reencode_jpeg.py), train and probe
#   q30   ... at quality 30
#   bn2   q75 with --patch-chunk 4: BatchNorm statistics per half of the 8 patch groups, as the
#         reference's nn.DataParallel computes them on two GPUs
#   ref   q75 trained on the reference source (--source reference: torchvision's transforms on
#         PIL images, patch by patch, in DataLoader workers, as the paper's code does) instead
#         of the device pipeline: does our augmentation train as well as the reference's?
#         (~2 minutes more a run: the CPU also does the augmentation)
# Each run's probe results.json is copied to OUTDIR/probe_<variant>_s<seed>.json and its
# resolved training config to OUTDIR/train_config_<variant>_s<seed>.yaml. The full-scale
# versions are run_gpu_accuracy.sh's `jpeg` and `bn2` steps.
set -eu
OUT=${1:-benchmarks/results/gap_demo}; SEEDS=${2:-3}; VARIANTS=${3:-q75,q50,q30,bn2}; FIRST=${4:-0}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT" runs
[ -f data/cifar10/manifest.json ] || $PY tools/convert_datasets.py ../shared/datasets/cifar10-jpeg.tar.xz \
  --name cifar10 --out data --formats memory --no-progress
for v in ${VARIANTS//,/ }; do
  case $v in q75|bn2|ref) ;; q[0-9]*) q=${v#q}
    if [ ! -f "data/cifar10_q$q/manifest.json" ]; then
      $PY benchmarks/reencode_jpeg.py data/cifar10 "runs/cifar10_q$q.tar" --quality "$q" --overwrite \
        --stats "$OUT/reencode_q$q.json" --convert-to "data/cifar10_q$q"
    fi ;;
  *) echo "run_gap_demo: unknown variant '$v' (choose from q75, qNN, bn2, ref)" >&2; exit 2 ;;
  esac
done
for seed in $(seq "$FIRST" $((FIRST + SEEDS - 1))); do
  for v in ${VARIANTS//,/ }; do
    data=data/cifar10; extra=()
    case $v in q75) ;; bn2) extra=(--patch-chunk 4) ;; ref) extra=(--source reference) ;; *) data=data/cifar10_$v ;; esac
    run=runs/gap_demo_${v}_s$seed
    rm -rf "$run"
    echo "=== $(date -u +%H:%M:%S) $v seed $seed"
    $PY train.py --config configs/demo.yaml --data "$data" --out "$run" --seed "$seed" \
      --data.max_images 15000 --run.tensorboard false "${extra[@]}" 2>&1 | tr '\r' '\n' | grep "steps in"
    $PY probe.py --checkpoint "$run/ckpt.pt" --data "$data" --test-patches 8 --epochs 30 \
      --max-images 4000 --out "$run/probe" --no-plots --quiet 2>&1 | tail -1
    cp "$run/probe/results.json" "$OUT/probe_${v}_s$seed.json"
    cp "$run/config.yaml" "$OUT/train_config_${v}_s$seed.yaml"
  done
done
echo "=== $(date -u +%H:%M:%S) done"
