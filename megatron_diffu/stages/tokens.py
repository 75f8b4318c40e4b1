"""What every stage resolves from the tokenizer before the model is built: the (padded)
vocabulary, the mask id and the ids that are never masked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_diffu.config import ConfigError
from megatron_diffu.data.loader import unmaskable_ids
from megatron_diffu.data.tokenizer import build_tokenizer, padded_vocab_size
from megatron_diffu.training import checkpointing


@dataclass
class StageTokens:
    tokenizer: Any = None
    mask_token_id: Optional[int] = None
    special_ids: list[int] = field(default_factory=list)  # never masked (eod/bos specials + never_mask_token_ids)


def resolve_tokens(cfg, never_mask: tuple[int, ...] = (), mask_token_id: Optional[int] = None) -> StageTokens:
    """Build the tokenizer; set `cfg.model.vocab_size` (padded, or the checkpoint's when resuming)
    unless given; return the mask id (the given one, else the tokenizer's) and the special ids."""
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    n = int(tokenizer.vocab_size)
    if not cfg.is_explicit("model", "vocab_size"):
        tp = cfg.parallel.tensor_model_parallel_size
        cfg.model.vocab_size = _checkpoint_vocab(cfg, n, tp) or padded_vocab_size(
            n, cfg.data.make_vocab_size_divisible_by, tp)
    elif cfg.model.vocab_size < n:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {n} ids "
                          f"({cfg.data.tokenizer_type}): leave it unset (padded automatically) or raise it")
    mask = int(tokenizer.mask_id if mask_token_id is None else mask_token_id)
    special = sorted(set(unmaskable_ids(tokenizer)) | set(never_mask))
    return StageTokens(tokenizer, mask, special)


def _checkpoint_vocab(cfg, n: int, tp: int) -> Optional[int]:
    """Resuming/finetuning: keep the checkpoint's padded vocabulary (Megatron pads to a multiple of
    128 * TP, so a run resumed at another TP would otherwise build a different embedding)."""
    if not checkpointing.has_checkpoint(cfg.checkpoint.load):
        return None
    try:
        saved = checkpointing.read_run_config(checkpointing.resolve_checkpoint_dir(cfg.checkpoint.load))
        v = int(saved.get("model", {}).get("vocab_size"))
    except (checkpointing.CheckpointError, TypeError, ValueError):
        return None
    return v if v >= n and v % tp == 0 else None


def to_device(batch: dict, device) -> dict:
    """A micro-batch's tensors moved to `device` (other values as they are)."""
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_forward(model, input_ids, input_tensor, *, attention_mask=None, position_ids=None, logit_positions=None):
    """One pipeline stage's forward: the first stage embeds `input_ids`, later ones take the
    previous stage's hidden states; only the last stage computes logits (at `logit_positions`)."""
    stage = getattr(model, "module", model)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if getattr(stage, "post_process", True):
        kwargs["logit_positions"] = logit_positions
    if getattr(stage, "pre_process", True):
        return model(input_ids, **kwargs)
    return model(hidden_states=input_tensor, **kwargs)
