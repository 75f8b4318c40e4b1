#!/usr/bin/env python
"""Generate with a masked-diffusion model (Dream `diffusion_generate` semantics + fast paths).

Examples:
  python tools/generate.py --load runs/quickstart/sft/checkpoints --chat --prompt "Write a function that reverses a list."
  python tools/generate.py --load hf/DiffuCoder-7B-Instruct --chat --prompt-file prompts.jsonl \
      --steps 128 --max-new-tokens 256 --alg entropy --temperature 0.2 --top-p 0.95
  echo "def fib(n):" | python tools/generate.py --random-init tiny --max-new-tokens 32 --steps 32 --show-order
  torchrun --nproc-per-node 2 tools/generate.py --load runs/quickstart/sft/checkpoints --tensor-model-parallel-size 2 --prompt "..."

Model (one of):
  --load PATH        a native checkpoint (save dir or iter_* dir; also what tools/convert_checkpoint.py
                     writes from a Hugging Face model), or a Hugging Face Dream/DiffuCoder folder
                     (config.json + safetensors) loaded directly.
  --random-init P    an untrained model of TransformerConfig preset P (demos, smoke tests).
Prompts: every --prompt, then --prompt-file (a .jsonl file: one JSON string or {"prompt": ...}
object per line; any other file: the whole file is one prompt), else standard input (one prompt).
Tokenizer: --tokenizer-model, else the model folder's tokenizer (HF folder, or SAVE/tokenizer/ next to a
converted checkpoint), else the bundled Qwen tokenizer (Dream-compatible specials).
Prints each completion (cut at <|endoftext|> / <|im_end|> / <|dlm_pad|>) and the throughput;
--show-order adds a text heat map of the decoding order, AR-ness and a PNG (--order-png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_diffu.diffusion.sampling import (add_sampling_args, diffusion_generate,  # noqa: E402
                                               sampling_config_from_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="native checkpoint dir or Hugging Face Dream/DiffuCoder folder")
    src.add_argument("--random-init", metavar="PRESET", help="untrained model of this TransformerConfig preset")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer.json / .model (default: see above)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help=".jsonl (one prompt per line) or a text file (one prompt)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (ChatML) + assistant header")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
    p.add_argument("--show-order", action="store_true", help="draw the decoding order (text heat map + PNG)")
    p.add_argument("--order-png", default="decoding_order.png", help="PNG path for --show-order ({i} = prompt index)")
    p.add_argument("--no-color", action="store_true", help="plain-text heat map (no ANSI colours)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    add_sampling_args(p)
    return p


# ----------------------------------------------------------------------------- inputs
def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.exists():
            raise SystemExit(f"--prompt-file {path}: no such file")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: invalid JSON ({e.msg}); expected a string or {{\"prompt\": ...}}")
                if isinstance(item, dict):
                    if "prompt" not in item:
                        raise SystemExit(f"{path}:{n}: object without a \"prompt\" field")
                    item = item["prompt"]
                if not isinstance(item, str):
                    raise SystemExit(f"{path}:{n}: expected a string or {{\"prompt\": ...}}, got {type(item).__name__}")
                prompts.append(item)
        else:
            prompts.append(path.read_text())
    if not prompts:
        if sys.stdin.isatty():
            raise SystemExit("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
        prompts.append(sys.stdin.read())
    return prompts


def default_tokenizer_model(args: argparse.Namespace) -> Optional[str]:
    if args.tokenizer_model or not args.load:
        return args.tokenizer_model
    path = Path(args.load)
    for cand in (path / "tokenizer.json", path / "tokenizer" / "tokenizer.json",
                 path.parent / "tokenizer" / "tokenizer.json"):
        if cand.exists():
            return str(cand)
    return None


def encode_prompt(tok: Any, text: str, args: argparse.Namespace) -> list[int]:
    if not args.chat:
        return tok.encode(text)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def check_positions(prompts: list[list[int]], max_new_tokens: int, max_positions: int) -> None:
    """Refuse (SystemExit naming the prompt and the numbers) a prompt + --max-new-tokens longer than the
    model's positions (max_position_embeddings): RoPE would run past the lengths it was trained on and
    the model would decode garbage without any error."""
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > max_positions:
            raise SystemExit(f"prompt {i} has {len(ids)} tokens + --max-new-tokens {max_new_tokens} = "
                             f"{len(ids) + max_new_tokens} positions, more than the model's "
                             f"max_position_embeddings={max_positions}: shorten the prompt or lower "
                             f"--max-new-tokens to at most {max(max_positions - len(ids), 0)}")


# ----------------------------------------------------------------------------- model
def setup_parallel(args: argparse.Namespace):
    from megatron_diffu.parallel.state import ProcessGrid

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and tp * pp == 1:
        return ProcessGrid.single()
    from megatron_diffu.parallel.launch import init_distributed

    init_distributed()
    return ProcessGrid.build(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(args: argparse.Namespace, tok: Any, grid: Any, device: torch.device):
    from megatron_diffu.convert.loading import load_model_for_inference
    from megatron_diffu.model.builder import build_model_shard

    if args.random_init:
        from megatron_diffu.data.tokenizer import padded_vocab_size
        from megatron_diffu.model.config import TransformerConfig

        # rows padded to a multiple of 128 * 8, not 128 * tp: the same random model under every TP <= 8
        cfg = TransformerConfig.from_preset(args.random_init, bf16=args.bf16,
                                            vocab_size=padded_vocab_size(tok.vocab_size, 128, 8))
        return build_model_shard(cfg, grid, device=device).eval(), cfg
    return load_model_for_inference(args.load, grid=grid, device=device, bf16=args.bf16)


# ----------------------------------------------------------------------------- output
def show_order(tok: Any, ids: list[int], reveal: torch.Tensor, index: int, args: argparse.Namespace) -> str:
    from megatron_diffu.diffusion.arness import arness, order_heatmap_png, order_heatmap_text

    pieces = [tok.decode([t]) for t in ids]
    steps = reveal[:len(ids)].tolist()
    color = not args.no_color and sys.stdout.isatty()
    scores = arness(reveal, ks=(1, 2, 4))
    png = args.order_png.format(i=index) if "{i}" in args.order_png else \
        (args.order_png if index == 0 else f"{Path(args.order_png).with_suffix('')}_{index}.png")
    # the PNG shows all N positions (stop token and padding after it too): the order is over all of them
    order_heatmap_png(png, reveal.tolist(), pieces + [""] * (len(reveal) - len(ids)),
                      title=f"decoding order, prompt {index}")
    summary = "  ".join(f"{k}={v:.2f}" for k, v in scores.items())
    return f"{order_heatmap_text(pieces, steps, color=color)}\nAR-ness: {summary}\norder PNG: {png}"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = sampling_config_from_args(args)
    except ValueError as e:
        raise SystemExit(str(e))
    from megatron_diffu.data.tokenizer import build_tokenizer

    grid = setup_parallel(args)
    device = pick_device(args)
    tok = build_tokenizer(args.tokenizer_type, default_tokenizer_model(args))
    texts = read_prompts(args)
    model, model_cfg = load_model(args, tok, grid, device)
    if tok.mask_id >= model_cfg.vocab_size:
        raise SystemExit(f"tokenizer mask id {tok.mask_id} is outside the model's vocabulary ({model_cfg.vocab_size} "
                         f"rows): use the checkpoint's tokenizer (--tokenizer-model)")
    prompts = [encode_prompt(tok, t, args) for t in texts]
    check_positions(prompts, cfg.max_new_tokens, model_cfg.max_position_embeddings)
    stop_ids = [i for i in (tok.eod_id, tok.im_end_id, tok.pad_id) if i is not None]
    show = grid.rank == 0
    total_tokens, total_s = 0, 0.0
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start:start + args.batch_size]
        out = diffusion_generate(model, prompts[start:start + args.batch_size], cfg, mask_id=tok.mask_id,
                                 pad_id=tok.pad_id, stop_ids=stop_ids, grid=grid,
                                 sample_index=list(range(start, start + len(chunk))))
        total_tokens += len(chunk) * cfg.max_new_tokens
        total_s += out.elapsed_s
        if not show:
            continue
        for j, ids in enumerate(out.completions):
            i = start + j
            text = tok.decode(ids)
            if args.json:
                print(json.dumps({"index": i, "prompt": chunk[j], "completion": text, "tokens": len(ids)}))
            else:
                print(f"=== [{i}] completion ({len(ids)} tokens) ===\n{text}")
            if args.show_order:
                print(show_order(tok, ids, out.reveal_step[j], i, args), file=sys.stderr if args.json else sys.stdout)
        print(f"[batch {start // args.batch_size}] {len(chunk)} prompts x {cfg.max_new_tokens} new tokens in "
              f"{out.elapsed_s:.2f} s: {out.tokens_per_s:.1f} tokens/s, {out.nfe} forward passes", file=sys.stderr)
    if show:
        print(f"total: {total_tokens} new tokens in {total_s:.2f} s = {total_tokens / max(total_s, 1e-9):.1f} tokens/s "
              f"(alg={cfg.alg}, steps={cfg.steps}, threshold={cfg.threshold}, cache={cfg.use_cache}, device={device})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
