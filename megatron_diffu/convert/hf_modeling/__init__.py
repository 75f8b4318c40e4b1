"""Modeling files shipped with every Hugging Face export (DreamModel, DreamConfig, diffusion_generate)."""
