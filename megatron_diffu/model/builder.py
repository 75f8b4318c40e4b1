"""The one builder of "this rank's model shard": its TP slice and its pipeline stage's layers.

The trainer (training), the reference policy (GRPO), and inference loading (native checkpoints
and HF folders) all build through `build_model_shard`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.fp8 import Fp8Recipe, enable_fp8
from megatron_diffu.model.transformer import DiffusionTransformer, pipeline_layer_split
from megatron_diffu.parallel.state import ProcessGrid


def build_model_shard(cfg: TransformerConfig, grid: Optional[ProcessGrid] = None, *,
                      split: Optional[Sequence[int]] = None, sequence_parallel: bool = False,
                      device: Any = None, init_weights: bool = True) -> DiffusionTransformer:
    """The DiffusionTransformer shard of this rank under `grid` (default: one process, all layers).

    `split`: layers per pipeline stage (None = even split); `init_weights=False` skips the
    random initialisation when every weight is loaded right after."""
    grid = grid or ProcessGrid.single()
    model = DiffusionTransformer(cfg, grid=grid, pre_process=grid.is_first_stage, post_process=grid.is_last_stage,
                                 layer_ids=pipeline_layer_split(cfg, grid.pp_size, grid.pp_rank, split),
                                 sequence_parallel=sequence_parallel, device=device, init_weights=init_weights)
    if cfg.fp8_format is not None and cfg.transformer_impl == "local":
        # torch-native FP8 linears. Training passes reduce the amax over TP x DP of this stage (every
        # rank holding a shard or replica of the weight: one scale, as Megatron/TE's fp8_group);
        # no-grad FP8 passes over TP only (DP ranks may run different numbers of them)
        enable_fp8(model, Fp8Recipe(cfg.fp8_format, cfg.fp8_margin, min(cfg.fp8_amax_history_len, 16),
                                    amax_group=grid.amax_group, no_grad_fp8=cfg.fp8_no_grad,
                                    no_grad_amax_group=grid.tp_group))
    return model
