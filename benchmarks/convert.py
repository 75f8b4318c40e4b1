#!/usr/bin/env python
"""Checkpoint conversion: wall time and peak RSS, streaming converter vs the naive baseline.

For random Qwen2.5-0.5B / 1.5B-shaped checkpoints (bf16, tied embeddings, 151936 vocab), both
directions, each conversion in a fresh process (megatron_diffu.convert.measure):
  * stream: tools/convert_checkpoint.py's code path (tensor-by-tensor safetensors and DCP I/O);
  * naive : load everything, convert in memory, save in one call (safetensors load_file/save_file,
            one dcp.save / dcp.load of the full state dict) - what a first converter usually does.
Peak RSS is the process's resident set polled every 10 ms; "above base" subtracts the RSS after
imports. Ratios are naive / stream (higher = stream better). Disk: up to ~4x the model size in
--workdir, deleted as it goes.

    python benchmarks/convert.py [--sizes qwen2.5-0.5b qwen2.5-1.5b] [--workdir /tmp/convert_bench]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_diffu.convert.measure import measure  # noqa: E402
from megatron_diffu.convert.synthetic import PRESETS, qwen2_config, write_random_hf_checkpoint  # noqa: E402


def bench_size(name: str, work: Path) -> list[dict]:
    cfg = qwen2_config(**PRESETS[name])
    src = work / f"{name}-hf"
    t0 = time.perf_counter()
    write_random_hf_checkpoint(src, cfg, max_shard_bytes=2 * 10**9, fast=True)
    model_mb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    print(f"[{name}] wrote a {model_mb:,.0f} MB random checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    runs = [("hf-to-native", src, work / f"{name}-native"), ("native-to-hf", work / f"{name}-native", work / f"{name}-export")]
    for direction, inp, out in runs:
        res = {}
        for mode in ("stream", "naive"):
            dst = out if mode == "stream" else out.with_name(out.name + "-naive")
            res[mode] = measure(mode, direction, inp, dst)
            print(f"[{name}] {direction:12s} {mode:6s} {res[mode]['seconds']:7.1f} s  "
                  f"peak {res[mode]['peak_rss_mb']:7,.0f} MB", flush=True)
            if mode == "naive":
                shutil.rmtree(dst, ignore_errors=True)
        rows.append({"size": name, "model_mb": model_mb, "direction": direction, **{
            f"{m}_{k}": v for m in res for k, v in res[m].items()}})
        if direction == "native-to-hf":
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(work / f"{name}-native", ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':14s} {'MB':>6s} {'direction':13s} {'stream s':>9s} {'naive s':>8s} {'t ratio':>8s} "
            f"{'stream peak':>12s} {'naive peak':>11s} {'above base (s/n)':>17s} {'mem ratio':>9s}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['size']:14s} {r['model_mb']:6,.0f} {r['direction']:13s} {r['stream_seconds']:9.1f} "
              f"{r['naive_seconds']:8.1f} {r['naive_seconds'] / r['stream_seconds']:8.2f} "
              f"{r['stream_peak_rss_mb']:10,.0f}MB {r['naive_peak_rss_mb']:9,.0f}MB "
              f"{r['stream_peak_above_baseline_mb']:7,.0f}/{r['naive_peak_above_baseline_mb']:<7,.0f}MB "
              f"{r['naive_peak_above_baseline_mb'] / max(r['stream_peak_above_baseline_mb'], 1):9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=sorted(PRESETS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/convert_bench"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.sizes:
            rows += bench_size(name, args.workdir)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
