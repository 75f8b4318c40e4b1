#!/usr/bin/env python3
"""Masked infill with a trained checkpoint: mask spans of held-out stdlib code, predict them.

    python examples/infill_demo.py --load runs/quickstart/checkpoints --data-path PREFIX [--samples 4]

For each snippet (from the validation end of the dataset) a contiguous span is replaced by
`<|mask|>` and the model fills every masked position in one bidirectional forward (argmax),
printed next to the truth with the token accuracy. (The full iterative sampler lives in
megatron_diffu/diffusion/sampling.py; one step is enough to show what the model learnt.)
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint (save dir or iter_* dir)")
    ap.add_argument("--data-path", required=True, help="indexed dataset prefix (PREFIX_text_document)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--length", type=int, default=48, help="tokens of context per snippet")
    ap.add_argument("--span", type=int, default=6, help="masked tokens per snippet")
    args = ap.parse_args(argv)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_diffu.data.tokenizer import build_tokenizer
    from megatron_diffu.training.checkpointing import load_inference_model, read_run_config, resolve_checkpoint_dir

    model, cfg = load_inference_model(args.load)
    data_cfg = read_run_config(resolve_checkpoint_dir(args.load)).get("data", {})
    tok = build_tokenizer(data_cfg.get("tokenizer_type", "HuggingFaceTokenizer"), data_cfg.get("tokenizer_model"))
    ds = IndexedDataset(args.data_path)
    g = torch.Generator().manual_seed(0)
    shown, correct, total = 0, 0, 0
    for doc in range(len(ds) - 1, -1, -1):  # the last documents: the validation end of the split
        ids = torch.from_numpy(ds[doc].astype("int64"))
        if len(ids) < args.length + 2 or shown >= args.samples:
            continue
        start = int(torch.randint(0, len(ids) - args.length, (1,), generator=g))
        x0 = ids[start:start + args.length]
        lo = int(torch.randint(1, args.length - args.span, (1,), generator=g))
        masked = torch.zeros(args.length, dtype=torch.bool)
        masked[lo:lo + args.span] = True
        xt = torch.where(masked, torch.full_like(x0, tok.mask_id), x0)
        with torch.no_grad():
            logits = model(xt[None], logit_positions=masked[None])
        pred = logits.argmax(-1)
        truth = x0[masked]
        correct += int((pred == truth).sum())
        total += args.span
        shown += 1
        print(f"--- sample {shown} (document {doc})")
        print("context : " + tok.decode(x0[:lo].tolist())[-120:].replace("\n", "\\n")
              + "[MASK x%d]" % args.span + tok.decode(x0[lo + args.span:].tolist())[:80].replace("\n", "\\n"))
        print("truth   : " + repr(tok.decode(truth.tolist())))
        print("predict : " + repr(tok.decode(pred.tolist())))
    if not total:
        print("no document long enough for the demo", file=sys.stderr)
        return 1
    print(f"token accuracy on the masked spans: {correct}/{total} = {correct / total:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
