# coding=utf-8
"""Dream / DiffuCoder model configuration (written for megatron-diffu's Hugging Face export).

Same fields as the released Dream config (Qwen2 names + `mask_token_id`, `model_type: Dream`).
`rope_theta` is kept as a top-level attribute and written to config.json: Dream's original code
reads `config.rope_theta`, while transformers 5 moves it into `rope_parameters`; a config that
only has `rope_parameters` would make the original code fall back to theta 10000 silently.
Works with transformers 4.4x and 5.x (`trust_remote_code=True`).
"""
from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=False,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        attention_dropout=0.0,
        mask_token_id=151666,
        pad_token_id=151643,
        bos_token_id=151643,
        eos_token_id=151643,
        **kwargs,
    ):
        # transformers 5 configs carry the theta inside `rope_parameters`; accept either spelling
        rope_parameters = kwargs.pop("rope_parameters", None)
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters and "rope_theta" not in kwargs:
            rope_theta = rope_parameters["rope_theta"]
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = float(rope_theta)
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r} is not supported by this Dream export (plain RoPE only)")
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # some transformers versions rewrite rope fields in the base __init__: restore ours
        self.rope_theta = float(rope_theta)

    def to_dict(self):
        out = super().to_dict()
        out["rope_theta"] = self.rope_theta  # always top level (see module docstring)
        out.pop("rope_parameters", None)
        out["rope_scaling"] = None
        return out
