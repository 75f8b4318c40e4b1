#!/usr/bin/env python
"""Tokenize raw code or JSONL into Megatron indexed datasets (Megatron-LM compatible flags).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-type HuggingFaceTokenizer --append-eod --workers 4 --output-prefix data/code
    python tools/preprocess_data.py --input /usr/lib/python3.11 --extensions .py --exclude-dirs test \\
        --append-eod --skip-bad --workers 2 --output-prefix data/stdlib

--input takes JSONL files (one JSON object per line), globs, and directories of source files
(each file one document, filtered by --extensions). Writes PREFIX_{key}_document.{bin,idx}.
The default tokenizer is the Qwen tokenizer (Dream/DiffuCoder special tokens); EOD = <|endoftext|>.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from concurrent.futures.process import BrokenProcessPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine/Apex are absent: irrelevant to data tools.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron_diffu.data.preprocess import (  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    InputError,
    PreprocessConfig,
    _Terminated,
    run_preprocess,
)
from megatron_diffu.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def _split_list(value: str):
    return [v.strip() if v.strip().startswith(".") else "." + v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv=None) -> PreprocessConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="JSONL file(s), glob(s) or source directories")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.{bin,idx}")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to extract (default: text)")
    ap.add_argument("--extensions", type=_split_list, default=None,
                    help="comma-separated suffixes of source files to take from directories, e.g. .py,.c")
    ap.add_argument("--exclude-dirs", type=lambda v: [x for x in v.split(",") if x], default=[],
                    help="comma-separated directory names to skip while walking, e.g. test,tests")
    ap.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=list(TOKENIZER_TYPES))
    ap.add_argument("--tokenizer-model", default=None,
                    help="tokenizer.json (HF) or .model (SentencePiece); default: the Qwen tokenizer")
    ap.add_argument("--append-eod", action="store_true", help="append the EOD token to every non-empty document (as Megatron-LM)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any N)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip bad inputs (malformed JSON, missing key, non-UTF-8, unreadable) and report them; "
                         "empty documents are not bad: kept as Megatron-LM keeps them, and counted")
    ap.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="input bytes per work unit")
    ap.add_argument("--log-interval", type=float, default=1.0, help="seconds between progress lines (0: off)")
    a = ap.parse_args(argv)
    return PreprocessConfig(
        input=a.input, output_prefix=a.output_prefix, json_keys=a.json_keys, extensions=a.extensions,
        exclude_dirs=a.exclude_dirs, tokenizer_type=a.tokenizer_type, tokenizer_model=a.tokenizer_model,
        append_eod=a.append_eod, workers=a.workers, skip_bad=a.skip_bad, chunk_bytes=a.chunk_bytes,
        log_interval=a.log_interval,
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run_preprocess(cfg)
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("error: a worker process died (killed for memory? crashed?); no output written. "
              "Re-run, with fewer --workers or a smaller --chunk-bytes if memory is short.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated (SIGTERM): no output written", file=sys.stderr)
        return 143
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
