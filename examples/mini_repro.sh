#!/usr/bin/env bash
# The mini DiffuCoder reproduction (issue 18): generated code tasks with executable tests,
# masked-diffusion pretraining + SFT of a 2.6M-parameter model with a SentencePiece tokenizer, then
# coupled-GRPO vs d1-GRPO vs SFT-continued from the same SFT checkpoint, evaluated in the sandbox.
#   bash examples/mini_repro.sh [--quick] [--out DIR]      (default out: runs/mini_repro[_quick])
# ~45 min on 2 CPU cores (--quick: ~12 min). Rerun the same command to resume after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "${PYTHON:-python3}" -m megatron_diffu.repro.mini "$@"
