#!/usr/bin/env bash
# The README's quickstart: the whole DiffuCoder pipeline, shrunk to a fresh 2-core CPU machine.
#   1 setup            install (torch pinned first)
#   2 data             tokenize the Python standard library (Qwen tokenizer, Dream's <|mask|>)
#   3 pretrain         tiny masked-diffusion model, 300 steps (examples/pretrain_tiny_cpu.yaml)
#   4 loss curve       PNG of the training/validation loss
#   5 infill           masked-infill predictions next to the truth
#   6 SFT              instruction-tune on stdlib docstring->function pairs (examples/sft_tiny_cpu.yaml)
#   7 coupled-GRPO     2 RL steps on HumanEval/0..39 with sandboxed rewards (examples/grpo_tiny_cpu.yaml)
#   8 export           native -> Hugging Face Dream layout (trust_remote_code), logits verified
#   9 generate         diffusion sampling from the export, decoding-order heat map + PNG
#  10 evaluate         HumanEval pass@1 on held-out problems (HumanEval/40..), in the sandbox
# Arguments go to the pretraining stage (e.g. `--train-iters 50`); QUICK=1 shrinks every stage to
# a smoke run. Everything lands in runs/quickstart/; stages whose output exists are not redone
# (pretraining, SFT and GRPO resume from their checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=runs/quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "${QUICK:-0}" = 1 ]; then
  PRE=(--train-iters 20 --eval-interval 10 --save-interval 20); SFT=(--train-iters 10 --eval-interval 5 --save-interval 10)
  RL=(--train-iters 1); EVAL=(--limit 2)
else
  PRE=(); SFT=(--train-iters 60 --global-batch-size 8 --eval-interval 30 --save-interval 60); RL=(--train-iters 2); EVAL=(--limit 8)
fi
stage() { echo; echo "== $1"; }

stage "1/10 setup"
bash scripts/setup.sh

stage "2/10 tokenize the standard library (Qwen tokenizer, <|endoftext|> between files)"
mkdir -p "$OUT/data"
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f "$OUT/data/stdlib_text_document.idx" ]; then
  $PY tools/preprocess_data.py --input "$STDLIB" --extensions .py \
      --exclude-dirs test,tests,site-packages,dist-packages,idlelib,lib2to3,turtledemo,__pycache__ \
      --append-eod --skip-bad --workers 2 --output-prefix "$OUT/data/stdlib"
fi
$PY tools/dataset_stats.py "$OUT/data/stdlib_text_document"

stage "3/10 pretrain (examples/pretrain_tiny_cpu.yaml; resumes if a checkpoint exists)"
$PY -m megatron_diffu.pretrain --config examples/pretrain_tiny_cpu.yaml "${PRE[@]}" "$@"

stage "4/10 loss curve"
$PY tools/plot_loss.py "$OUT/train.log.jsonl" --out "$OUT/loss.png"

stage "5/10 masked infill with the checkpoint"
$PY examples/infill_demo.py --load "$OUT/checkpoints" --data-path "$OUT/data/stdlib_text_document"

stage "6/10 SFT on stdlib instruction pairs (examples/sft_tiny_cpu.yaml, from the pretrained weights)"
if [ ! -f "$OUT/data/stdlib_sft_sft_document.idx" ]; then
  $PY -m megatron_diffu.data.sft_corpus --output "$OUT/data/stdlib_sft.jsonl" --num 400
  $PY tools/preprocess_sft.py --input "$OUT/data/stdlib_sft.jsonl" --output-prefix "$OUT/data/stdlib_sft"
fi
$PY -m megatron_diffu.sft --config examples/sft_tiny_cpu.yaml "${SFT[@]}"

stage "7/10 coupled-GRPO on HumanEval/0..39, rewards from sandboxed test execution (examples/grpo_tiny_cpu.yaml)"
if [ ! -f "$OUT/data/humaneval_rl.jsonl" ]; then
  $PY tools/preprocess_rl.py --humaneval-subset --output "$OUT/data/humaneval_rl.jsonl"
fi
# 2 prompts x 4 completions of 32 tokens per step: a tiny SFT model writes no runnable code, so the
# rewards are ~0; this shows the mechanics (the learning signal is tested on a toy reward).
$PY -m megatron_diffu.grpo --config examples/grpo_tiny_cpu.yaml --max-new-tokens 32 --steps 16 "${RL[@]}"

stage "8/10 export to Hugging Face (Dream/DiffuCoder layout) and verify logits"
rm -rf "$OUT/hf"
$PY tools/convert_checkpoint.py --direction native-to-hf --input "$OUT/grpo/checkpoints" --output "$OUT/hf" --verify --quiet
ls "$OUT/hf"

stage "9/10 diffusion sampling from the export, with the decoding order"
$PY tools/generate.py --load "$OUT/hf" --chat --prompt "Write a function that returns the sum of a list." \
    --max-new-tokens 32 --steps 32 --alg entropy --show-order --no-color --order-png "$OUT/decoding_order.png"

stage "10/10 HumanEval pass@1 on held-out problems (HumanEval/40..), sandboxed"
$PY tools/evaluate.py --load "$OUT/hf" --chat --heldout "${EVAL[@]}" --out "$OUT/humaneval.jsonl" \
    --n-samples 1 --k 1 --max-new-tokens 64 --steps 32 --alg entropy
echo
echo "done: everything is in $OUT/ (checkpoints, sft/, grpo/, hf/, loss.png, decoding_order.png, humaneval.jsonl;"
echo "TensorBoard: tensorboard --logdir $OUT)"
