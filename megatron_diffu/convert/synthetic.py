"""Random Qwen2-format Hugging Face checkpoints of any size, written tensor by tensor.

For the memory test and the conversion benchmark: a 1.5B-parameter folder is written without
ever holding more than one tensor, so the measurement is of the converter, not of the fixture.
Each tensor is drawn from a generator seeded by (seed, name): the same call writes the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_diffu.common.seeding import synthetic_tensor_seed

from . import hf as H
from .safetensors_io import INDEX_NAME, StreamingSafetensorsWriter, plan_shards, shard_file_names


def qwen2_config(num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                 tie: bool = False, dtype: str = "bfloat16", rope_theta: float = 1e6) -> dict:
    """A transformers-5 style Qwen2 config.json (rope_theta inside rope_parameters)."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": num_layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}, "dtype": dtype,
            "initializer_range": 0.02, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643}


PRESETS = {
    "qwen2.5-0.5b": dict(num_layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, vocab=151936, tie=True),
    "qwen2.5-1.5b": dict(num_layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936, tie=True),
    "1b": dict(num_layers=20, hidden=2048, ffn=5632, heads=16, kv_heads=4, vocab=32000, tie=False),
}


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float = 0.02,
                  fast: bool = False) -> torch.Tensor:
    """Normal(0, std) values (norm weights around 1). `fast`: draw at most 2**20 values and tile
    them (memory-speed fixtures for the multi-GB memory test and benchmark)."""
    gen = torch.Generator().manual_seed(synthetic_tensor_seed(seed, name))
    numel = torch.Size(shape).numel()
    n = min(numel, 2**20) if fast else numel
    values = torch.randn(n, generator=gen)
    values = 1.0 + 0.1 * values if name.endswith("norm.weight") else std * values
    values = values.to(dtype)
    if n < numel:
        values = values.repeat((numel + n - 1) // n)[:numel]
    return values.reshape(shape)


def write_random_hf_checkpoint(folder: Path, config: dict, seed: int = 0, max_shard_bytes: int = 2 * 10**9,
                               std: float = 0.02, fast: bool = False) -> Path:
    """Write config.json + (sharded) safetensors with random weights for a Qwen2 `config`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = H.transformer_config_from_hf(config)
    dtype = H.dtype_from_name(config.get("dtype", "float32"))
    shapes = H.hf_shapes(cfg)
    entries = [(h, dtype, shapes[h]) for _, hs in H.name_pairs(cfg) for h in hs]
    groups = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(groups))
    weight_map = {}
    for g, fname in zip(groups, names):
        w = StreamingSafetensorsWriter(folder / fname, [entries[i] for i in g])
        for i in g:
            name, dt, shape = entries[i]
            w.write(name, random_tensor(name, shape, dt, seed, std, fast))
            weight_map[name] = fname
        w.close()
    if len(names) > 1:
        total = sum(torch.empty((), dtype=dt).element_size() * torch.Size(sh).numel() for _, dt, sh in entries)
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
