#!/usr/bin/env bash
# The README's quickstart: on a fresh CPU machine, install, tokenize the Python standard library
# with the Qwen tokenizer, pretrain a tiny masked-diffusion model (a few hundred steps, minutes on
# 2 cores), save a checkpoint, plot the loss curve and show masked-infill predictions.
# Extra arguments go to the trainer (e.g. `--train-iters 50`); everything lands in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=runs/quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1/5 setup"
bash scripts/setup.sh

echo "== 2/5 tokenize the standard library (Qwen tokenizer, <|endoftext|> between files)"
mkdir -p "$OUT/data"
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f "$OUT/data/stdlib_text_document.idx" ]; then
  $PY tools/preprocess_data.py --input "$STDLIB" --extensions .py \
      --exclude-dirs test,tests,site-packages,dist-packages,idlelib,lib2to3,turtledemo,__pycache__ \
      --append-eod --skip-bad --workers 2 --output-prefix "$OUT/data/stdlib"
fi

echo "== 3/5 pretrain (examples/pretrain_tiny_cpu.yaml; resumes if a checkpoint exists)"
$PY -m megatron_diffu.pretrain --config examples/pretrain_tiny_cpu.yaml "$@"

echo "== 4/5 loss curve"
$PY tools/plot_loss.py "$OUT/train.log.jsonl" --out "$OUT/loss.png"

echo "== 5/5 masked infill with the checkpoint"
$PY examples/infill_demo.py --load "$OUT/checkpoints" --data-path "$OUT/data/stdlib_text_document"
echo "done: checkpoint in $OUT/checkpoints, loss curve in $OUT/loss.png, TensorBoard logs in $OUT/tensorboard"
