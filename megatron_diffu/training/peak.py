"""The MFU yardstick: datasheet peaks of common accelerators, and a measured matmul peak.

`measure_peak_flops(device, dtype)`: dense matmul FLOP/s of one process. On CUDA a large square
matmul (default 8192^3, a few back-to-back, timed with CUDA events after warm-up): a 1024^3 matmul
timed with perf_counter measures launch latency and synchronisation, not the tensor cores, and
inflates MFU several times on an H100/H200. On CPU a 1024^3 matmul timed with perf_counter.

`datasheet_peak_flops(name, dtype)`: the vendor's dense (no sparsity) tensor-core peak for a
device name as torch reports it (`torch.cuda.get_device_name()`), None when unknown.
`mfu_peak_flops(device, dtype)`: the datasheet peak when known (MFU's usual denominator), else
the measured one.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

# TFLOP/s, dense, per GPU (NVIDIA datasheets; SXM parts unless named). fp32 = TF32 tensor cores
# (what torch uses for fp32 matmuls with allow_tf32; without it fp32 runs on CUDA cores, ~1/7).
# Order matters: the first key contained in the device name wins.
DATASHEET_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GB200": {"bf16": 2500.0, "fp8": 5000.0, "fp32": 1250.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0, "fp32": 1100.0},
    "H200 NVL": {"bf16": 835.0, "fp8": 1671.0, "fp32": 418.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "GH200": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.5, "fp8": 1513.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.5, "fp8": 1671.0, "fp32": 417.8},
    "H100": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "H800": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},
    "H20": {"bf16": 148.0, "fp8": 296.0, "fp32": 74.0},
    "L40S": {"bf16": 362.1, "fp8": 733.0, "fp32": 183.0},
    "L4": {"bf16": 121.0, "fp8": 242.0, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "A800": {"bf16": 312.0, "fp32": 156.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores (no bf16 on Volta)
}

_KIND = {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}


def _kind(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    if dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        return "fp8"
    return _KIND.get(dtype, "fp32")


def datasheet_peak_flops(device_name: str, dtype=torch.bfloat16) -> Optional[float]:
    """Dense peak FLOP/s for `device_name` (e.g. "NVIDIA H200") and dtype (or "bf16"/"fp8"/"fp32")."""
    for key, peaks in DATASHEET_PEAK_TFLOPS.items():
        if key in device_name:
            v = peaks.get(_kind(dtype))
            return None if v is None else v * 1e12
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: Optional[int] = None,
                       repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s of one process on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(device, dtype, size or 8192, repeats)
    size = size or 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def _measure_cuda(device: torch.device, dtype: torch.dtype, size: int, repeats: int, inner: int = 10) -> float:
    with torch.cuda.device(device):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize(device)
        best = math.inf
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):  # back to back: no host gap inside the timed window
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / inner)
        del a, b, out
    return 2.0 * size ** 3 / best


def mfu_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """MFU denominator: the datasheet peak of this GPU when known, else the measured peak."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = datasheet_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    return measure_peak_flops(device, dtype)
