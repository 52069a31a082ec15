#!/usr/bin/env bash
# Reproduce the shipped default model on one GPU machine: simulate, train, evaluate.
#
#   bash training/recipes/default_model_gpu.sh            # then: make ship VERSION=x.y.z PIT_MAP=$RUN/pit-map.json
#
# Simulates the held-out set (seed 2) and the training set (seed 1) with every
# core, trains pasquet2019_half with the data held in GPU memory (--preload),
# bfloat16 autocast, and scores the best checkpoint against the kNN baseline.
# Measured on an H100 machine with 16 vCPUs (DATA=/dev/shm/data, N_TRAIN=120000,
# BUDGET_S=545): 1,060 galaxies/s simulated (simulator 1.3.0; 1.6.0 costs about
# as much per galaxy on this machine's cores, so expect ~1,000/s: ~2 min for
# 130,000), ~12,000 cutouts/s trained at batch 256, 27 epochs in 410 s. BUDGET_S
# caps the whole run: the number of epochs is chosen to fit (learning rate / 5
# halfway), and a SIGTERM checkpoint guards the rest.
#
# MEMBERS=K trains K networks (seeds 0..K-1) in the same budget and exports them as
# one deep ensemble (PARALLEL=1: all at once on the one GPU, each with the whole budget; two
# half-width networks at once trained at ~8,100 cutouts/s each on an H200; one alone, ~12,000/s on an
# H100); EPOCHS=E fixes the number of epochs. RECALIBRATE=1 fits each member's softmax temperature on its
# validation rows first (photoz recalibrate). DROPOUT=p trains with dropout in the dense head and MC_PASSES=T
# exports it as MC dropout (T passes, masks fixed in the graph), scoring the plain network beside it
# (eval-plain/). PIT_MAP=1 (the default) simulates N_CAL more galaxies (seed 3, never trained on) and fits a
# conditional PIT map on them (photoz calibrate-pit), applied in the exported graph. The evaluation then scores
# the bundle ($RUN/model.onnx) that `make ship`'s steps would export. Members share one validation split
# (--split-seed 0).
set -euo pipefail
PHOTOZ=${PHOTOZ:-photoz}
PYTHON=${PYTHON:-python}  # the interpreter photoz is installed in
DATA=${DATA:-data}
RUN=${RUN:-runs/default}
N_TRAIN=${N_TRAIN:-200000}
N_TEST=${N_TEST:-10000}
N_CAL=${N_CAL:-20000}
PIT_MAP=${PIT_MAP:-1}
BATCH=${BATCH:-256}
LR=${LR:-1.5e-4}
VARIANT=${VARIANT:-pasquet2019_half}
MAX_EPOCHS=${MAX_EPOCHS:-40}
BUDGET_S=${BUDGET_S:-3600}
RATE=${RATE:-13000}  # expected training cutouts/s, to size the epochs to BUDGET_S
MEMBERS=${MEMBERS:-1}
PARALLEL=${PARALLEL:-0}  # 1: train the members at once
EPOCHS=${EPOCHS:-}      # default: as many as BUDGET_S allows
RECALIBRATE=${RECALIBRATE:-0}
DROPOUT=${DROPOUT:-0}      # dropout rate after the hidden dense layers (training)
MC_PASSES=${MC_PASSES:-0}  # > 0 (with DROPOUT > 0, one member): export as MC dropout, and score the plain net too
if (( MC_PASSES > 0 && MEMBERS > 1 )); then echo "MC_PASSES needs MEMBERS=1"; exit 1; fi
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

# one thread per simulation worker process: the pool already uses every core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
$PHOTOZ simulate --n "$N_TEST" --seed 2 --out "$DATA/sim-test.h5" --quiet
$PHOTOZ simulate --n "$N_TRAIN" --seed 1 --out "$DATA/sim-train.h5" --quiet
if (( PIT_MAP )); then $PHOTOZ simulate --n "$N_CAL" --seed 3 --out "$DATA/sim-cal.h5" --quiet; fi
echo "simulated $N_TRAIN + $N_TEST galaxies in $(elapsed) s"

left=$(( BUDGET_S - $(elapsed) - 120 ))  # keep two minutes for evaluation
epoch_s=$(( N_TRAIN * 9 / 10 / RATE + 3 ))
sequential=$(( PARALLEL ? 1 : MEMBERS ))  # members that share the budget one after another
(( PARALLEL )) && epoch_s=$(( epoch_s * MEMBERS * 2 / 3 ))  # members at once share the GPU (2 at once: ~2/3 of one alone's rate each)
epochs=${EPOCHS:-$(( left / epoch_s / sequential ))}
epochs=$(( epochs > MAX_EPOCHS ? MAX_EPOCHS : epochs ))
if (( epochs < 2 )); then echo "not enough time left to train ($left s for $MEMBERS member(s))"; exit 1; fi
train_member() {  # seed, run directory
    echo "training $VARIANT (seed $1) for $epochs epochs (~$epoch_s s each)"
    timeout --signal=TERM "$(( left / sequential + 30 ))" \
        $PHOTOZ train --data "$DATA/sim-train.h5" --out "$2" --variant "$VARIANT" --epochs "$epochs" \
        --batch-size "$BATCH" --lr "$LR" --seed "$1" --split-seed 0 --dropout "$DROPOUT" --preload --quiet \
        || echo "training (seed $1) stopped by the time budget"
}
member_dir() { if (( MEMBERS > 1 )); then echo "$RUN/member-$1"; else echo "$RUN"; fi; }
if (( PARALLEL )); then
    for (( k = 0; k < MEMBERS; k++ )); do train_member "$k" "$(member_dir "$k")" & done
    wait
fi
checkpoints=()
for (( k = 0; k < MEMBERS; k++ )); do
    member=$(member_dir "$k")
    (( PARALLEL )) || train_member "$k" "$member"
    cat "$member/metrics.csv"
    checkpoint=$member/best.pt
    if (( RECALIBRATE )); then
        $PHOTOZ recalibrate --checkpoint "$checkpoint" --out "$member/calibrated.pt"
        checkpoint=$member/calibrated.pt
    fi
    checkpoints+=("$checkpoint")
done
echo "trained in $(elapsed) s"
if (( MEMBERS == 1 && ! RECALIBRATE && MC_PASSES == 0 )); then
    model=$RUN/best.pt
else
    $PHOTOZ export --checkpoint "${checkpoints[@]}" --out "$RUN/model.onnx" --name photoz-sdss-sim --version 0.0.0 \
        --mc-passes "$MC_PASSES"
    model=$RUN/model.onnx
fi
if (( PIT_MAP )); then  # fitted on the very graph that is exported (temperature, ensemble, MC dropout included)
    $PHOTOZ calibrate-pit --model "$model" --data "$DATA/sim-cal.h5" --out "$RUN/pit-map.json"
    $PHOTOZ export --checkpoint "${checkpoints[@]}" --out "$RUN/model.onnx" --name photoz-sdss-sim --version 0.0.0 \
        --mc-passes "$MC_PASSES" --pit-map "$RUN/pit-map.json"
    model=$RUN/model.onnx
fi
if (( MC_PASSES > 0 )); then  # the same network without MC dropout, for the comparison
    $PHOTOZ evaluate --model "${checkpoints[0]}" --data "$DATA/sim-test.h5" --out "$RUN/eval-plain" --no-figures
fi
$PHOTOZ evaluate --model "$model" --data "$DATA/sim-test.h5" --baseline-train "$DATA/sim-train.h5" \
    --out "$RUN/eval"
if [[ $model == *.onnx ]]; then  # the out-of-distribution flags (thresholds measured at export): what they catch
    $PYTHON -m photoz.training.evaluation.ood --model "$model" --data "$DATA/sim-test.h5" --out "$RUN/eval" || true
fi
echo "done in $(elapsed) s"
