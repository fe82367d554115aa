#!/usr/bin/env bash
# Instruction tuning of the length perception module (LoRA), under accelerate so that several GPUs work.
#
#   bash train.sh                 # the paper: Vicuna-7B, 3 epochs, batch 2 x 16 accumulation, lr 2e-5, cosine,
#                                 # warm-up 0.03 (warmup_steps 0.03: transformers 5 takes a ratio there), bf16 -> ./ckpts/vicuna-response-length-perception-module
#   bash train.sh cpu             # SmolLM2-135M on CPU with small settings -> ./ckpts/smollm2-length-perception
#   PROCESSES=2 bash train.sh cpu # the same, data-parallel over 2 CPU processes (torchrun, gloo); each takes
#                                 # batches of 8, so add --per_device_train_batch_size 4 to keep the batch of 8
#
# Extra arguments go to src.train_lora (any HfArgumentParser flag), e.g.
#   bash train.sh cpu --data_path data/demo-instruct.json --num_train_epochs 1
# Multi-GPU: ACCELERATE_ARGS="--multi_gpu --num_processes 4" bash train.sh
set -euo pipefail
preset="${1:-paper}"
[ $# -gt 0 ] && shift
case "$preset" in
  paper)
    # shellcheck disable=SC2086
    accelerate launch ${ACCELERATE_ARGS:-} -m src.train_lora \
      --model_name_or_path ./ckpts/vicuna-7b \
      --model_dtype bfloat16 \
      --data_path data/alpaca-train-10k-instruct.json \
      --output_dir ./ckpts/vicuna-response-length-perception-module \
      --num_train_epochs 3 \
      --per_device_train_batch_size 2 \
      --gradient_accumulation_steps 16 \
      --learning_rate 2e-5 \
      --lr_scheduler_type cosine \
      --warmup_steps 0.03 \
      --weight_decay 0.0 \
      --bf16 True \
      --logging_steps 10 \
      --save_strategy no \
      --report_to none \
      "$@"
    ;;
  cpu)
    if [ -n "${ACCELERATE_ARGS:-}" ]; then
      echo "error: train.sh cpu launches through torchrun and ignores ACCELERATE_ARGS: set PROCESSES=N instead" >&2
      exit 2
    fi
    # A 135M model learns a new answer format faster than a 7B one and has no GPU to amortise tiny batches:
    # a larger learning rate, batches of 8 without accumulation, float32.
    # `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate 1.15), so CPU
    # processes come from torchrun, which accelerate's PartialState joins on gloo.
    torchrun --standalone --nproc_per_node "${PROCESSES:-1}" -m src.train_lora \
      --model_name_or_path smollm2-135m \
      --data_path data/smollm2-train-instruct.json \
      --output_dir ./ckpts/smollm2-length-perception \
      --num_train_epochs 3 \
      --per_device_train_batch_size 8 \
      --gradient_accumulation_steps 1 \
      --learning_rate 5e-4 \
      --lr_scheduler_type cosine \
      --warmup_steps 0.03 \
      --logging_steps 5 \
      --save_strategy no \
      --report_to none \
      --use_cpu True \
      "$@"
    ;;
  *)
    echo "error: unknown preset '$preset': use paper or cpu" >&2
    exit 2
    ;;
esac
