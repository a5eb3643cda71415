#!/usr/bin/env bash
# The GPU measurements, in priority order, each step's output kept even if a later one fails:
# convert CIFAR-10 (memory), train the paper's 1-epoch n=20 recipe, probe it (128 patches,
# 100 epochs), then training and pipeline throughput. Usage: bash benchmarks/run_gpu_suite.sh ARCHIVE OUTDIR
set -u
ARCHIVE=${1:-../shared/datasets/cifar10-jpeg.tar.xz}; OUT=${2:-benchmarks/results/gpu}
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)" >> "$OUT/gpu.txt"
[ -f data/cifar10/manifest.json ] || $PY tools/convert_datasets.py "$ARCHIVE" --name cifar10 --out data \
  --formats memory --no-progress 2>&1 | tail -3
rm -rf runs/c10_n20_e1  # a fresh run: a failed step must not leave an old result to copy
$PY train.py --config configs/cifar10_n20_e1.yaml --data data/cifar10 --out runs/c10_n20_e1 \
  --run.log_every 50 2>&1 | grep -v "it/s\]$\|step/s" | tail -5
cp runs/c10_n20_e1/metrics.jsonl "$OUT/train_c10_n20_e1_metrics.jsonl"
$PY probe.py --checkpoint runs/c10_n20_e1/ckpt.pt --data data/cifar10 --out runs/c10_n20_e1/probe \
  --quiet --no-plots 2>&1 | tail -5
cp runs/c10_n20_e1/probe/results.json "$OUT/probe_c10_n20_e1.json"
$PY benchmarks/train_throughput.py --data data/cifar10 --options eager --n 20,200 \
  --json "$OUT/train_throughput.json" 2>&1 | tail -8
$PY benchmarks/pipeline_throughput.py --data data/cifar10 --sources memory,reference --devices cuda \
  --json "$OUT/pipeline_throughput.json" 2>&1 | tail -8
