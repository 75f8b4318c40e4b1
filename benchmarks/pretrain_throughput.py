#!/usr/bin/env python3
"""Pretraining throughput: our trainer vs a plain reference loop, same model/data/objective.

    python benchmarks/pretrain_throughput.py [--configs tiny,100m] [--nprocs 1,2] [--steps 3]

Measures full training steps (batch fetch, noise, forward, backward, gradient reduction, clip,
optimizer) after one warm-up step:
- ours: `Trainer` + the pretraining `DiffusionStage` (logits only at masked positions, vocab-parallel CE, flat fp32
  AdamW), 1 process or 2 (gloo, DP=2);
- reference: transformers `Qwen2ForCausalLM` with a full (bidirectional) 4-D mask, the objective
  written naively (full [B, S, V] logits, shift by hand, 1/t-weighted CE over masked positions),
  `torch.optim.AdamW` + `clip_grad_norm_`; 2 processes = torch DDP (gloo).
Both read the same synthetic token windows (random ids, mask id = V-1), from an in-memory
dataset keyed by sample index, so the comparison isolates the training step.

MFU = model matmul FLOPs (6 * N_body per token + attention + output layer on the tokens each
implementation actually projects) / step time / (measured fp32 matmul peak of one process x procs).
The reference projects every token through the output layer; ours only the masked ones: the
ratio column shows what that saves end to end. Numbers on a shared machine vary; both sides are
measured in the same run, interleaved.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    # name: (model preset overrides, seq_length, micro_batch_size)
    "tiny": (dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  vocab_size=32000, untie_embeddings_and_output_weights=False), 128, 4),
    "100m": (dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, num_query_groups=4,
                  vocab_size=32000, untie_embeddings_and_output_weights=False), 256, 1),
}


def _batch(sample_ids, seq, vocab):
    rows = [torch.randint(0, vocab - 2, (seq,), generator=torch.Generator().manual_seed(int(i))) for i in sample_ids]
    return {"tokens": torch.stack(rows), "sample_index": torch.tensor(list(sample_ids), dtype=torch.long)}


# ------------------------------------------------------------------------------------ ours
def _ours(rank, name, steps, world):
    torch.set_num_threads(1 if world > 1 else max(1, torch.get_num_threads()))
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig
    from megatron_diffu.stages.diffusion.objective import DocumentMasking, PerPosition
    from megatron_diffu.stages.diffusion.stage import DiffusionStage
    from megatron_diffu.training.logging import measure_peak_flops
    from megatron_diffu.training.trainer import Trainer, build_grid

    over, seq, mbs = CONFIGS[name]
    args = ["--micro-batch-size", str(mbs), "--global-batch-size", str(mbs * world), "--train-iters", str(steps + 1),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--mock-data", "--eval-interval", "0",
            "--log-interval", "1000000", "--random-truncation-prob", "0", "--peak-flops", "1"]
    for k, v in over.items():
        args += ([f"--{k.replace('_', '-')}"] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False
                 else [f"--{k.replace('_', '-')}", str(v)])
    cfg = PretrainRunConfig.from_args(args)

    class SyntheticData:  # random token windows: the data source plugged into the pretraining stage
        def setup(self, trainer, tokenizer):
            pass

        def micro_batches(self, trainer):
            start = trainer.consumed_samples + trainer.grid.dp_rank * trainer.micro_batch_size
            return [_batch(range(start, start + trainer.micro_batch_size), seq, cfg.model.vocab_size)]

        def held_out(self):
            return None

    stage = DiffusionStage(SyntheticData(), DocumentMasking(), PerPosition())
    stage.tokenizer, stage.mask_token_id = object(), cfg.model.vocab_size - 1
    tr = Trainer(cfg, stage, build_grid(cfg))
    tr.train_step()  # warm-up
    times, masked = [], []
    for _ in range(steps):
        m = tr.train_step()
        times.append(m["step_time"])
        masked.append(m["mask_fraction"])
    return {"time": sorted(times)[len(times) // 2], "mask_fraction": sum(masked) / len(masked),
            "peak": measure_peak_flops(torch.device("cpu"))}


# ------------------------------------------------------------------------------------ reference
def _reference(rank, name, steps, world):
    torch.set_num_threads(1 if world > 1 else max(1, torch.get_num_threads()))
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_diffu.training.logging import measure_peak_flops

    over, seq, mbs = CONFIGS[name]
    hf = Qwen2Config(vocab_size=over["vocab_size"], hidden_size=over["hidden_size"],
                     intermediate_size=over["ffn_hidden_size"], num_hidden_layers=over["num_layers"],
                     num_attention_heads=over["num_attention_heads"], num_key_value_heads=over["num_query_groups"],
                     max_position_embeddings=seq, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=not over["untie_embeddings_and_output_weights"])
    hf._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(hf)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    vocab, mask_id = over["vocab_size"], over["vocab_size"] - 1
    full = torch.ones(mbs, 1, seq, seq, dtype=torch.bool)  # bidirectional
    consumed = 0

    def step():
        nonlocal consumed
        t0 = time.perf_counter()
        start = consumed + (dist.get_rank() if world > 1 else 0) * mbs
        b = _batch(range(start, start + mbs), seq, vocab)
        x0 = b["tokens"]
        t = torch.stack([1e-3 + (1 - 1e-3) * torch.rand((), generator=torch.Generator().manual_seed(int(i) + 7))
                         for i in b["sample_index"]])
        masked = torch.rand(x0.shape) < t[:, None]
        masked[:, 0] = False
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        logits = model(input_ids=xt, attention_mask={"full_attention": full}).logits  # [B, S, V]
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift
        ce = F.cross_entropy(logits.float().reshape(-1, vocab), x0.reshape(-1), reduction="none").view_as(x0)
        loss = (ce * masked / t[:, None]).sum() / (x0.numel() * world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        consumed += mbs * world
        return time.perf_counter() - t0

    step()
    times = [step() for _ in range(steps)]
    return {"time": sorted(times)[len(times) // 2], "peak": measure_peak_flops(torch.device("cpu"))}


# ------------------------------------------------------------------------------------ driver
def _flops(name, tokens, projected):
    from megatron_diffu.model.config import TransformerConfig
    over, seq, _ = CONFIGS[name]
    cfg = TransformerConfig(**over, max_position_embeddings=seq)
    head = 2.0 * cfg.vocab_size * cfg.hidden_size
    body = cfg.flops_per_token(seq, training=False) - head
    return 3.0 * (body * tokens + head * projected)


def run(name, nproc, steps, which):
    from megatron_diffu.testing import run_distributed
    fn = _ours if which == "ours" else _reference
    if nproc == 1:
        return fn(0, name, steps, 1)
    return run_distributed(fn, world_size=nproc, args=(name, steps, nproc), timeout=1800)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        _, seq, mbs = CONFIGS[name]
        for nproc in [int(n) for n in args.nprocs.split(",")]:
            print(f"[bench] {name} x{nproc}: ours ...", flush=True)
            ours = run(name, nproc, args.steps, "ours")
            print(f"[bench] {name} x{nproc}: reference ...", flush=True)
            ref = run(name, nproc, args.steps, "reference")
            tokens = mbs * seq * nproc
            f_ours = _flops(name, tokens, tokens * ours["mask_fraction"])
            f_ref = _flops(name, tokens, tokens)
            peak = ours["peak"] * nproc
            rows.append((name, nproc, tokens / ours["time"], f_ours / ours["time"] / peak,
                         tokens / ref["time"], f_ref / ref["time"] / (ref["peak"] * nproc), ref["time"] / ours["time"]))
    print()
    print(f"{'config':<7}{'procs':>6}{'ours tok/s':>12}{'ours MFU':>10}{'ref tok/s':>12}{'ref MFU':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r[0]:<7}{r[1]:>6}{r[2]:>12.1f}{100 * r[3]:>9.1f}%{r[4]:>12.1f}{100 * r[5]:>9.1f}%{r[6]:>9.2f}x")
    print("\nMFU vs the measured fp32 matmul peak of one process x processes; CPU, shared machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
