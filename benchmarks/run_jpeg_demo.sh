#!/usr/bin/env bash
# JPEG sensitivity at demo scale, on a CPU: the `demo` preset (ResNet-18 at width 16, 8 patches
# per image) trained for 150 steps of 100 images on the CIFAR-10 here (JPEG q75) and on copies
# re-encoded at q50 and q30 (benchmarks/reencode_jpeg.py), SEEDS seeds each, every run probed
# as `make demo` probes (8 patches, 30 linear epochs, 4,000 train / 4,000 test images).
# About 5 minutes a run on our 2-core machine (15 runs with the default 3 seeds).
#
#   bash benchmarks/run_jpeg_demo.sh [OUTDIR] [SEEDS]
#
# Each run's probe results.json is copied to OUTDIR/probe_jpeg_q<Q>_s<seed>.json (the probe
# command and the training run's config are inside). The GPU version of this question is
# run_gpu_accuracy.sh's `jpeg` step (the paper's recipe, full scale).
set -eu
OUT=${1:-benchmarks/results/jpeg_demo}; SEEDS=${2:-3}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT" runs
[ -f data/cifar10/manifest.json ] || $PY tools/convert_datasets.py ../shared/datasets/cifar10-jpeg.tar.xz \
  --name cifar10 --out data --formats memory --no-progress
for q in 50 30; do
  if [ ! -f "data/cifar10_q$q/manifest.json" ]; then
    $PY benchmarks/reencode_jpeg.py data/cifar10 "runs/cifar10_q$q.tar" --quality "$q" --overwrite \
      --stats "$OUT/reencode_q$q.json"
    $PY tools/convert_datasets.py "runs/cifar10_q$q.tar" --name "cifar10_q$q" --out data \
      --formats memory --no-progress
    rm -f "runs/cifar10_q$q.tar"
  fi
done
for seed in $(seq 0 $((SEEDS - 1))); do
  for q in 75 50 30; do
    data=data/cifar10; [ "$q" = 75 ] || data=data/cifar10_q$q
    run=runs/jpeg_demo_q${q}_s$seed
    rm -rf "$run"
    echo "=== $(date -u +%H:%M:%S) q$q seed $seed"
    $PY train.py --config configs/demo.yaml --data "$data" --out "$run" --seed "$seed" \
      --data.max_images 15000 --run.tensorboard false 2>&1 | tr '\r' '\n' | grep "steps in"
    $PY probe.py --checkpoint "$run/ckpt.pt" --data "$data" --test-patches 8 --epochs 30 \
      --max-images 4000 --out "$run/probe" --no-plots --quiet 2>&1 | tail -1
    cp "$run/probe/results.json" "$OUT/probe_jpeg_q${q}_s$seed.json"
  done
done
echo "=== $(date -u +%H:%M:%S) done"
