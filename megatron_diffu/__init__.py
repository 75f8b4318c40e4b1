"""megatron-diffu: Megatron-style training of masked-diffusion language models of code."""

__version__ = "0.1.0"
