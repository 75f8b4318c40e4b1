"""Load a model for inference from either checkpoint kind a user has at hand.

- a native checkpoint (a `--save` dir or one `iter_*` dir): `training.checkpointing`;
- a Hugging Face folder (`config.json` + safetensors: Qwen2/2.5, Dream/DiffuCoder, our exports):
  read tensor by tensor through the converter's name map, only the tensors this rank holds.

Used by `tools/generate.py` and `tools/evaluate.py`, so both accept the same `--load`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.builder import build_model_shard
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.state import ProcessGrid

from . import hf as H
from .safetensors_io import SafetensorsFolder


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_hf_folder(folder: str | Path, grid: Optional[ProcessGrid] = None, device: Any = None,
                   bf16: bool = False) -> tuple[DiffusionTransformer, TransformerConfig]:
    """(model in eval mode, config) from a Hugging Face folder, built for `grid`'s TP shard / PP stage."""
    folder = Path(folder)
    cfg = H.transformer_config_from_hf(H.read_hf_config(folder), str(folder / "config.json"))
    cfg.bf16 = bf16 or cfg.bf16
    reader = SafetensorsFolder(folder)
    model = build_model_shard(cfg, grid, device=device, init_weights=False)  # every weight is loaded below
    wanted = set(model.canonical_parameters())
    full = {name: H.to_native(name, [reader.get(h) for h in hf_names], cfg)
            for name, hf_names in H.name_pairs(cfg) if name in wanted}
    model.load_global_state_dict(full)
    return model.eval(), cfg


def load_model_for_inference(path: str | Path, grid: Optional[ProcessGrid] = None, device: Any = None,
                             bf16: bool = False) -> tuple[DiffusionTransformer, TransformerConfig]:
    """(model in eval mode, config) from a native checkpoint or a Hugging Face folder."""
    if is_hf_folder(path):
        return load_hf_folder(path, grid, device, bf16)
    from megatron_diffu.training.checkpointing import load_inference_model

    return load_inference_model(path, grid=grid, device=device, dtype=torch.bfloat16 if bf16 else None)
