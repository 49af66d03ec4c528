#!/usr/bin/env bash
# PTQ tables on a zoo model, one ptq.py run per cell, resumable (a cell with a finished summary.json is skipped).
#   bash bench/zoo_tables.sh [zoo name] [table ...]     tables: recon weights acts dfq datafree vit004   (default: the first four)
#   python -m bench.ptq_bench --collect outputs/tables/<zoo name>/<table>
# Two shells can share a table: a cell another shell is running is skipped (run the second with the bits reversed,
# e.g. ACT_BITS="w32a2 w32a3 w32a4 w32a5 w32a6 w32a7 w32a8").
set -euo pipefail
cd "$(dirname "$0")/.."
ZOO=${1:-resnet20_short}
shift || true
TABLES=${*:-recon weights acts dfq}
DATA=${DATA:-data.root=data/cifar10/cifar10-jpg data.num_workers=1}   # overrides, split on spaces
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RECON_ITERS=${RECON_ITERS:-200}       # per unit, block- and network-wise alike (the papers: 20k per unit)
# Adam moves alpha by about lr per step and h needs |alpha| ~ 3 to reach 0 or 1: lr 1e-3 suits the papers' 20k
# iterations, not 200; the tables use lr = 4 / iterations (0.02 at 200)
RECON_LR=${RECON_LR:-$(python3 -c "print(4 / $RECON_ITERS)")}
RECON_BITS=${RECON_BITS:-w4a4 w3a3 w2a2}
WEIGHT_BITS=${WEIGHT_BITS:-w8a32 w7a32 w6a32 w5a32 w4a32 w3a32 w2a32}
ACT_BITS=${ACT_BITS:-w32a8 w32a7 w32a6 w32a5 w32a4 w32a3 w32a2}
ADAROUND_BITS=${ADAROUND_BITS:-w4a32 w3a32 w2a32}   # AdaRound (block-wise, from mse_channel) weight-only cells
RECON_PRESETS=${RECON_PRESETS:-brecq qdrop adaqtransform nwq case2_2 adaqtransform_nwq}
DF_BITS=${DF_BITS:-w4a4 w5a5}                                # datafree: bit widths
DF_SOURCES=${DF_SOURCES:-real gaussian zeroq zeroq_intraq}   # datafree: calibration images (BN-free ViTs: real gaussian psaq)
DF_PTQ=${DF_PTQ:-mse_channel brecq}                          # datafree: methods run on every source
DF_SYNTH=${DF_SYNTH:-}                                       # datafree: extra overrides of the synthetic sources
VIT_BITS=${VIT_BITS:-w4a4 w6a6}                              # vit004: n_bits of seed 004

source_args() {  # calibration source -> overrides (synthetic banks are cached: made once per model and settings)
  case $1 in
    real) ;;
    gaussian|zeroq|psaq) echo "data=synthetic data.synthetic.method=$1 $DF_SYNTH" ;;
    zeroq_intraq) echo "data=synthetic data.synthetic.method=zeroq +data.synthetic.zeroq.ce_weight=1 +data.synthetic.zeroq.intra_weight=1 $DF_SYNTH" ;;
    *) echo "unknown source $1: choose from real gaussian zeroq zeroq_intraq psaq" >&2; exit 2 ;;
  esac
}

cell() {  # table quant ptq [overrides...]
  local table=$1 quant=$2 ptq=$3; shift 3
  local dir="outputs/tables/$ZOO/$table/$quant-$ptq${*:+-$(echo "$*" | tr ' =/' '_:-')}"
  if grep -qs '"finished": true' "$dir/summary.json"; then return; fi
  local pattern; pattern=$(printf '%s' "hydra.run.dir=$dir" | sed 's/[][\.*^$+?(){}|]/\\&/g')
  if pgrep -f -- "$pattern( |\$)" > /dev/null; then echo "-- $dir: running in another shell"; return; fi
  echo "== $dir"
  "$PYTHON" ptq.py "ckpt=zoo:$ZOO" $DATA "quant=$quant" "ptq=$ptq" "hydra.run.dir=$dir" "$@"
}

for table in $TABLES; do
  case $table in
    recon)  # seed 003's presets from the same mse_channel start (weights per channel, inputs per tensor)
      for q in $RECON_BITS; do
        cell recon "$q" mse_channel ptq.act_granularity=layer
        for p in $RECON_PRESETS; do
          cell recon "$q" "$p" ptq.recon.iters="$RECON_ITERS" ptq.recon.lr="$RECON_LR"
        done
      done ;;
    weights)
      for q in $WEIGHT_BITS; do
        for p in minmax_layer minmax_channel mse_channel awq; do cell weights "$q" "$p"; done
        cell weights "$q" mse_channel ptq.bias_correct=true
        cell weights "$q" mse_channel ptq.bias_correct=variance
      done
      for q in $ADAROUND_BITS; do
        cell weights "$q" adaround ptq.recon.iters="$RECON_ITERS" ptq.recon.lr="$RECON_LR"
      done ;;
    acts)
      for q in $ACT_BITS; do
        for p in minmax_layer mse_layer percentile aciq_layer omse minmax_channel; do cell acts "$q" "$p"; done
      done ;;
    dfq)  # seed 001: DFQ (no data at all for weight-only cells; inputs still calibrate on images) vs min/max per layer
      for q in w8a32 w6a32 w4a32 w8a8 w4a8; do
        cell dfq "$q" minmax_layer
        cell dfq "$q" dfq
      done
      cell dfq w4a32 dfq ptq.bias_correct=false       # CLE (+ bias absorption) alone
      cell dfq w4a32 minmax_layer ptq.bias_correct=true  # empirical bias correction, for comparison
      ;;
    datafree)  # seed 001: the same PTQ methods calibrated on real, gaussian and synthesised images
      for q in $DF_BITS; do
        for src in $DF_SOURCES; do
          args=$(source_args "$src")
          for p in $DF_PTQ; do
            case $p in
              mse_channel) cell datafree "$q" "$p" ptq.act_granularity=layer $args ;;
              adaround|brecq|qdrop|nwq|case2_2|adaqtransform*)
                 cell datafree "$q" "$p" ptq.recon.iters="$RECON_ITERS" ptq.recon.lr="$RECON_LR" $args ;;
              *) cell datafree "$q" "$p" $args ;;
            esac
          done
        done
      done ;;
    vit004)  # seed 004 (ptq=vit_ptq) and its parts: stem / head at n bits or 8 (or FP), groups off / static / dynamic
      for q in $VIT_BITS; do
        n=${q#w}; n=${n%%a*}
        cell vit004 "$q" vit_ptq
        cell vit004 "$q" vit_ptq ptq.dynamic_groups=true ptq.test_before_calibration=false
        cell vit004 "$q" vit_ptq ptq.n_groups=null ptq.test_before_calibration=false
        cell vit004 "$q" vit_ptq ptq.head_stem_8bit=false "quant.head_stem_bits=$n" ptq.test_before_calibration=false
        cell vit004 "$q" vit_ptq ptq.head_stem_8bit=false "quant.head_stem_bits=$n" ptq.n_groups=null \
          ptq.test_before_calibration=false
        cell vit004 "$q" vit_ptq ptq.head_stem_8bit=false ptq.test_before_calibration=false  # stem / head FP
      done ;;
    *) echo "unknown table $table: choose from recon weights acts dfq datafree vit004" >&2; exit 2 ;;
  esac
done
