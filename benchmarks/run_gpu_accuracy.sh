#!/usr/bin/env bash
# The accuracy runs of benchmarks/README.md on one GPU, in priority order; every step writes its
# JSON into OUTDIR as soon as it ends, so a later failure (or a time limit) keeps what is done.
#
#   bash benchmarks/run_gpu_accuracy.sh ARCHIVE OUTDIR [STEPS]
#   JITTER=fixed bash benchmarks/run_gpu_accuracy.sh ...   # colour jitter order of the 2026-11-22 runs
#
# STEPS: comma-separated names, default "tests,n20_e1,tta10,n200_e1,fp32,probes": the runs of
# results/gpu_acc_20261122/, in that order (each JSON's "command" is the exact one used; the
# patch draws have changed since, so JITTER=fixed re-runs them closely, not bit for bit).
# Every run starts afresh: its runs/acc_<name> folder is removed first.
# Steps run in this order, whatever order STEPS lists them in: tests, n20_e1, tta10, n200_e1,
# fp32, probes, jpeg, seed, ref, bn2, bn4, tta30.
#  tests    the CUDA-only tests (pytest -m cuda)
#  n20_e1   CIFAR-10 n=20, 1 epoch: under the 1-epoch cosine, and as the first epoch of a
#           2-epoch cosine (the reference README's "1 epoch" command: main.py --epoch 2, 0.pt)
#  tta10    time to accuracy: the n=20 10-epoch preset probed at 0.5, 1, 2, 5, 10 epochs
#  n200_e1  CIFAR-10 n=200, the first epoch of a 2-epoch cosine
#  fp32     n20_e1's 2-epoch variant in fp32 (is bf16 autocast costing accuracy?)
#  probes   tta10's last checkpoint probed two more ways: --eval-mode crops, --feature backbone
#  bn2      n20_e1's 2-epoch variant with --patch-chunk 10: BatchNorm statistics over each half of
#           the patch groups, as the reference's nn.DataParallel computes them on two GPUs (here
#           the running averages are updated by both halves; DataParallel keeps the first's)
#  bn4      the same with --patch-chunk 5: BatchNorm per quarter, as on four GPUs
#  tta30    time to 90%: the n=20 30-epoch preset probed at 10, 20, 29, 30 epochs (~11 min of
#           training on an H100, ~5 min of probes; 29 epochs is about 10 training minutes)
#  jpeg     n20_e1's 2-epoch variant on copies of the data re-encoded at JPEG quality 50 and 30
#           (benchmarks/reencode_jpeg.py): accuracy against JPEG loss, to judge how much of the
#           gap to the paper the q75 copy here can explain (~2 min per quality)
#  seed     n20_e1's 2-epoch variant with --seed 1: the run-to-run spread those differences
#           must exceed
#  ref      n20_e1's 2-epoch variant fed by the reference source (--source reference: the paper's
#           torchvision-on-PIL augmentation, patch by patch, in DataLoader workers): does our
#           device augmentation train as well at full scale? (~4 min: the CPU path feeds ~16k
#           patches/s on 16 cores, so it is the bottleneck). Jitter order random whatever JITTER
#           says: compare it with n20_e1 run with the default JITTER=random
# Every probe is the paper's: 128 augmented patches per image, 100 linear epochs.
set -u
ARCHIVE=${1:-../shared/datasets/cifar10-jpeg.tar.xz}; OUT=${2:-benchmarks/results/gpu}
STEPS=",${3:-tests,n20_e1,tta10,n200_e1,fp32,probes},"
JITTER=${JITTER:-random}
mkdir -p "$OUT" runs; export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TTA="$PY benchmarks/time_to_accuracy.py --data data/cifar10"  # a later --data wins
PROBE='--quiet --no-plots'
TRAIN="--augment.jitter_order $JITTER"
step() { echo "=== $(date -u +%H:%M:%S) $*"; }
want() { [[ $STEPS == *",$1,"* ]]; }
tta() {  # tta NAME ARGS...: one time_to_accuracy run, its JSON in OUT, the full log in runs/
  local name=$1; shift
  rm -rf "runs/acc_$name"  # time_to_accuracy.py would resume a run left there
  $TTA --out "runs/acc_$name" --probe-args "$PROBE" --json "$OUT/time_to_accuracy_$name.json" "$@" 2>&1 \
    | tee -a runs/acc_full.log | grep -E "^epoch|wrote|rror|Error"
}

step gpu, jitter order $JITTER, steps $STEPS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
[ -f data/cifar10/manifest.json ] || $PY tools/convert_datasets.py "$ARCHIVE" --name cifar10 --out data \
  --formats memory --no-progress 2>&1 | tail -3

if want tests; then
  step cuda tests
  $PY -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
fi
if want n20_e1; then
  step n20 1 epoch, 1-epoch schedule
  tta c10_n20_e1_sched1 --config configs/cifar10_n20_e1.yaml --points 1 --train-args "$TRAIN"
  step n20 1 epoch, 2-epoch schedule
  tta c10_n20_e1_sched2 --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 --train-args "$TRAIN"
fi
if want tta10; then
  step time to accuracy, n20, 10-epoch schedule
  tta c10_n20_e10 --config configs/cifar10_n20_e10.yaml --points 0.5,1,2,5,10 --train-args "$TRAIN"
fi
if want n200_e1; then
  step n200 1 epoch, 2-epoch schedule
  tta c10_n200_e1_sched2 --config configs/cifar10_n200_e1.yaml --epochs 2 --points 1 --train-args "$TRAIN"
fi
if want fp32; then
  step n20 1 epoch, 2-epoch schedule, fp32
  tta c10_n20_e1_sched2_fp32 --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 \
    --train-args "$TRAIN --run.amp fp32"
fi
if want probes; then
  step probe variants of the 10-epoch checkpoint
  for a in "--eval-mode crops" "--feature backbone"; do
    tag=$(echo "$a" | tr -dc 'a-z')
    rm -rf "runs/acc_probe_$tag"
    if $PY probe.py --checkpoint runs/acc_c10_n20_e10/run/ckpt.pt --data data/cifar10 \
        --out "runs/acc_probe_$tag" $PROBE $a > "runs/acc_probe_$tag.log" 2>&1; then
      cp "runs/acc_probe_$tag/results.json" "$OUT/probe_e10_$tag.json"
    fi
    tail -2 "runs/acc_probe_$tag.log"
  done
fi
if want jpeg; then
  for q in 50 30; do
    step n20 1 epoch, 2-epoch schedule, data re-encoded at JPEG quality $q
    if ! $PY benchmarks/reencode_jpeg.py data/cifar10 "runs/cifar10_q$q.tar" --quality $q --overwrite \
         --stats "$OUT/reencode_q$q.json" --convert-to "data/cifar10_q$q" > "runs/reencode_q$q.log" 2>&1
    then
      echo "jpeg q$q: re-encoding or conversion failed (runs/reencode_q$q.log); skipped"; continue
    fi
    tta "c10_n20_e1_sched2_q$q" --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 \
      --data "data/cifar10_q$q" --train-args "$TRAIN"
  done
fi
if want seed; then
  step n20 1 epoch, 2-epoch schedule, seed 1
  tta c10_n20_e1_sched2_seed1 --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 \
    --train-args "$TRAIN --seed 1"
fi
if want ref; then
  step n20 1 epoch, 2-epoch schedule, reference source
  tta c10_n20_e1_sched2_refsource --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 \
    --train-args "--augment.jitter_order random --source reference"  # torchvision's order
fi
for g in 2 4; do
  if want bn$g; then
    step n20 1 epoch, 2-epoch schedule, BatchNorm per 1/$g of the patch groups
    tta c10_n20_e1_sched2_bn$g --config configs/cifar10_n20_e1.yaml --epochs 2 --points 1 \
      --train-args "$TRAIN --patch-chunk $((20 / g))"
  fi
done
if want tta30; then
  step time to 90%, n20, 30-epoch schedule
  tta c10_n20_e30 --config configs/cifar10_n20_e30.yaml --points 10,20,29,30 --train-args "$TRAIN"
fi
step done
