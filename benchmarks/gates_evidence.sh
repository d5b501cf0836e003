#!/bin/bash
# The smoke-scale comparison of docs/gates.md ("Evidence"): ConvNet-AIG, CoDiNet and RDI-Net each with and
# without SP-Net's training, BlockDrop and SkipNet, on the CIFAR-10 subset, the same epochs and training
# images for all, one thread, seeds 0..2 (seed-major, so an interrupted run still has whole seeds). Each run is
# evaluated with the skip protocol (at its own keep threshold, 0.5: accuracy, MACs, open rates per layer) and the budget
# protocol (accuracy at matched MACs: 35M and 50M per image, fitted on the held-out split); the result files
# are copied to results/gates/<run>/ (never weights).
#   [SEEDS="0 1 2"] bash benchmarks/gates_evidence.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
DATA=${1:-../shared/data}
RUNS=${2:-runs/gates}
export OMP_NUM_THREADS=1
PONDER="nice -n 10 ${PYTHON:-python} -m ponder.cli"
COMMON=(--data-dir "$DATA" --set train.epochs=3 --set data.limit_train=800 --set data.val_size=300
        --set data.batch_size=64 --set data.workers=0 --set train.device=cpu)

run() {  # NAME SEED RECIPE [--set ...]: train, evaluate, keep the result files
  local name=$1 seed=$2 recipe=$3; shift 3
  local out=$RUNS/${name}_s$seed
  [ -f "$out/results/budget-targets_35000000.0_50000000.0.json" ] && return 0
  $PONDER train "$recipe" --out "$out" --overwrite "${COMMON[@]}" --set train.seed=$seed "$@"
  $PONDER eval "$out" --protocol skip --option 'thresholds=[]'
  $PONDER eval "$out" --protocol budget --option 'targets=[35000000.0, 50000000.0]'
  mkdir -p results/gates/${name}_s$seed
  cp "$out"/results/*.json "$out"/config.yaml results/gates/${name}_s$seed/
}

# BlockDrop starts from a trained ResNet-32 (its curriculum freezes the backbone): one, trained on the same
# images for the same epochs; then 2 curriculum epochs and 1 of joint fine-tuning.
[ -f "$RUNS/resnet32/weights.safetensors" ] || $PONDER train recipes/cifar10/resnet32.yaml --out "$RUNS/resnet32" \
  --overwrite "${COMMON[@]}" --set schedule.name=cosine --set model.kwargs.shortcut=avgpool

for s in ${SEEDS:-0 1 2}; do
  run aig $s recipes/cifar10/aig_resnet32_cpu_subset.yaml
  run aig_spnet $s recipes/cifar10/spnet_resnet32_cpu_subset.yaml
  run codinet $s recipes/cifar10/codinet_resnet32_cpu_subset.yaml
  run codinet_spnet $s recipes/cifar10/spnet_resnet32_cpu_subset.yaml --set model.name=codinet_resnet32_cifar \
    --set 'model.kwargs={num_classes: 10}'
  run rdinet $s recipes/cifar10/rdinet_resnet32_cpu_subset.yaml
  run rdinet_spnet $s recipes/cifar10/spnet_resnet32_cpu_subset.yaml --set model.name=rdinet_resnet32_cifar \
    --set 'model.kwargs={num_classes: 10}'
  run blockdrop $s recipes/cifar10/blockdrop_resnet32_cpu_subset.yaml --set train.init_from=$RUNS/resnet32 \
    --set method.kwargs.curriculum_epochs=2
  run skipnet $s recipes/cifar10/skipnet_resnet38_sp_cpu.yaml
done
