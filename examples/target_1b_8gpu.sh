#!/usr/bin/env bash
# The RegMix 1B target on one 8-GPU node: TP=2 × PP=2 × DP=2, following a RegMix-D schedule.
#   bash examples/target_1b_8gpu.sh sched.json data/tok/tokenizer.model runs/target_1b
set -euo pipefail
SCHEDULE=${1:?usage: target_1b_8gpu.sh SCHEDULE TOKENIZER_MODEL SAVE_DIR}
TOKENIZER_MODEL=${2:?tokenizer model}
SAVE=${3:?save dir}
cd "$(dirname "$0")/.."
mkdir -p "$SAVE"
exec torchrun --nproc_per_node 8 --nnodes 1 --master-port "${MASTER_PORT:-29500}" pretrain_regmixd.py \
    --config examples/target_1b.yaml \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
    --data-schedule "$SCHEDULE" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --data-cache-path "$SAVE/cache" --save "$SAVE" --load "$SAVE" \
    --tensorboard-dir "$SAVE/tensorboard"
