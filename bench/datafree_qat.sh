#!/usr/bin/env bash
# Data-free QAT rows of bench/DATA_FREE.md (issue 18): zoo:resnet20 fine-tuned by KD from itself on one budget
# (400 steps of 128, conf/experiment/datafree/resnet20_w4a4_*), images from real data, the GDFQ generator, or
# the GDFQ generator with Qimera's boundary samples (QIMERA_FRACTION of each batch superposed, default 0.5).
# Resumable: a finished run (summary.json "finished": true) is skipped, an interrupted one resumes.
#   bash bench/datafree_qat.sh [w4a4 w5a5]     SOURCES="real gdfq qimera" (default all three)
#   results: test acc in each outputs/datafree/resnet20_<bits>_<source>/summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
BITS=${*:-w4a4 w5a5}
SOURCES=${SOURCES:-real gdfq qimera}
QIMERA_FRACTION=${QIMERA_FRACTION:-0.5}
DATA=${DATA:-data.root=data/cifar10/cifar10-jpg data.num_workers=1}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

for q in $BITS; do
  for src in $SOURCES; do
    run="outputs/datafree/resnet20_${q}_$src"
    grep -qs '"finished": true' "$run/summary.json" && continue
    case $src in
      real) args=(experiment=datafree/resnet20_w4a4_real) ;;
      gdfq) args=(experiment=datafree/resnet20_w4a4_gdfq) ;;
      qimera) args=(experiment=datafree/resnet20_w4a4_gdfq "+data.synthetic.gdfq.boundary_fraction=$QIMERA_FRACTION") ;;
      *) echo "bench/datafree_qat.sh: SOURCES has '$src'; choose from real gdfq qimera" >&2; exit 2 ;;
    esac
    "$PYTHON" train.py "${args[@]}" $DATA "quant=$q" "name=datafree/resnet20_${q}_$src" \
      "description='resnet20 $q: data-free QAT ($src images), 400 steps of 128, KD from zoo:resnet20'" \
      compile=quantizers logger=csv "hydra.run.dir=$run" resume=auto
  done
done
