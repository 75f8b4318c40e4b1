#!/usr/bin/env python3
"""Pretraining throughput: our trainer vs a plain reference loop, same model/data/objective.

    python benchmarks/pretrain_throughput.py [--configs tiny,100m] [--nprocs 1,2] [--steps 12] [--bf16]
                                             [--fused-adam] [--unfused-wgrad]

Measures full training steps (batch fetch, noise, forward, loss, backward, gradient reduction,
clip, optimizer, logging) after one warm-up step of each side:
- ours: `Trainer` + the pretraining `DiffusionStage` (logits only at masked positions, vocab-parallel CE, flat fp32
  AdamW), 1 process or 2 (gloo, DP=2); `--bf16`: also our bf16 trainer path (bf16 parameters and
  compute, fp32 gradients and master weights, fused AdamW), compared with the same fp32 reference;
  `--fused-adam`: our fp32 path on torch's fused AdamW kernel (opt-in for fp32: it rounds differently);
  `--unfused-wgrad`: ours with `--no-gradient-accumulation-fusion` (weight gradients computed into new
  tensors and then added into the fp32 buffer; the embedding's a dense [V, H] gradient), the baseline
  of that fusion measured in the same run;
- reference: transformers `Qwen2ForCausalLM` with a full (bidirectional) 4-D mask, the objective
  written naively (full [B, S, V] logits, shift by hand, 1/t-weighted CE over masked positions),
  `torch.optim.AdamW` + `clip_grad_norm_`; 2 processes = torch DDP (gloo).
Both read the same synthetic token windows (random ids, mask id = V-1), from an in-memory
dataset keyed by sample index, so the comparison isolates the training step.

Stability: both sides live in the same process(es) and their steps are interleaved (ours, ref,
ref, ours, ...), so each pair of adjacent steps sees the same machine load. tokens/s and MFU are
from each side's median step; the speed-up column is the median of the per-pair ratios
ref/ours, and a second table gives its spread (quartiles, min-max) over the pairs.

MFU = model matmul FLOPs (6 * N_body per token + attention + output layer on the tokens each
implementation actually projects) / step time / (measured matmul peak of one process x procs;
the max of measurements taken before, between and after the steps, fp32 or bf16 as the side).
The reference projects every token through the output layer; ours only the masked ones.

Phase breakdown (median seconds per step, same run): ours from `Trainer.phase_timer` (the trainer
marks its phases, the benchmark's stage marks noise / forward / loss inside the schedule; backward
is what remains of the schedule); the reference times its loop inline. "clip" is the global
norm + clipping (ours: the norm; the clip multiply runs in the optimizer step), "optimizer" is
zero_grad + AdamW (+ master->param copy), "logging" the step's reductions/metrics/logger.
With DDP the reference's gradient all-reduce overlaps its backward (counted there).

GEMM time: two more steps of each side under torch.profiler give the share of the step spent in
the matrix-multiply kernels (mm, addmm, bmm, ...; their self time), applied to the side's timed
median step; the "ceiling" = reference step / our GEMM time: the
speed-up ours would reach if everything but its GEMMs took no time, with both sides' GEMMs as fast
as they run now (the body's GEMMs are the same calls on both sides; ours projects fewer head rows).
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
PHASES = ("batch", "noise", "forward", "loss", "backward", "grad reduce", "clip", "optimizer", "logging")


def _ours(name, world, bf16=False, fused=False, wgrad_fusion=True):
    """Our trainer + pretraining stage; returns step() -> (seconds, {phase: s}, mask fraction)."""
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig
    from megatron_diffu.stages.diffusion.objective import DocumentMasking, PerPosition
    from megatron_diffu.stages.diffusion.stage import DiffusionStage
    from megatron_diffu.training.optimizer import MixedPrecisionAdamW
    from megatron_diffu.training.trainer import PhaseTimer, Trainer, build_grid

    over, seq, mbs = CONFIGS[name]
    args = ["--micro-batch-size", str(mbs), "--global-batch-size", str(mbs * world), "--train-iters", "1000000",
            "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--mock-data", "--eval-interval", "0",
            "--log-interval", "1000000", "--random-truncation-prob", "0", "--peak-flops", "1"]
    args += ["--bf16"] if bf16 else []
    args += [] if wgrad_fusion else ["--no-gradient-accumulation-fusion"]
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

    class TimedMasking(DocumentMasking):  # marks the noise phase inside the schedule
        def noise(self, batch, trainer, *a, **k):
            out = super().noise(batch, trainer, *a, **k)
            trainer.phase_timer.mark("noise")
            return out

    class TimedStage(DiffusionStage):  # marks forward (the model call) and loss (the loss closure)
        def forward_step(self, model, batch, input_tensor):
            out, loss_fn = super().forward_step(model, batch, input_tensor)
            timer = self.trainer.phase_timer
            timer.mark("forward")

            def timed_loss(o):
                r = loss_fn(o)
                timer.mark("loss")
                return r
            return out, timed_loss

    stage = TimedStage(SyntheticData(), TimedMasking(), PerPosition())
    stage.tokenizer, stage.mask_token_id = object(), cfg.model.vocab_size - 1
    MixedPrecisionAdamW.use_fused = True if fused else None  # None: the default (fused for bf16 only)
    try:
        tr = Trainer(cfg, stage, build_grid(cfg))
    finally:
        MixedPrecisionAdamW.use_fused = None
    tr.phase_timer = PhaseTimer(tr.device)

    def step():
        t0 = time.perf_counter()
        m = tr.train_step()
        t1 = time.perf_counter()
        tr.logger.record(tr.iteration, m)
        tr.logger.window.clear()  # log_interval is never reached: keep the window from growing
        dt = time.perf_counter() - t0
        ph = tr.phase_timer.last
        phases = {"batch": ph["batch"], "noise": ph.get("noise", 0.0), "forward": ph.get("forward", 0.0),
                  "loss": ph.get("loss", 0.0), "backward": ph["forward_backward"], "grad reduce": ph["grad_reduce"],
                  "clip": ph["grad_norm"], "optimizer": ph["zero_grad"] + ph["optimizer"],
                  "logging": ph["report"] + ph["step_end"] + (time.perf_counter() - t1)}
        return dt, phases, m["mask_fraction"]
    return step


# ------------------------------------------------------------------------------------ reference
def _reference(name, world):
    """transformers Qwen2 + naive objective + torch AdamW; returns step() -> (seconds, {phase: s}, 1.0)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

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
        marks = [time.perf_counter()]
        start = consumed + (dist.get_rank() if world > 1 else 0) * mbs
        b = _batch(range(start, start + mbs), seq, vocab)
        marks.append(time.perf_counter())  # batch
        x0 = b["tokens"]
        t = torch.stack([1e-3 + (1 - 1e-3) * torch.rand((), generator=torch.Generator().manual_seed(int(i) + 7))
                         for i in b["sample_index"]])
        masked = torch.rand(x0.shape) < t[:, None]
        masked[:, 0] = False
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        marks.append(time.perf_counter())  # noise
        logits = model(input_ids=xt, attention_mask={"full_attention": full}).logits  # [B, S, V]
        marks.append(time.perf_counter())  # forward
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # the shift
        ce = F.cross_entropy(logits.float().reshape(-1, vocab), x0.reshape(-1), reduction="none").view_as(x0)
        loss = (ce * masked / t[:, None]).sum() / (x0.numel() * world)
        marks.append(time.perf_counter())  # loss
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())  # zero_grad (optimizer)
        loss.backward()
        marks.append(time.perf_counter())  # backward (+ DDP's overlapped all-reduce)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        marks.append(time.perf_counter())  # clip
        opt.step()
        marks.append(time.perf_counter())  # optimizer
        _ = (loss.detach().item(), norm.item())  # what a log line reads
        consumed += mbs * world
        marks.append(time.perf_counter())  # logging
        d = [b - a for a, b in zip(marks, marks[1:])]
        phases = {"batch": d[0], "noise": d[1], "forward": d[2], "loss": d[3], "backward": d[5],
                  "grad reduce": 0.0, "clip": d[6], "optimizer": d[4] + d[7], "logging": d[8]}
        return marks[-1] - marks[0], phases, 1.0
    return step


def _model_step(name, world):
    """Our model's forward + backward alone (logits at half the positions, CE, gradients
    accumulating in .grad): what the full step is compared with (benchmarks/model_step.py's
    "ours (logits at 50%)" at this config's shape)."""
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer
    from megatron_diffu.parallel.cross_entropy import vocab_parallel_cross_entropy

    over, seq, mbs = CONFIGS[name]
    torch.manual_seed(0)
    model = DiffusionTransformer(TransformerConfig(**over, max_position_embeddings=seq)).train()
    ids = torch.randint(0, over["vocab_size"] - 2, (mbs, seq))
    positions = torch.rand(mbs, seq) < 0.5
    positions[:, 0] = False

    def step():
        t0 = time.perf_counter()
        logits = model(ids, logit_positions=positions)
        vocab_parallel_cross_entropy(logits, ids[positions]).mean().backward()
        dt = time.perf_counter() - t0
        return dt, {p: 0.0 for p in PHASES}, float(positions.float().mean())
    return step


# ------------------------------------------------------------------------------------ driver
def _bench(rank, name, steps, world, sides):
    """Build every side in this process, warm each up, then interleave their steps."""
    torch.set_num_threads(1 if world > 1 else max(1, torch.get_num_threads()))
    from megatron_diffu.training.peak import measure_peak_flops

    builders = {"ours": lambda: _ours(name, world), "ref": lambda: _reference(name, world),
                "bf16": lambda: _ours(name, world, bf16=True), "fused": lambda: _ours(name, world, fused=True),
                "unfused": lambda: _ours(name, world, wgrad_fusion=False), "model": lambda: _model_step(name, world)}
    fns = {k: builders[k]() for k in sides}
    dtypes = {"ours": torch.float32, "ref": torch.float32, "bf16": torch.bfloat16, "fused": torch.float32,
              "unfused": torch.float32, "model": torch.float32}
    peaks = {dt: [measure_peak_flops(torch.device("cpu"), dt)] for dt in set(dtypes[k] for k in sides)}
    for f in fns.values():
        f()  # warm-up
    out = {k: {"time": [], "phases": [], "mask": []} for k in sides}
    order = list(sides)
    for i in range(steps):
        for k in (order if i % 2 == 0 else order[::-1]):  # ABBA: neither side always goes first
            dt, ph, mask = fns[k]()
            out[k]["time"].append(dt)
            out[k]["phases"].append(ph)
            out[k]["mask"].append(mask)
        if i == steps // 2:
            for dt in peaks:
                peaks[dt].append(measure_peak_flops(torch.device("cpu"), dt))
    for dt in peaks:
        peaks[dt].append(measure_peak_flops(torch.device("cpu"), dt))
    for k in sides:
        out[k]["peak"] = max(peaks[dtypes[k]])
    for k in [s for s in sides if s != "model"]:
        out[k]["gemm"] = _gemm_share(fns[k])
    return out


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def _gemm_share(step, steps: int = 2):
    """(step s, GEMM s) per step, from torch.profiler over `steps` more steps: the self time of the
    matrix-multiply kernels (GEMM_OPS; attention kernels are not counted). What is left of a step
    beyond its GEMMs is the most any removal of non-GEMM work can save."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6 / steps
    return wall, gemm


def _flops(name, tokens, projected):
    from megatron_diffu.model.config import TransformerConfig
    over, seq, _ = CONFIGS[name]
    cfg = TransformerConfig(**over, max_position_embeddings=seq)
    head = 2.0 * cfg.vocab_size * cfg.hidden_size
    body = cfg.flops_per_token(seq, training=False) - head
    return 3.0 * (body * tokens + head * projected)


def run(name, nproc, steps, sides):
    from megatron_diffu.testing import run_distributed
    if nproc == 1:
        return _bench(0, name, steps, 1, sides)
    return run_distributed(_bench, world_size=nproc, args=(name, steps, nproc, sides), timeout=1800)[0]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,100m")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--steps", type=int, default=12, help="interleaved timed steps per side (after one warm-up)")
    ap.add_argument("--bf16", action="store_true", help="also time our bf16 trainer path (vs the fp32 reference)")
    ap.add_argument("--fused-adam", action="store_true", help="also time ours with the fused AdamW kernel")
    ap.add_argument("--unfused-wgrad", action="store_true",
                    help="also time ours with --no-gradient-accumulation-fusion (dW into a new tensor, then added)")
    ap.add_argument("--no-model-step", action="store_true", help="skip our model's forward+backward alone")
    args = ap.parse_args(argv)
    sides = ["ours", "ref"] + (["bf16"] if args.bf16 else []) + (["fused"] if args.fused_adam else [])
    sides += ["unfused"] if args.unfused_wgrad else []
    sides += [] if args.no_model_step else ["model"]
    labels = {"ours": "ours", "bf16": "ours bf16", "fused": "ours fused-adam", "unfused": "ours unfused"}
    rows, spreads, breakdowns, model_rows, gemms = [], [], [], [], []
    for name in args.configs.split(","):
        _, seq, mbs = CONFIGS[name]
        for nproc in [int(n) for n in args.nprocs.split(",")]:
            print(f"[bench] {name} x{nproc}: {', '.join(sides)} interleaved, {args.steps} steps each ...", flush=True)
            res = run(name, nproc, args.steps, sides)
            tokens = mbs * seq * nproc
            ref = res["ref"]
            t_ref = _median(ref["time"])
            f_ref = _flops(name, tokens, tokens)
            if "model" in res:
                t_model = _median(res["model"]["time"])
                for k in [s for s in sides if s not in ("ref", "model")]:
                    frac = [m / o for m, o in zip(res["model"]["time"], res[k]["time"])]
                    model_rows.append((labels[k], name, nproc, tokens / t_model, tokens / _median(res[k]["time"]),
                                       _median(frac), min(frac), max(frac)))
            for k in [s for s in sides if s not in ("ref", "model")]:
                ours = res[k]
                t_ours = _median(ours["time"])
                f_ours = _flops(name, tokens, tokens * sum(ours["mask"]) / len(ours["mask"]))
                ratios = [r / o for r, o in zip(ref["time"], ours["time"])]
                rows.append((k, name, nproc, tokens / t_ours, f_ours / t_ours / (ours["peak"] * nproc),
                             tokens / t_ref, f_ref / t_ref / (ref["peak"] * nproc), _median(ratios)))
                spreads.append((labels[k], name, nproc, len(ratios), _median(ratios), _quantile(ratios, 0.25),
                                _quantile(ratios, 0.75), min(ratios), max(ratios),
                                (max(ours["time"]) - min(ours["time"])) / t_ours,
                                (max(ref["time"]) - min(ref["time"])) / t_ref))
            for k in [s for s in sides if s != "model"]:
                wall, gemm = res[k]["gemm"]
                share = gemm / wall  # the profiled steps' GEMM share, applied to the timed median (steadier)
                t_k = _median(res[k]["time"])
                gemms.append((labels.get(k, "reference"), name, nproc, t_k, share,
                              None if k == "ref" else t_ref / (t_k * share)))
                med = {p: _median([ph[p] for ph in res[k]["phases"]]) for p in PHASES}
                breakdowns.append((labels.get(k, "reference"), name, nproc, _median(res[k]["time"]), med))
    for kind, title in (("ours", None), ("bf16", "our bf16 trainer path (MFU vs the bf16 peak) vs the fp32 reference"),
                        ("fused", "ours with the fused AdamW kernel (opt-in) vs the reference"),
                        ("unfused", "ours without gradient accumulation fusion vs the reference")):
        sel = [r for r in rows if r[0] == kind]
        if not sel:
            continue
        print()
        if title:
            print(title + ":")
        print(f"{'config':<7}{'procs':>6}{'ours tok/s':>12}{'ours MFU':>10}{'ref tok/s':>12}{'ref MFU':>10}{'speed-up':>10}")
        for r in sel:
            print(f"{r[1]:<7}{r[2]:>6}{r[3]:>12.1f}{100 * r[4]:>9.1f}%{r[5]:>12.1f}{100 * r[6]:>9.1f}%{r[7]:>9.2f}x")
    print("\nMFU vs the measured matmul peak of one process x processes; CPU, shared machine.")
    print("speed-up = median over interleaved step pairs of ref time / ours time; its spread:")
    print(f"{'side':<16}{'config':<7}{'procs':>6}{'pairs':>6}{'median':>8}{'q25':>7}{'q75':>7}{'min':>7}{'max':>7}"
          f"{'ours range':>11}{'ref range':>10}")
    for s_ in spreads:
        print(f"{s_[0]:<16}{s_[1]:<7}{s_[2]:>6}{s_[3]:>6}{s_[4]:>7.2f}x{s_[5]:>6.2f}x{s_[6]:>6.2f}x{s_[7]:>6.2f}x"
              f"{s_[8]:>6.2f}x{100 * s_[9]:>10.0f}%{100 * s_[10]:>9.0f}%")
    print("(range = (max - min) / median of that side's step times)")
    if model_rows:
        print("\nfull step vs our model's forward+backward alone (logits at 50%), same run:")
        print(f"{'side':<16}{'config':<7}{'procs':>6}{'model tok/s':>13}{'step tok/s':>12}{'step/model':>12}"
              f"{'min':>7}{'max':>7}")
        for r in model_rows:
            print(f"{r[0]:<16}{r[1]:<7}{r[2]:>6}{r[3]:>13.1f}{r[4]:>12.1f}{100 * r[5]:>11.0f}%{100 * r[6]:>6.0f}%"
                  f"{100 * r[7]:>6.0f}%")
        print("(step/model = median over interleaved pairs of model-step time / full-step time)")
    if gemms:
        print("\nGEMM time (torch.profiler, 2 more steps per side; attention kernels not counted):")
        print(f"{'side':<16}{'config':<7}{'procs':>6}{'step ms':>9}{'GEMM ms':>9}{'GEMM %':>8}{'ceiling':>9}")
        for label, name, nproc, t_k, share, ceiling in gemms:
            print(f"{label:<16}{name:<7}{nproc:>6}{1000 * t_k:>9.1f}{1000 * t_k * share:>9.1f}{100 * share:>7.0f}%"
                  + (f"{ceiling:>8.2f}x" if ceiling else f"{'':>9}"))
        print("(step = the timed median; GEMM % = the share of the profiled steps; ceiling = reference step /"
              " our GEMM time:\n the speed-up if everything but our GEMMs took no time, both sides' GEMMs"
              " running as now)")
    print("\nphase breakdown, median ms per step (same run):")
    print(f"{'side':<16}{'config':<7}{'procs':>6}{'step':>8}" + "".join(f"{p:>12}" for p in PHASES))
    for label, name, nproc, t, med in breakdowns:
        print(f"{label:<16}{name:<7}{nproc:>6}{1000 * t:>8.1f}" + "".join(f"{1000 * med[p]:>12.1f}" for p in PHASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
