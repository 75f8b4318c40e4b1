"""Attention memory and time with and without masks (model/attention.py), old path as baseline.

One attention call (the 7B head shape by default: 28 query / 4 KV heads, D = 128) for:
  - no mask;
  - padding mask, new path: the [B, S] padding mask as a [B, 1, 1, S] key-padding mask, K/V heads
    repeated when GQA would put SDPA on the math kernel (`attention`);
  - padding mask, old path: the pairwise [B, 1, S, S] bool mask (a_i AND a_j, own key for empty
    rows) straight into SDPA with enable_gqa=True (what the model did before), on the kernel SDPA
    picks and forced onto the math kernel (where CUDA's old call lands: no fused kernel of
    torch <= 2.13 takes a mask together with GQA; CPU's flash kernel does);
  - 4-D mask (attention annealing: causal OR Bernoulli(0.5)), new path and old path.
Peak memory is measured above the inputs (q, k, v and the mask already allocated; the mask's own
size is its column): on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident set size
of this process (VmHWM, reset through /proc/self/clear_refs), i.e. every page the call touched,
kernel scratch included, with glibc told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_,
set by re-executing the script) so that freed memory leaves the RSS instead of being reused
unseen. Time: median of --iters calls after a warm-up.

    python benchmarks/attention_memory.py                       # CPU: S=1024, fp32, forward
    python benchmarks/attention_memory.py --device cuda         # CUDA: S=4096, bf16
    python benchmarks/attention_memory.py --device cuda --backward --batch 2 --seq-length 8192
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_diffu.diffusion.objective import annealed_attention_mask  # noqa: E402
from megatron_diffu.model.attention import (attention, attention_plan, build_attention_mask,  # noqa: E402
                                            sdpa_backend)

MiB = 2.0 ** 20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_bytes(fn, device: str) -> tuple[float, object]:
    """(peak bytes above the current allocation while fn runs, fn's result)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    try:
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan"), fn()
    out = fn()
    return _status("VmHWM") - base, out


def timed(fn, device: str, iters: int) -> float:
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def old_pairwise(a: torch.Tensor) -> torch.Tensor:
    """The old padding mask: [B, 1, S, S] a_i AND a_j, a row without a key gets its own key."""
    pair = a[:, None, :, None] & a[:, None, None, :]
    eye = torch.eye(a.shape[1], dtype=torch.bool, device=a.device)
    return pair | (~pair.any(-1, keepdim=True) & eye)


def cases(args, device):
    b, s = args.batch, args.seq_length
    a = torch.ones(b, s, dtype=torch.bool, device=device)
    a[0, : s // 8] = False  # left padding (sampler, GRPO rollouts)
    if b > 1:
        a[1:, s - s // 4:] = False  # right padding (SFT)
    anneal = annealed_attention_mask(torch.arange(b), s, 0.5, seed=0).to(device)
    new_pad, new_4d = build_attention_mask(a, b, s), build_attention_mask(anneal, b, s)
    old_pad = old_pairwise(a)
    return [
        ("no mask", "new", None, None),
        ("padding", "new", new_pad, new_pad.allowed),
        ("padding", "old", old_pad, old_pad),
        ("padding", "old, math", old_pad, old_pad),
        ("4-D annealing", "new", new_4d, new_4d.allowed),
        ("4-D annealing", "old", anneal, anneal),
    ]


def run_case(q, k, v, path, mask, backward: bool):
    def call():
        if path == "new":
            out = attention(q, k, v, mask)
        elif path == "old, math":  # the kernel the old call falls to where no fused kernel takes it
            with sdpa_kernel([SDPBackend.MATH]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        if backward:
            out.float().sum().backward()
            for t in (q, k, v):
                t.grad = None
        return out
    return call


def kernel(q, k, v, path, mask) -> tuple[str, bool]:
    if path == "new":
        plan = attention_plan(q, k, v, mask)
        return plan["backend"], plan["expanded_kv"]
    if path == "old, math":
        with sdpa_kernel([SDPBackend.MATH]):
            return sdpa_backend(q, k, v, mask, enable_gqa=True), False
    return sdpa_backend(q, k, v, mask, enable_gqa=True), False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-length", type=int, default=None, help="default 4096 on CUDA, 1024 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backward", action="store_true", help="forward + backward (default: forward only)")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if not cuda and argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    args.seq_length = args.seq_length or (4096 if cuda else 1024)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if cuda else "fp32")]
    b, s, d = args.batch, args.seq_length, args.head_dim
    g = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, device=args.device, generator=g).to(dtype).requires_grad_(args.backward)
               for n in (args.heads, args.kv_heads, args.kv_heads))
    measure = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    scores = b * args.heads * s * s * 4 / MiB
    print(f"# attention, B={b} S={s} heads={args.heads}/{args.kv_heads} D={d} {dtype} "
          f"{'fwd+bwd' if args.backward else 'fwd'} on {args.device} ({torch.__version__}); "
          f"peak = {measure} above the inputs; one fp32 [B, h, S, S] = {scores:.0f} MiB")
    print("| case | path | SDPA kernel | K/V expanded | mask given to SDPA | mask MiB | peak MiB | ms |")
    print("|---|---|---|---|---|---:|---:|---:|")
    torch.set_grad_enabled(args.backward)
    for name, path, mask, tensor in cases(args, args.device):
        call = run_case(q, k, v, path, mask, args.backward)
        backend, expanded = kernel(q, k, v, path, mask)
        call()  # warm-up
        peak, _ = peak_bytes(call, args.device)
        ms = 1e3 * timed(call, args.device, args.iters)
        shape = "-" if tensor is None else f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
        mib = 0.0 if tensor is None else tensor.numel() * tensor.element_size() / MiB
        print(f"| {name} | {path} | {backend} | {'yes' if expanded else 'no'} | {shape} | {mib:.2f} | "
              f"{peak / MiB:.1f} | {ms:.1f} |")
    torch.set_grad_enabled(True)


if __name__ == "__main__":
    main()
