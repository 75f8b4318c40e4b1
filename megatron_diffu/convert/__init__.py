"""Checkpoint conversion between Hugging Face (Qwen2 / Dream / DiffuCoder) and native DCP checkpoints.

Entry points: `checkpoint.hf_to_native`, `checkpoint.native_to_hf`, `verify.verify`
(CLI: tools/convert_checkpoint.py). Name/shape maps: `hf`. Streaming I/O: `safetensors_io`,
`native_io`. Exported modeling code: `hf_modeling/`.
"""
