#!/usr/bin/env bash
# The accuracy runs of benchmarks/README.md on one GPU, in priority order; every step writes its
# JSON into OUTDIR as soon as it ends, so a later failure (or a time limit) keeps what is done.
#
#   bash benchmarks/run_gpu_accuracy.sh ARCHIVE OUTDIR
#
#  1. the CUDA-only tests (pytest -m cuda)
#  2. CIFAR-10 n=20, 1 epoch: the 1-epoch cosine schedule, and the first epoch of a 2-epoch
#     schedule (the reference README's "1 epoch" command: main.py --epoch 2, checkpoint 0.pt)
#  3. time to accuracy: the n=20 10-epoch preset probed at 0.5, 1, 2, 5, 10 epochs
#  4. CIFAR-10 n=200, the first epoch of a 2-epoch schedule
#  5. CIFAR-10 n=20, first epoch of a 2-epoch schedule in fp32 (is bf16 autocast costing accuracy?)
#  6. the 10-epoch checkpoint of 3 probed two more ways: --eval-mode crops, --feature backbone
# Every probe is the paper's: 128 augmented patches per image, 100 linear epochs.
set -u
ARCHIVE=${1:-../shared/datasets/cifar10-jpeg.tar.xz}; OUT=${2:-benchmarks/results/gpu}
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TTA="$PY benchmarks/time_to_accuracy.py --data data/cifar10"
PROBE='--quiet --no-plots'
step() { echo "=== $(date -u +%H:%M:%S) $*"; }

step gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
[ -f data/cifar10/manifest.json ] || $PY tools/convert_datasets.py "$ARCHIVE" --name cifar10 --out data \
  --formats memory --no-progress 2>&1 | tail -3

step cuda tests
$PY -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"

step n20 1 epoch, 1-epoch schedule
$TTA --config configs/cifar10_n20_e1.yaml --points 1 --out runs/acc_n20_s1 --probe-args "$PROBE" \
  --json "$OUT/time_to_accuracy_c10_n20_e1_sched1.json" 2>&1 | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"
step n20 1 epoch, 2-epoch schedule
$TTA --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 --out runs/acc_n20_s2 --probe-args "$PROBE" \
  --json "$OUT/time_to_accuracy_c10_n20_e1_sched2.json" 2>&1 | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"

step time to accuracy, n20, 10-epoch schedule
$TTA --config configs/cifar10_n20_e10.yaml --points 0.5,1,2,5,10 --out runs/acc_n20_e10 --probe-args "$PROBE" \
  --json "$OUT/time_to_accuracy_c10_n20_e10.json" 2>&1 | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"

step n200 1 epoch, 2-epoch schedule
$TTA --config configs/cifar10_n200_e1.yaml --epochs 2 --points 1 --out runs/acc_n200_s2 --probe-args "$PROBE" \
  --json "$OUT/time_to_accuracy_c10_n200_e1_sched2.json" 2>&1 | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"

step n20 1 epoch, 2-epoch schedule, fp32
$TTA --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 --out runs/acc_n20_s2_fp32 \
  --train-args "--run.amp fp32" --probe-args "$PROBE" \
  --json "$OUT/time_to_accuracy_c10_n20_e1_sched2_fp32.json" 2>&1 | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"
step probe variants of the 10-epoch checkpoint
for a in "--eval-mode crops" "--feature backbone"; do
  tag=$(echo "$a" | tr -dc 'a-z')
  $PY probe.py --checkpoint runs/acc_n20_e10/run/ckpt.pt --data data/cifar10 --out "runs/acc_probe_$tag" \
    $PROBE $a 2>&1 | tail -2
  cp "runs/acc_probe_$tag/results.json" "$OUT/probe_e10_$tag.json"
done
step done
