#!/usr/bin/env python
"""Tokenise instruction conversations (JSONL) into SFT indexed datasets.

    python tools/preprocess_sft.py --input chat.jsonl --output-prefix data/chat \
        --tokenizer-type HuggingFaceTokenizer [--tokenizer-model tokenizer.json] --workers 4

Each line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
{"prompt": "...", "response": "..." [, "system": "..."]}. Writes
PREFIX_sft_document.{bin,idx} (token ids) and PREFIX_sft_response_mask.{bin,idx} (uint8, 1 = every
assistant turn incl. its <|im_end|>), megatron-core indexed datasets with identical lengths.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.data.preprocess import InputError  # noqa: E402
from megatron_diffu.data.sft_preprocess import preprocess_sft  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="JSONL file(s) of conversations")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    ap.add_argument("--tokenizer-model", default=None, help="tokenizer.json (default: the Qwen tokenizer)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
    ap.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines")
    a = ap.parse_args(argv)
    try:
        preprocess_sft(a.input, a.output_prefix, a.tokenizer_type, a.tokenizer_model, a.workers, a.skip_bad, a.log_interval)
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
