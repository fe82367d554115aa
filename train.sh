#!/usr/bin/env bash
# Instruction tuning of the length perception module (LoRA): the paper's run, or a small one on the CPU.
# `bash train.sh --help` lists the presets and their settings. Extra arguments go to src.train_lora (any
# HfArgumentParser flag) and win over the preset's, e.g.
#   bash train.sh cpu --data_path runs/pipeline-cpu/train-instruct.json --num_train_epochs 1
# A checkpoint is saved every --save_steps; the same command after an interruption resumes from the last one.
set -euo pipefail
cd "$(dirname "$0")"

# The paper's run: Vicuna-7B, 3 epochs, batch 2 x 16 accumulation, lr 2e-5, cosine, warm-up 0.03 (transformers 5
# takes the ratio in --warmup_steps), bf16, under accelerate so that several GPUs work.
PAPER=(
  --model_name_or_path ./ckpts/vicuna-7b --model_dtype bfloat16
  --data_path data/alpaca-train-10k-instruct.json
  --output_dir ./ckpts/vicuna-response-length-perception-module
  --num_train_epochs 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 16
  --learning_rate 2e-5 --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0 --bf16 True
  --logging_steps 10 --save_strategy steps --save_steps 100 --save_total_limit 2 --report_to none
)
# SmolLM2-135M on the CPU, the paper's instruction set (Vicuna-7B's lengths), its first 512 examples: a 135M model
# learns a new answer format faster than a 7B one and has no GPU to amortise tiny batches, so a larger learning rate,
# batches of 8 without accumulation, float32. `python -m src.reproduce pipeline` trains it on SmolLM2's own lengths.
CPU=(
  --model_name_or_path smollm2-135m
  --data_path data/alpaca-train-10k-instruct.json --num_data 512
  --output_dir ./ckpts/smollm2-length-perception
  --num_train_epochs 3 --per_device_train_batch_size 8 --gradient_accumulation_steps 1
  --learning_rate 5e-4 --lr_scheduler_type cosine --warmup_steps 0.03
  --logging_steps 5 --save_strategy steps --save_steps 25 --save_total_limit 2 --report_to none --use_cpu True
)

usage() {
  cat <<USAGE
usage: bash train.sh [paper|cpu] [src.train_lora flags ...]

presets:
  paper (default)  accelerate launch \${ACCELERATE_ARGS} -m src.train_lora ${PAPER[*]}
  cpu              python -m src.train_lora ${CPU[*]}
                   (under torchrun --nproc_per_node \$PROCESSES when PROCESSES > 1)

Flags after the preset override the preset's. The instruction file data/alpaca-train-10k-instruct.json is made
with python -m src.construct when missing (seconds, from the lengths in data/). Several GPUs:
ACCELERATE_ARGS="--multi_gpu --num_processes 4" bash train.sh; several CPU processes: PROCESSES=2 bash train.sh cpu.
All flags: python -m src.train_lora --help
USAGE
}

preset="${1:-paper}"
case "$preset" in
  -h|--help|help) usage; exit 0 ;;
  paper) preset_args=("${PAPER[@]}") ;;
  cpu) preset_args=("${CPU[@]}") ;;
  *) echo "error: unknown preset '$preset': use paper or cpu (bash train.sh --help)" >&2; exit 2 ;;
esac
[ $# -gt 0 ] && shift
if [ "$preset" = cpu ] && [ -n "${ACCELERATE_ARGS:-}" ]; then
  echo "error: train.sh cpu launches through torchrun and ignores ACCELERATE_ARGS: set PROCESSES=N instead" >&2
  exit 2
fi
args=("${preset_args[@]}" "$@")

# The paper's instruction file comes from the shipped data in seconds: make it rather than fail on a fresh clone.
data_path=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --data_path) data_path="${args[i + 1]:-}" ;;
    --data_path=*) data_path="${args[i]#--data_path=}" ;;
  esac
done
if [ "$data_path" = data/alpaca-train-10k-instruct.json ] && [ ! -e "$data_path" ]; then
  echo "making $data_path from the paper's data: python -m src.construct" >&2
  python -m src.construct
fi
# Every check (flags, files, folders) in one plain process, so that a mistake is one line, not a launcher's traceback.
python -m src.train_lora "${args[@]}" --check_only True

case "$preset" in
  paper)
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} -m src.train_lora "${args[@]}" ;;
  cpu)
    if [ "${PROCESSES:-1}" = 1 ]; then
      exec python -m src.train_lora "${args[@]}"
    fi
    # `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate 1.15), so CPU
    # processes come from torchrun, which accelerate's PartialState joins on gloo.
    exec torchrun --standalone --nproc_per_node "$PROCESSES" -m src.train_lora "${args[@]}" ;;
esac
