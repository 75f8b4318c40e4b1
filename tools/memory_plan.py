#!/usr/bin/env python
"""Memory plan of a training run per GPU, from the real model and optimizer of the configured layout.

    python tools/memory_plan.py --config examples/diffucoder_7b_adapt.yaml [--world-size 8] [--gpu-memory-gb 80]

How (nothing is guessed from a formula that the code could answer):
- a fake process group (torch's `fake` backend) of `--world-size` ranks stands in for the cluster;
  for every pipeline stage the model shard of that stage's rank is built on the META device with
  the configured TP/PP/SP layout, and the real `MixedPrecisionAdamW` (ZeRO or not) lays out its
  flat buffers over it: parameter, gradient and optimizer-state bytes per rank are counted from it;
- activations: ONE real decoder layer of the configured shape (TP-local, sequence parallel,
  recompute granularity, dtype) runs a forward of `PROBE_TOKENS` tokens on the CPU under
  `saved_tensors_hooks`; the bytes autograd keeps (weights and the shared rotary tables excluded)
  scale linearly with tokens (flash/memory-efficient attention: no S x S term), times the layers
  of the stage, times the micro-batches in flight under 1F1B (pp - stage); `full` recompute
  keeps each layer's input plus one layer's activations;
- the output layer: logits of all tokens (worst case t -> 1: every position masked) in the compute
  dtype, their fp32 copy and fp32 gradient (10 bytes per logit, one micro-batch);
- checkpoint save: the largest per-parameter transient of the streamed optimizer state
  (`iter_state_tensors`: ZeRO sends one parameter's pieces to its owner at a time);
- CUDA context, NCCL buffers and allocator slack: a fixed `--overhead-gb` (default 4).
Prints a table, then `parameters: N` and `peak per GPU: X GB`; exit status 1 if it does not fit.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PROBE_TOKENS = 256
GB = 1e9


def _init_fake(world: int, rank: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


def _load_config(path: str):
    from megatron_diffu.config import load_yaml
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig
    from megatron_diffu.stages.grpo.config import GRPORunConfig
    raw = load_yaml(path)
    cls = GRPORunConfig if "grpo" in raw else PretrainRunConfig
    return cls.from_yaml(path)


def layer_activation_bytes(cfg, grid, sequence_parallel: bool, tokens: int = PROBE_TOKENS) -> float:
    """Bytes autograd keeps for one decoder layer per token (measured on a real CPU layer)."""
    from megatron_diffu.model.transformer import TransformerLayer, rotary_cos_sin
    layer = TransformerLayer(cfg, grid.tp_group, sequence_parallel and grid.tp_size > 1).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    tp = grid.tp_size if sequence_parallel and grid.tp_size > 1 else 1
    x = torch.randn(1, tokens // tp, cfg.hidden_size, dtype=cfg.params_dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(tokens)[None], cfg.head_dim, cfg.rotary_base, cfg.params_dtype)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (cos, sin)}
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, None, cos, sin)
    return sum(seen.values()) / tokens


def stage_plan(run, world: int, pp_rank: int) -> dict:
    from megatron_diffu.model.builder import build_model_shard
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training import optimizer as optim_mod
    par = run.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = world // (tp * pp)
    _init_fake(world, ProcessGrid.rank_of(pp_rank, 0, 0, tp, dp))
    grid = ProcessGrid.build(tp, pp)
    cfg = run.model
    sp = par.sequence_parallel and tp > 1
    model = build_model_shard(cfg, grid, split=par.pipeline_model_parallel_split, sequence_parallel=sp,
                              device="meta", init_weights=False)
    opt = optim_mod.MixedPrecisionAdamW(model, run.optimizer, grid, par.use_distributed_optimizer)
    n_local = sum(p.numel() for p in model.parameters())
    esz = torch.finfo(cfg.params_dtype).bits // 8
    shard = opt.hi - opt.lo
    state = 4 * shard * (2 + (0 if opt.master_is_param else 1)) + 4 * opt._scratch.numel()
    # checkpoint save: ZeRO assembles one entry at a time on its owner (point to point), which
    # copies it to the host; without ZeRO DCP stages one tensor at a time
    save = max(4 * e.numel for e in opt.entries)
    s, b = run.data.seq_length, run.training.micro_batch_size
    tokens = s * b
    layers = len(model.layer_ids)
    in_flight = pp - pp_rank if pp > 1 else 1
    gran = cfg.recompute_granularity
    per_tok = layer_activation_bytes(cfg, grid, sp)
    sp_div = tp if sp else 1
    if gran == "full":
        n_rec = layers if cfg.recompute_num_layers is None else min(layers, cfg.recompute_num_layers)
        act_layers = n_rec * (esz * cfg.hidden_size / sp_div) + (layers - n_rec) * per_tok
        act = tokens * (act_layers * in_flight + per_tok)  # + one layer recomputed in backward
    else:
        act = tokens * per_tok * layers * in_flight
    act += tokens * 4 * cfg.head_dim * 2  # rotary tables (fp32 math, cast) per micro-batch
    head = 0.0
    if grid.is_last_stage:
        head = tokens * (cfg.vocab_size // tp) * (esz + 8)
    if grid.is_first_stage:
        act += tokens * cfg.hidden_size * esz / sp_div * in_flight  # embedding output
    dist.destroy_process_group()
    return dict(stage=pp_rank, layers=layers, params=n_local, weights=esz * n_local, grads=4 * opt.padded,
                optimizer=state, activations=act, logits=head, save=save, per_layer_token=per_tok,
                in_flight=in_flight, dp=dp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, default=8, help="GPUs of the run (default: one 8-GPU node)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--overhead-gb", type=float, default=4.0, help="CUDA context, NCCL, allocator slack")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    run = _load_config(args.config)
    par = run.parallel
    if args.world_size % (par.tensor_model_parallel_size * par.pipeline_model_parallel_size):
        print(f"--world-size {args.world_size} is not a multiple of TP*PP", file=sys.stderr)
        return 2
    cfg = run.model
    plans = [stage_plan(run, args.world_size, r) for r in range(par.pipeline_model_parallel_size)]
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, vocab "
          f"{cfg.vocab_size}, {'bf16' if cfg.bf16 else 'fp32'}, recompute {cfg.recompute_granularity}")
    print(f"layout: world {args.world_size} = TP {par.tensor_model_parallel_size} x PP "
          f"{par.pipeline_model_parallel_size} x DP {plans[0]['dp']}, sequence_parallel {par.sequence_parallel}, "
          f"distributed optimizer {par.use_distributed_optimizer}; seq {run.data.seq_length} x micro-batch "
          f"{run.training.micro_batch_size}")
    head = (f"{'stage':>5} {'layers':>6} {'params/rank':>12} {'weights':>8} {'grads':>8} {'optim':>8} "
            f"{'activ.':>8} {'logits':>8} {'save':>8} {'other':>6} {'peak GB':>8}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for p in plans:
        static = p["weights"] + p["grads"] + p["optimizer"]
        peak = static + max(p["activations"] + p["logits"], p["save"]) + args.overhead_gb * GB
        p["peak"] = peak
        worst = max(worst, peak)
        print(f"{p['stage']:>5} {p['layers']:>6} {p['params']:>12,} {p['weights'] / GB:>8.2f} {p['grads'] / GB:>8.2f} "
              f"{p['optimizer'] / GB:>8.2f} {p['activations'] / GB:>8.2f} {p['logits'] / GB:>8.2f} "
              f"{p['save'] / GB:>8.2f} {args.overhead_gb:>6.1f} {peak / GB:>8.2f}")
    print(f"(activations: {plans[0]['per_layer_token']:.0f} bytes per token per layer measured, x "
          f"{plans[0]['in_flight']} micro-batch(es) in flight on stage 0; save = checkpoint transient, "
          f"not added to the activations)")
    print(f"parameters: {cfg.num_parameters()}")
    print(f"peak per GPU: {worst / GB:.1f} GB")
    fits = worst <= args.gpu_memory_gb * GB
    print(f"{'fits' if fits else 'DOES NOT FIT'} in {args.gpu_memory_gb:g} GB")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
