"""Name/shape maps between our canonical parameters and Hugging Face Qwen2 / Dream checkpoints.

Canonical layout (docs/DESIGN.md, "Model"), G = KV heads, Q = query heads, D = head dim:

    HF (Qwen2ForCausalLM / DreamModel)                      native (canonical)
    model.embed_tokens.weight              [V, H]           embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight  [H]              decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight/.bias      decoder.layers.i.self_attention.linear_qkv.weight
        q [Q*D, H], k/v [G*D, H]                                [G, (Q/G + 2) * D, H]  (per group: its
                                                                 Q/G query heads, then k, then v), bias likewise
    model.layers.i.self_attn.o_proj.weight [H, Q*D]         ...self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight          ...pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight [F, H]         ...mlp.linear_fc1.weight [2, F, H] (0 gate, 1 up)
    model.layers.i.mlp.down_proj.weight    [H, F]           ...mlp.linear_fc2.weight
    model.norm.weight                      [H]              decoder.final_layernorm.weight
    lm_head.weight                         [V, H]           output_layer.weight (absent when tied)

Every map is a reshape/cat/split: no arithmetic, so round trips are bit-identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_diffu.model.config import TransformerConfig

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "DreamModel")
SUPPORTED_MODEL_TYPES = ("qwen2", "Dream", "dream")
DIFFUSION_MODEL_TYPES = ("Dream", "dream")
EMBED, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
HF_EMBED, HF_NORM, HF_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------- configs
def _rope_theta(hf: dict, where: str) -> float:
    """Top-level `rope_theta` (transformers 4, Dream) or `rope_parameters.rope_theta` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(f"{where}: rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; "
                         f"only plain RoPE (Qwen2.5 / Dream) converts exactly")
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise ValueError(f"{where}: no rope_theta (top level or in rope_parameters); add it to config.json")


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def check_architecture(hf: dict, where: str) -> str:
    """Return the model type ('qwen2' or 'Dream'); raise naming the field for anything else."""
    arch = hf.get("architectures") or []
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES or (arch and not set(arch) & set(SUPPORTED_ARCHITECTURES)):
        raise ValueError(f"{where}: unsupported architecture (model_type={mtype!r}, architectures={arch}); "
                         f"supported: model_type in {list(SUPPORTED_MODEL_TYPES)} with architectures "
                         f"{list(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5(-Coder) causal LMs, Dream, DiffuCoder)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    return "Dream" if mtype in DIFFUSION_MODEL_TYPES else "qwen2"


def transformer_config_from_hf(hf: dict, where: str = "config.json") -> TransformerConfig:
    """TransformerConfig fields derived from a Qwen2 / Dream config.json (validated for TP=PP=1)."""
    check_architecture(hf, where)
    try:
        h, q = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        g = int(hf.get("num_key_value_heads") or q)
        head_dim = hf.get("head_dim")
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        cfg = TransformerConfig(
            num_layers=int(hf["num_hidden_layers"]), hidden_size=h, ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=q, num_query_groups=g,
            kv_channels=int(head_dim) if head_dim and int(head_dim) != h // q else None,
            vocab_size=int(hf["vocab_size"]), max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            rotary_base=_rope_theta(hf, where), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            add_qkv_bias=True, untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)), bf16=dtype == "bfloat16",
            init_method_std=float(hf.get("initializer_range", 0.02)), logit_shift=True,
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from e
    return cfg.validate()


@dataclass
class SpecialTokens:
    """Token ids written into the exported config.json / generation_config.json."""
    mask_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None


def hf_config_from_transformer(cfg: TransformerConfig, tokens: SpecialTokens, dtype: torch.dtype) -> dict:
    """The Dream/DiffuCoder config.json for `cfg` (top-level rope_theta: see configuration_dream.py)."""
    return {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream",
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": tokens.bos_token_id,
        "eos_token_id": tokens.eos_token_id,
        "pad_token_id": tokens.pad_token_id,
        "mask_token_id": tokens.mask_token_id,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_method_std,
        "intermediate_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_scaling": None,
        "rope_theta": cfg.rotary_base,
        "sliding_window": None,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "torch_dtype": {v: k for k, v in _DTYPE_NAMES.items()}[dtype],
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }


# ---------------------------------------------------------------------------------- tensor maps
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: TransformerConfig) -> torch.Tensor:
    """q [Q*D(, H)], k/v [G*D(, H)] -> [G, (Q/G + 2) * D(, H)] (weights or biases)."""
    g, per, d = cfg.num_kv_heads, cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim
    tail = tuple(q.shape[1:])
    return torch.cat([q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)


def split_qkv(qkv: torch.Tensor, cfg: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, per, d = cfg.num_kv_heads, cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim
    tail = tuple(qkv.shape[2:])
    q, k, v = torch.split(qkv, [per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *tail).contiguous(), k.reshape(g * d, *tail).contiguous(),
            v.reshape(g * d, *tail).contiguous())


def _layer_pairs(i: int, bias: bool) -> list[tuple[str, list[str]]]:
    """(native name, [HF names it is built from]) for layer i, in HF file order."""
    n, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    pairs = [
        (n + "input_layernorm.weight", [h + "input_layernorm.weight"]),
        (n + "self_attention.linear_qkv.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"]),
    ]
    if bias:
        pairs.append((n + "self_attention.linear_qkv.bias", [h + f"self_attn.{p}_proj.bias" for p in "qkv"]))
    pairs += [
        (n + "self_attention.linear_proj.weight", [h + "self_attn.o_proj.weight"]),
        (n + "pre_mlp_layernorm.weight", [h + "post_attention_layernorm.weight"]),
        (n + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]),
        (n + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"]),
    ]
    return pairs


def name_pairs(cfg: TransformerConfig) -> list[tuple[str, list[str]]]:
    """Every (native name, [HF names]) of the model, embedding first, head last."""
    pairs = [(EMBED, [HF_EMBED])]
    for i in range(cfg.num_layers):
        pairs += _layer_pairs(i, cfg.add_qkv_bias)
    pairs.append((FINAL_NORM, [HF_NORM]))
    if cfg.untie_embeddings_and_output_weights:
        pairs.append((OUTPUT, [HF_HEAD]))
    return pairs


def hf_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes of a model with this config."""
    h, f, d, q, g, v = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim, cfg.num_attention_heads,
                        cfg.num_kv_heads, cfg.vocab_size)
    out: dict[str, tuple[int, ...]] = {HF_EMBED: (v, h), HF_NORM: (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q * d, h), p + "self_attn.k_proj.weight": (g * d, h),
                    p + "self_attn.v_proj.weight": (g * d, h), p + "self_attn.o_proj.weight": (h, q * d),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
        if cfg.add_qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q * d,), p + "self_attn.k_proj.bias": (g * d,),
                        p + "self_attn.v_proj.bias": (g * d,)})
    if cfg.untie_embeddings_and_output_weights:
        out[HF_HEAD] = (v, h)
    return out


def to_native(native_name: str, hf_tensors: list[torch.Tensor], cfg: TransformerConfig) -> torch.Tensor:
    """Build one canonical tensor from the HF tensors `name_pairs` lists for it."""
    if native_name.endswith("linear_qkv.weight") or native_name.endswith("linear_qkv.bias"):
        return fuse_qkv(*hf_tensors, cfg)
    if native_name.endswith("linear_fc1.weight"):
        return torch.stack(hf_tensors, dim=0)
    (t,) = hf_tensors
    return t


def to_hf(native_name: str, tensor: torch.Tensor, cfg: TransformerConfig) -> list[torch.Tensor]:
    """Split one canonical tensor into the HF tensors `name_pairs` lists for it."""
    if native_name.endswith("linear_qkv.weight") or native_name.endswith("linear_qkv.bias"):
        return list(split_qkv(tensor, cfg))
    if native_name.endswith("linear_fc1.weight"):
        return [tensor[0].contiguous(), tensor[1].contiguous()]
    return [tensor]


def hf_state_dict_to_native(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """In-memory version (small models, tests, --verify)."""
    return {n: to_native(n, [sd[h] for h in hs], cfg) for n, hs in name_pairs(cfg)}


def native_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, hs in name_pairs(cfg):
        out.update(zip(hs, to_hf(n, sd[n], cfg)))
    return out


def check_hf_tensors(available: dict[str, tuple[int, ...]], cfg: TransformerConfig, where: str) -> None:
    """Every expected tensor exists with the expected shape (vocab mismatches named as such)."""
    expected = hf_shapes(cfg)
    missing = [n for n in expected if n not in available]
    if missing:
        raise ValueError(f"{where}: checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. "
                         f"{missing[:4]} (config.json num_hidden_layers/tie_word_embeddings may not match the weights)")
    for n, shape in expected.items():
        if tuple(available[n]) != tuple(shape):
            hint = (f" (config.json vocab_size={cfg.vocab_size} but the weights have {available[n][0]} rows)"
                    if n in (HF_EMBED, HF_HEAD) and tuple(available[n][1:]) == tuple(shape[1:]) else
                    " (config.json disagrees with the weights)")
            raise ValueError(f"{where}: tensor {n} has shape {tuple(available[n])}, expected {tuple(shape)}{hint}")
    known = set(expected) | {HF_HEAD}
    unknown = [n for n in available if n not in known and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise ValueError(f"{where}: unexpected tensor(s) {unknown[:4]} (not a Qwen2/Dream checkpoint?)")


def iter_native_groups(cfg: TransformerConfig) -> Iterator[list[tuple[str, list[str]]]]:
    """Name pairs grouped so that one group is loaded at a time (embedding, each layer, head)."""
    pairs = name_pairs(cfg)
    yield [pairs[0]]
    for i in range(cfg.num_layers):
        prefix = f"decoder.layers.{i}."
        yield [p for p in pairs if p[0].startswith(prefix)]
    yield [p for p in pairs[1:] if not p[0].startswith("decoder.layers.")]


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]

