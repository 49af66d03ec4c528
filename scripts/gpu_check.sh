#!/usr/bin/env bash
# GPU readiness check, one CUDA device, under 8 minutes:
#   1. the CUDA tests (pytest -m cuda: compiled quantizer kernels == eager, AMP fp16/bf16 steps finite,
#      a quantized checkpoint saved on CUDA reloads on CPU);
#   2. the step-time and peak-memory benchmark on CUDA (bench/step_time.py, short setting);
#   3. a 2-epoch FP and a 2-epoch W2A2 run of vit_6_4_32 on the full CIFAR-10 JPEG set.
# Without CUDA every part is skipped with a one-line message and the script exits 0.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default outputs/gpu_check; logs, bench tables, run dirs)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-outputs/gpu_check}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: SKIP CUDA tests (pytest -m cuda): no CUDA device"
    echo "gpu_check: SKIP step-time and memory benchmark on CUDA: no CUDA device"
    echo "gpu_check: SKIP 2-epoch FP + W2A2 vit_6_4_32 runs on CIFAR-10: no CUDA device"
    exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run (a command or a function below) with a time limit, log, one line
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if timeout "$limit" bash -c '"$@"' _ "$@" >"$OUT_DIR/$name.log" 2>&1; then
        echo "gpu_check: OK   $name ($((SECONDS - start)) s)"
    else
        echo "gpu_check: FAIL $name (exit $?, $((SECONDS - start)) s; last lines of $OUT_DIR/$name.log:)"
        tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/    /'
        failed+=("$name")
    fi
}

cifar10() {  # data/cifar10 from the shared JPEG archive, extracted once
    [ -n "$(ls -A data/cifar10 2>/dev/null)" ] && return 0
    for tar in "${CIFAR10_TAR:-}" ../shared/data/cifar10-jpg.tar.gz shared/data/cifar10-jpg.tar.gz \
               /work/shared/data/cifar10-jpg.tar.gz; do
        if [ -n "$tar" ] && [ -f "$tar" ]; then
            mkdir -p data/cifar10.tmp && tar xzf "$tar" -C data/cifar10.tmp && mv data/cifar10.tmp data/cifar10
            return
        fi
    done
    echo "no data/cifar10 and no cifar10-jpg.tar.gz (set CIFAR10_TAR=<path>)" >&2
    return 1
}

run() {  # run QUANT: 2 epochs of vit_6_4_32 with AMP
    "$PY" train.py model=vit_6_4_32 data=cifar10 "data.root=$PWD/data/cifar10" data.num_workers=8 trainer=gpu \
        trainer.max_epochs=2 trainer.enable_progress_bar=false "quant=$1" "name=gpu_check_$1" \
        "paths.output_root=$OUT_DIR/runs" "hydra.run.dir=$OUT_DIR/runs/$1"
}

export PY OUT_DIR
export -f cifar10 run
"$PY" -c "import torch; print('gpu_check: device', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
step cuda_tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider
step bench_step_time 120 "$PY" -m bench.step_time --device cuda --models vit_6_4_32 --batches 128 \
    --configs fp,act2b,w2a2,act2b_attn --kernels --rounds 3 --budget 0.5 --out "$OUT_DIR/bench" --name step_time_cuda
step cifar10_data 30 cifar10
step train_fp 90 run fp
step train_w2a2 90 run w2a2

[ -f "$OUT_DIR/bench/step_time_cuda.md" ] && cat "$OUT_DIR/bench/step_time_cuda.md"
for q in fp w2a2; do
    [ -f "$OUT_DIR/runs/$q/summary.json" ] && "$PY" -c "import json, sys
s = json.load(open(sys.argv[1]))
print('gpu_check: run', sys.argv[2], '| epochs', s['epochs_completed'], '| best val acc', s['best_val_acc'],
      '| test acc', s.get('test_acc'))" "$OUT_DIR/runs/$q/summary.json" "$q"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all parts passed in $SECONDS s"
