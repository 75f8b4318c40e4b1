"""Every derived seed of the package, in one place (docs/ALGORITHMS.md sec. 9).

A derived seed is a stable hash of the run seed and a key (a sample index, a parameter name, a
rollout/inner-iteration pair...), never of the rank, layout or step count, so every TP/PP/DP layout
and every resume draws the same numbers. The recipes differ (they were fixed when each part was
written, and changing one would change every run's noise, weights or samples); they are kept
bit-for-bit and named here so that nothing else hashes seeds by hand.
"""
from __future__ import annotations

import hashlib
import zlib

import torch

MAX_SEED = (1 << 63) - 1


def _sha256_int(text: str, nbytes: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:nbytes], "little")


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def noise_seed(seed: int, key: int, purpose: str) -> int:
    """Diffusion noise of one sample (t, mask, truncation) for a purpose ("train", "elbo", ...)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(key)}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def sampler_row_seed(seed: int, sample_index: int) -> int:
    """The sampler's generator of one prompt row."""
    return _sha256_int(f"megatron_diffu.sampling:{int(seed)}:{int(sample_index)}", 8) & MAX_SEED


def grpo_mask_seed(seed: int, rollout_index: int, inner: int) -> int:
    """Coupled-GRPO masks of inner iteration `inner` of rollout batch `rollout_index` (shared by the
    old, reference and current log-prob passes of that step)."""
    return _sha256_int(f"megatron_diffu.grpo:{int(seed)}:{int(rollout_index)}:{int(inner)}", 7)


def parameter_seed(seed: int, name: str) -> int:
    """Initial weights of one (global) parameter of the model."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % MAX_SEED


def synthetic_tensor_seed(seed: int, name: str) -> int:
    """Random checkpoints written by the conversion benchmarks and tests."""
    return _sha256_int(f"{seed}:{name}", 8) % (2 ** 63)


def evaluation_sample_key(task_id: str, sample: int) -> int:
    """Sampler key of sample `sample` of an evaluation problem (stable across resumes)."""
    return int(hashlib.sha256(f"{task_id}/{sample}".encode()).hexdigest()[:12], 16)
