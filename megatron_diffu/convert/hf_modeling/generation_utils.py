# coding=utf-8
"""`diffusion_generate` for the exported Dream/DiffuCoder model (megatron-diffu's own code).

Same arguments and outputs as Dream's: max_new_tokens (or max_length), steps, eps, temperature,
top_p, top_k, alg in {origin, maskgit_plus, topk_margin, entropy}, alg_temp, output_history,
return_dict_in_generate, num_return_sequences, and the two hooks
`generation_tokens_hook_func(step, x, logits) -> x` / `generation_logits_hook_func(step, x, logits) -> logits`.

Semantics (megatron-diffu docs/ALGORITHMS.md sec. 4, as Dream): x = prompt + N mask tokens; timesteps
linspace(1, eps, steps + 1); each step shifts the logits (position i-1 predicts token i), samples
x0 and a confidence at masked positions and reveals k = int(n_masked * (1 - s/t)) of them (all
at the last step): the top-k by confidence (alg_temp 0/None) or k drawn from
softmax(confidence / alg_temp); `origin` reveals each masked position with probability 1 - s/t.
k is computed per row (Dream uses the batch mean; they agree whenever every row holds the same
number of masks, which is always the case unless prompts contain mask tokens).
"""
import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributions as dists
import torch.nn.functional as F
from transformers.utils import ModelOutput


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, margin_confidence: bool = False, neg_entropy: bool = False):
    """Return (confidence [N], token [N]) for logits [N, V] (Dream's `sample_tokens`)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = dists.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@dataclass
class DreamModelOutput(ModelOutput):
    sequences: torch.LongTensor = None
    history: Optional[Tuple[torch.FloatTensor]] = None


class DreamGenerationConfig:
    """Generation settings (a plain object: transformers' GenerationConfig validation differs
    between major versions and knows nothing of diffusion fields)."""

    _FIELDS: Dict[str, Any] = dict(
        temperature=0.0, top_p=None, top_k=None, max_length=20, max_new_tokens=None,
        eps=1e-3, steps=512, alg="origin", alg_temp=None,
        num_return_sequences=1, return_dict_in_generate=False, output_history=False,
        mask_token_id=None, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )

    def __init__(self, **kwargs):
        for k, v in self._FIELDS.items():
            setattr(self, k, kwargs.pop(k, v))
        self.generation_kwargs = kwargs.pop("generation_kwargs", {})
        for k, v in kwargs.items():  # informative extras (e.g. transformers_version)
            setattr(self, k, v)

    @classmethod
    def from_model_config(cls, config) -> "DreamGenerationConfig":
        return cls(**{k: getattr(config, k) for k in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
                      if getattr(config, k, None) is not None})

    def update(self, **kwargs) -> Dict[str, Any]:
        """Set known fields; return the kwargs that are not generation settings."""
        unused = {}
        for k, v in kwargs.items():
            if k in self._FIELDS:
                setattr(self, k, v)
            else:
                unused[k] = v
        return unused

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}


class DreamGenerationMixin:
    @torch.no_grad()
    def diffusion_generate(self, inputs: Optional[torch.Tensor] = None,
                           generation_config: Optional[DreamGenerationConfig] = None, **kwargs):
        cfg = copy.deepcopy(generation_config) if generation_config is not None else self._default_generation_config()
        tokens_hook = kwargs.pop("generation_tokens_hook_func", lambda step, x, logits: x)
        logits_hook = kwargs.pop("generation_logits_hook_func", lambda step, x, logits: logits)
        input_ids = kwargs.pop("input_ids", inputs)
        attention_mask = kwargs.pop("attention_mask", None)
        unused = cfg.update(**kwargs)
        if unused:
            raise TypeError(f"diffusion_generate got unexpected argument(s) {sorted(unused)}")
        if input_ids is None:
            raise ValueError("diffusion_generate needs input_ids (the prompt, left-padded for batches)")
        if cfg.mask_token_id is None:
            raise ValueError("mask_token_id is not set: pass mask_token_id= or set it in config.json")
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if cfg.max_new_tokens is not None:
            cfg.max_length = input_ids.shape[-1] + cfg.max_new_tokens
        if input_ids.shape[-1] >= cfg.max_length:
            raise ValueError(f"prompt length {input_ids.shape[-1]} >= max_length {cfg.max_length}: set max_new_tokens")
        if cfg.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(cfg.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, dim=0)
        return self._sample(input_ids, attention_mask, cfg, tokens_hook, logits_hook)

    def _default_generation_config(self) -> DreamGenerationConfig:
        """config.json's token ids, then every setting generation_config.json states (when transformers
        loaded it as `self.generation_config`); anything it leaves out keeps DreamGenerationConfig's
        default. Only the values the file sets count: `to_diff_dict` drops transformers' own defaults
        (None in transformers 5; temperature 1.0 / top_p 1.0 / top_k 50 in transformers 4)."""
        cfg = DreamGenerationConfig.from_model_config(self.config)
        gen = getattr(self, "generation_config", None)
        if gen is None:
            return cfg
        stated = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else vars(gen)
        for k in ("steps", "eps", "alg", "alg_temp", "temperature", "top_p", "top_k", "max_new_tokens", "max_length",
                  "mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            if k in stated and stated[k] is not None:
                setattr(cfg, k, stated[k])
        return cfg

    def _sample(self, input_ids, attention_mask, cfg: DreamGenerationConfig, tokens_hook, logits_hook):
        mask_id, steps, eps = cfg.mask_token_id, cfg.steps, cfg.eps
        histories = [] if (cfg.return_dict_in_generate and cfg.output_history) else None
        x = F.pad(input_ids, (0, cfg.max_length - input_ids.shape[1]), value=mask_id)
        if attention_mask is not None and bool((attention_mask == 0).any()):
            am = F.pad(attention_mask, (0, cfg.max_length - attention_mask.shape[1]), value=1)
            tok_idx = am.long().cumsum(-1) - 1
            tok_idx.masked_fill_(am == 0, 1)
            attn = am.bool()[:, None, :, None] & am.bool()[:, None, None, :]
        else:
            tok_idx, attn = None, "full"
        timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
        x = tokens_hook(None, x, None)
        for i in range(steps):
            mask_index = x == mask_id
            logits = self(x, attn, tok_idx).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position i-1 predicts token i
            logits = logits_hook(i, x, logits)
            t, s = timesteps[i], timesteps[i + 1]
            if cfg.alg == "origin":
                self._origin_step(x, logits, mask_index, i, t, s, cfg)
            else:
                self._confidence_step(x, logits, mask_index, i, t, s, cfg)
            x = tokens_hook(i, x, logits)
            if histories is not None:
                histories.append(x.clone())
        if cfg.return_dict_in_generate:
            return DreamModelOutput(sequences=x, history=histories)
        return x

    @staticmethod
    def _origin_step(x, logits, mask_index, i, t, s, cfg) -> None:
        p_transfer = 1 - s / t if i < cfg.steps - 1 else 1
        x0 = torch.full_like(x[mask_index], cfg.mask_token_id)
        transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
        _, x0[transfer] = sample_tokens(logits[mask_index][transfer], cfg.temperature, cfg.top_p, cfg.top_k)
        x[mask_index] = x0

    @staticmethod
    def _confidence_step(x, logits, mask_index, i, t, s, cfg) -> None:
        if cfg.alg not in ("maskgit_plus", "topk_margin", "entropy"):
            raise ValueError(f"unknown alg {cfg.alg!r}: choose origin, maskgit_plus, topk_margin or entropy")
        confidence, x0 = sample_tokens(logits[mask_index], cfg.temperature, cfg.top_p, cfg.top_k,
                                       margin_confidence=cfg.alg == "topk_margin", neg_entropy=cfg.alg == "entropy")
        full_conf = torch.full(x.shape, -torch.inf, device=x.device, dtype=logits.dtype)
        full_conf[mask_index] = confidence
        candidates = torch.full_like(x, cfg.mask_token_id)
        candidates[mask_index] = x0
        last = i == cfg.steps - 1
        for row in range(x.shape[0]):
            n_masked = mask_index[row].sum()
            k = int(n_masked) if last else int(n_masked * (1 - s / t))
            if k <= 0:
                continue
            if cfg.alg_temp is None or cfg.alg_temp == 0:
                _, idx = torch.topk(full_conf[row], k)
            else:
                idx = torch.multinomial(F.softmax(full_conf[row] / cfg.alg_temp, dim=-1), num_samples=k)
            x[row, idx] = candidates[row, idx]
