#!/usr/bin/env bash
# PTQ as QAT initialisation (issue 16): QAT of zoo:resnet20 from the default LSQ init vs from a PTQ run
# (mse_channel + AdaRound, activation steps learnt jointly), W4A4 and W2A2, weights per channel, on one budget:
# the recipe of conf/experiment/datafree/resnet20_w4a4_real (400 steps of 128 real images, KD from zoo:resnet20,
# no labels).
# Resumable: a finished run (summary.json "finished": true) is skipped, an interrupted one resumes.
#   bash bench/ptq_init.sh [w4a4 w2a2]      results: test acc in each outputs/ptq_init/resnet20/*/summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${*:-w4a4 w2a2}
DATA=${DATA:-data.root=data/cifar10/cifar10-jpg data.num_workers=1}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RECON_ITERS=${RECON_ITERS:-200}
RECON_LR=${RECON_LR:-$(python3 -c "print(4 / $RECON_ITERS)")}   # as bench/zoo_tables.sh
INITS=${INITS:-lsq ptq}   # INITS=lsq / INITS=ptq: one of the two QAT runs (two shells can run one each)
OUT=outputs/ptq_init/resnet20

done_() { grep -qs '"finished": true' "$1/summary.json"; }

for q in $BITS; do
  ptq="$OUT/$q-ptq-adaround"
  done_ "$ptq" || "$PYTHON" ptq.py ckpt=zoo:resnet20 $DATA "quant=$q" ptq=adaround ptq.recon.iters="$RECON_ITERS" \
    ptq.recon.lr="$RECON_LR" "hydra.run.dir=$ptq"
  for init in $INITS; do
    run="$OUT/$q-qat-from-$init"   # weights per output channel in both: the PTQ start is mse_channel
    done_ "$run" && continue
    from=zoo:resnet20; [ "$init" = ptq ] && from="$ptq"
    "$PYTHON" train.py experiment=datafree/resnet20_w4a4_real $DATA "quant=$q" quant.weight.per_channel=true "init_from=$from" \
      "name=ptq_init/resnet20_$q-from-$init" \
      "description='resnet20 $q: QAT from the $init init, 400 steps of 128 real images, KD from zoo:resnet20'" compile=quantizers logger=csv "hydra.run.dir=$run" resume=auto
  done
done
