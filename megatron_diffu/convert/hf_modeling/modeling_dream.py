# coding=utf-8
"""Dream / DiffuCoder masked-diffusion language model for `transformers` (megatron-diffu export).

Our own implementation of the DreamModel interface: the Qwen2.5 decoder (RMSNorm, RoPE, SwiGLU,
grouped-query attention with q/k/v biases) with the causal mask removed, so every position
attends to every non-padding position. Parameter names are Qwen2's (`model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `model.norm`, `lm_head`),
so released Dream/DiffuCoder weights load unchanged, and `diffusion_generate` (generation_utils.py)
takes Dream's arguments.

`forward` returns UNSHIFTED logits like Dream's (logits at i-1 predict token i; the sampler applies
the shift). `attention_mask` may be None or "full" (all attend to all), a [B, S] padding mask
(1 = real token; attention is pairwise a_i AND a_j) or a [B, 1, S, S] bool mask (True = attend) /
additive float mask.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_dream import DreamConfig
from .generation_utils import DreamGenerationMixin

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
try:  # transformers 5: init helpers that skip weights already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None


class DreamRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class DreamRotaryEmbedding(nn.Module):
    """RoPE cos/sin. The inverse frequencies are recomputed per call (head_dim / 2 values) rather than
    kept in a non-persistent buffer: transformers 5 builds models on the meta device and does not
    restore such buffers, which would leave garbage frequencies after `from_pretrained`."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=x.device) / self.dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"DreamMLP supports hidden_act='silu' only, got {config.hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention (no causal mask)."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], cos, sin) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask, cos, sin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DreamRMSNorm):
            _init.ones_(module.weight)


def _prepare_mask(attention_mask, batch: int, seq: int, dtype: torch.dtype):
    """None / "full" -> None; [B, S] padding -> [B, 1, S, S] bool (a_i AND a_j); 4D passes through.

    A padding query would attend to nothing (an all -inf softmax row); we let it see itself so its
    (ignored) output stays finite and cannot poison later layers through 0 * NaN.
    """
    if attention_mask is None or isinstance(attention_mask, str):
        if isinstance(attention_mask, str) and attention_mask != "full":
            raise ValueError(f"attention_mask string must be 'full', got {attention_mask!r}")
        return None
    if attention_mask.dim() == 2:
        a = attention_mask.bool()
        if bool(a.all()):
            return None
        eye = torch.eye(seq, dtype=torch.bool, device=a.device)
        return ((a[:, None, :, None] & a[:, None, None, :]) | eye)
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            eye = torch.eye(attention_mask.shape[-1], dtype=torch.bool, device=attention_mask.device)
            return attention_mask | eye if attention_mask.shape[-1] == attention_mask.shape[-2] else attention_mask
        return attention_mask.to(dtype)
    raise ValueError(f"attention_mask must be None, 'full', [B, S] or [B, 1, S, S]; got shape {tuple(attention_mask.shape)}")


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.padding_idx = None
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                output_hidden_states: bool = False, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if position_ids is None:
            if attention_mask is not None and not isinstance(attention_mask, str) and attention_mask.dim() == 2:
                # skip left padding: the first real token gets position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        mask = _prepare_mask(attention_mask, b, s, x.dtype)
        cos, sin = self.rotary_emb(x, position_ids)
        hidden = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask, cos, sin)
            if output_hidden_states:
                hidden += (x,)
        x = self.norm(x)
        return x, hidden


class DreamModel(DreamGenerationMixin, DreamPreTrainedModel):
    """Masked-diffusion LM with Dream's interface: `model(input_ids).logits` and `diffusion_generate`."""

    if _TRANSFORMERS_V5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers loads generation_config.json only for GenerationMixin models (this one is not: it
        has `diffusion_generate`, not `generate`), so load it here (as Dream does): `diffusion_generate`
        without sampling arguments then uses the file's settings."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if pretrained_model_name_or_path is not None:
            from transformers import GenerationConfig

            hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "local_files_only", "token",
                                          "revision", "subfolder") if k in kwargs}
            try:
                model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            except (OSError, ValueError):
                pass  # no generation_config.json: DreamGenerationConfig's defaults and config.json's ids
        return model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states: bool = False, return_dict: bool = True,
                num_logits_to_keep: int = 0, **kwargs) -> Union[Tuple, MaskedLMOutput]:
        x, hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        logits = self.lm_head(x[:, -num_logits_to_keep:, :] if num_logits_to_keep else x)
        loss = None
        if labels is not None:
            # Dream's convention: shifted logits, -100 = ignore (plain CE, no diffusion weights)
            shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            loss = F.cross_entropy(shifted.float().reshape(-1, shifted.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if not return_dict:
            return tuple(v for v in (loss, logits, hidden) if v is not None)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden)
