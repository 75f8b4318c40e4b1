"""`--verify`: load both sides of a conversion and compare their logits on a few prompts.

The HF side runs our exported modeling code (`hf_modeling/modeling_dream.py`, bidirectional) on
the HF folder's weights; the native side runs `DiffusionTransformer` on the DCP checkpoint. Both
in fp32, so the difference measures the conversion (a wrong head split or a swapped gate/up shows
up as O(1) differences), not bf16 rounding. The prompts are random token ids (seeded), one row
left-padded to exercise the padding mask. Vocabulary rows that the import re-initialised (the
mask token) are excluded from the comparison: they differ by design.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_diffu.model.transformer import DiffusionTransformer

from . import hf as H
from .checkpoint import load_run_config
from .native_io import NativeCheckpoint
from .safetensors_io import SafetensorsFolder


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    """Our DreamModel with the weights of a Qwen2 or Dream folder (no remote code needed)."""
    from .hf_modeling.configuration_dream import DreamConfig
    from .hf_modeling.modeling_dream import DreamModel

    hf = H.read_hf_config(folder)
    H.check_architecture(hf, str(Path(folder) / "config.json"))
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "auto_map", "model_type", "rope_parameters",
                                                        "transformers_version", "layer_types", "dtype", "torch_dtype")}
    fields["rope_theta"] = H._rope_theta(hf, str(folder))  # noqa: SLF001
    fields["rope_scaling"] = None
    fields.setdefault("mask_token_id", None)
    config = DreamConfig(**fields)
    with torch.device("meta"):
        model = DreamModel(config)
    reader = SafetensorsFolder(folder)
    sd = {n: reader.get(n).to(dtype) for n in reader.tensors if not n.endswith("inv_freq")}
    if config.tie_word_embeddings:
        sd.pop(H.HF_HEAD, None)
        sd[H.HF_HEAD] = sd[H.HF_EMBED]
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load_native_model(path: Path) -> DiffusionTransformer:
    """DiffusionTransformer (fp32, TP=PP=1) with the full tensors of a native checkpoint."""
    ck = NativeCheckpoint(path)
    cfg, _ = load_run_config(ck.dir)
    cfg.bf16 = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        tensors = ck.load([n for n, _ in H.name_pairs(cfg)])
    model = DiffusionTransformer(cfg, init_weights=False)
    model.load_global_state_dict(tensors)
    return model.eval()


def verify_prompts(vocab: int, num_prompts: int = 3, seq_len: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_prompts, seq_len), generator=gen)
    mask = torch.ones(num_prompts, seq_len, dtype=torch.long)
    if num_prompts > 1:
        mask[-1, : seq_len // 4] = 0  # one left-padded row
    return ids, mask


@torch.no_grad()
def compare_logits(hf_dir: Path, native_dir: Path, exclude_ids: Sequence[int] = (), num_prompts: int = 3,
                   seq_len: int = 16, seed: int = 0) -> float:
    """Max |logit difference| between the HF folder and the native checkpoint on random prompts."""
    hf_model, native = load_hf_model(Path(hf_dir)), load_native_model(Path(native_dir))
    v_hf, v_nat = hf_model.config.vocab_size, native.cfg.vocab_size
    keep = torch.ones(min(v_hf, v_nat), dtype=torch.bool)
    keep[[i for i in exclude_ids if i < keep.numel()]] = False
    valid = keep.nonzero().squeeze(-1).tolist()
    ids, mask = verify_prompts(len(valid), num_prompts, seq_len, seed)
    ids = torch.tensor(valid)[ids]
    a = hf_model(ids, attention_mask=mask).logits
    a = torch.cat([a[:, :1], a[:, :-1]], dim=1)  # Dream's shift; the native head applies it itself
    b = native(ids, attention_mask=mask)
    # padding positions are garbage on both sides; the first real token of a padded row is
    # predicted from a padding position's hidden state (the shift), so skip it too
    real = mask.bool()
    padded = ~real.all(dim=1)
    real[padded, mask.argmax(dim=1)[padded]] = False
    diff = (a[..., :keep.numel()][..., keep] - b[..., :keep.numel()][..., keep]).abs()
    return float(diff[real].max())


def excluded_ids_from_report(native_dir: Path) -> list[int]:
    import json
    ck_dir = NativeCheckpoint(native_dir).dir
    p = ck_dir / "conversion_report.json"
    if not p.exists():
        return []
    return list(json.loads(p.read_text()).get("vocab", {}).get("new_ids", []))


def verify(hf_dir: Path, native_dir: Path, tol: float = 1e-4, out: Optional[callable] = print) -> float:
    diff = compare_logits(hf_dir, native_dir, excluded_ids_from_report(native_dir))
    if out is not None:
        out(f"verify: max |logits(HF) - logits(native)| = {diff:.3e} (fp32, tolerance {tol:g})")
    if not diff <= tol:
        raise RuntimeError(f"verify failed: max logit difference {diff:.3e} > {tol:g} between {hf_dir} and {native_dir}")
    return diff
