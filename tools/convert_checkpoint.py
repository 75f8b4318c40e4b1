#!/usr/bin/env python
"""Convert checkpoints between Hugging Face (Qwen2 / Dream / DiffuCoder) and megatron-diffu (DCP).

  python tools/convert_checkpoint.py --direction hf-to-native --input Qwen2.5-Coder-7B --output ckpt \
      --target-tensor-parallel-size 4 --target-pipeline-parallel-size 2 --verify
  python tools/convert_checkpoint.py --direction native-to-hf --input ckpt --output DiffuCoder-export --verify

See megatron_diffu/convert/checkpoint.py for the layouts and the decisions (mask token rows, ...).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", required=True, choices=["hf-to-native", "native-to-hf"])
    p.add_argument("--input", required=True, type=Path, help="HF folder or native checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="new (or empty) output directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="hf-to-native: TP layout to validate and record (DCP reshards on load)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--no-add-mask-token", action="store_true",
                   help="hf-to-native: keep an autoregressive tokenizer/embedding unchanged")
    p.add_argument("--max-shard-size", default="5GB", help="native-to-hf: safetensors shard size (e.g. 2GB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="native-to-hf: cast the exported weights (default: as stored)")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="native-to-hf: tokenizer files to ship (default: the checkpoint's tokenizer/)")
    for name in ("mask", "pad", "bos", "eos"):
        p.add_argument(f"--{name}-token-id", type=int, default=None, help=f"native-to-hf: override {name}_token_id")
    p.add_argument("--verify", action="store_true", help="compare logits of both sides on a few prompts (fp32)")
    p.add_argument("--verify-tolerance", type=float, default=1e-4)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    # Scoped, not global: main() is also called in-process (tests, notebooks).
    with torch.no_grad():
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from megatron_diffu.convert.checkpoint import hf_to_native, native_to_hf
    from megatron_diffu.convert.verify import verify

    t0 = time.perf_counter()
    if args.direction == "hf-to-native":
        it_dir = hf_to_native(args.input, args.output, tp=args.target_tensor_parallel_size,
                              pp=args.target_pipeline_parallel_size, add_mask_token=not args.no_add_mask_token,
                              progress=not args.quiet)
        print(f"wrote {it_dir} in {time.perf_counter() - t0:.1f} s")
        hf_dir, native_dir = args.input, args.output
    else:
        ids = {f"{n}_token_id": getattr(args, f"{n}_token_id") for n in ("mask", "pad", "bos", "eos")}
        out = native_to_hf(args.input, args.output, max_shard_size=args.max_shard_size, dtype=args.dtype,
                           tokenizer_dir=args.tokenizer_dir, token_ids=ids, progress=not args.quiet)
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        hf_dir, native_dir = args.output, args.input
    if args.verify:
        verify(hf_dir, native_dir, tol=args.verify_tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
