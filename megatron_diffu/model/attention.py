"""Attention masks and the attention call, shaped so that masked attention stays on fused kernels.

Mask forms (`build_attention_mask` -> `AttentionMask`; True = may attend):
- key padding, ``allowed`` [B, 1, 1, Sk]: a [B, Sk] padding mask a. A query row of a real token
  (a_i = True) sees exactly the keys of the pairwise rule a_i AND a_j; a padded query row sees the
  real keys (the pairwise rule gave it only itself). Its output is meaningless either way and
  nothing reads it: real rows never see padded keys (so padded K/V, also in the KV cache, never
  reach a real row), and the losses and the sampler read logits at real tokens only. A row of `a`
  with no real token at all leaves its queries without a key: that batch falls back to the
  pairwise form below (the old rule, exactly).
- pairwise, ``allowed`` [B or 1, 1, Sq, Sk]: a 4-D bool mask (attention annealing, packed SFT) as
  given, plus the own-key rule: a query row with no visible key gets its own key (no NaN).

Kernels (`attention`, `te_attention`): SDPA's flash kernel takes no mask; the memory-efficient and
cuDNN kernels take one (a [B, 1, 1, Sk] mask is broadcast, not materialised per query), but the
efficient kernel of the torch versions read (sdp_utils.cpp up to 2.11; GQA support there was still
being added upstream in 2026) takes no GQA (unequal query / KV heads), so ``enable_gqa`` plus a
mask fell back to the math kernel (fp32 [B, h, Sq, Sk] scores). `attention` asks SDPA's dispatcher
(`sdpa_backend`) and, when GQA would put the call on the math kernel, repeats the K/V heads first
(the same repeat_interleave the math kernel does internally, so the result is the same
attention). Transformer Engine: key padding with Sq = Sk goes to its "padding" mask type (fused /
flash); the padded tokens are first moved behind the real ones (attention is invariant to a
permutation of the tokens once RoPE is applied, and TE's fused kernel takes padding as sequence
lengths, i.e. real tokens first); everything else is "arbitrary" (TE's unfused kernel).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


class AttentionMask:
    """A normalised attention mask: `allowed` (bool, True = may attend) and its form."""

    def __init__(self, allowed: torch.Tensor, key_padding: bool, right_padded: bool = False):
        self.allowed = allowed          # [B, 1, 1, Sk] (key padding) or [B or 1, 1, Sq, Sk]
        self.key_padding = key_padding  # every query row of a sample sees the same keys
        self.right_padded = right_padded  # key padding, Sq = Sk, real tokens first in every row
        self._te: Optional[tuple] = None

    def __repr__(self) -> str:
        form = "key padding" if self.key_padding else "pairwise"
        return f"AttentionMask({form}, allowed={tuple(self.allowed.shape)}, right_padded={self.right_padded})"

    def te_padding(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """(order, dest, pad) for TE's "padding" type (key padding, Sq = Sk): ``order`` [S, B] puts
        each row's real tokens first (packed[i] = x[order[i]]), ``dest`` [S, B] is its inverse
        (x[j] = packed[dest[j]]), both None when the rows are right-padded already; ``pad``
        [B, 1, 1, S] is TE's mask of the packed rows (True = padding). Computed once per mask."""
        if self._te is None:
            a = self.allowed[:, 0, 0, :]
            s = a.shape[-1]
            n = a.sum(-1, keepdim=True)
            pad = (torch.arange(s, device=a.device) >= n)[:, None, None, :]
            order = dest = None
            if not self.right_padded:
                dest = torch.where(a, a.long().cumsum(-1) - 1, n + (~a).long().cumsum(-1) - 1)
                order = torch.empty_like(dest).scatter_(1, dest, torch.arange(s, device=a.device).expand_as(dest))
                order, dest = order.t().contiguous(), dest.t().contiguous()
            self._te = (order, dest, pad)
        return self._te


def _own_key_for_empty_rows(mask: torch.Tensor, q_len: int, prefix_len: int) -> torch.Tensor:
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        eye = torch.zeros(q_len, mask.shape[-1], dtype=torch.bool, device=mask.device)
        eye[torch.arange(q_len), prefix_len + torch.arange(q_len)] = True
        mask = mask | (empty & eye)
    return mask


def _from_padding(a: torch.Tensor, q_len: int, prefix_len: int) -> Optional[AttentionMask]:
    sk = a.shape[1]
    n = a.sum(-1)
    prefix_form = torch.arange(sk, device=a.device) < n[:, None]
    # one device sync for the three decisions
    all_real, any_empty, right = torch.stack([a.all(), (n == 0).any(), (a == prefix_form).all()]).tolist()
    if all_real:
        return None  # SDPA's unmasked (fastest) path
    if any_empty:  # a sample without a real token: its queries need the own-key rule
        pair = a[:, None, -q_len:, None] & a[:, None, None, :]
        return AttentionMask(_own_key_for_empty_rows(pair, q_len, prefix_len), key_padding=False)
    return AttentionMask(a[:, None, None, :], key_padding=True, right_padded=bool(right) and prefix_len == 0)


def build_attention_mask(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                         prefix_len: int = 0) -> Optional[AttentionMask]:
    """Normalise the caller's mask (None, [B, Sk] padding, or bool [B or 1, 1, Sq, Sk]) to an
    `AttentionMask` or None (all attend to all); see the module docstring for the forms."""
    if attention_mask is None:
        return None
    sk = prefix_len + q_len
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, sk):
            raise ValueError(f"attention_mask [B, S] has shape {tuple(attention_mask.shape)}, expected "
                             f"({batch}, {sk}) (= prefix {prefix_len} + {q_len} tokens)")
        return _from_padding(attention_mask.bool(), q_len, prefix_len)
    if attention_mask.dim() == 4:
        if attention_mask.shape[1] != 1 or tuple(attention_mask.shape[2:]) != (q_len, sk) \
                or attention_mask.shape[0] not in (1, batch):
            raise ValueError(f"4-D attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"[{batch} or 1, 1, {q_len}, {sk}] (bool, True = may attend)")
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"4-D attention_mask must be bool (True = may attend), got {attention_mask.dtype}")
        # a batch-1 mask stays batch 1 (SDPA broadcasts it; expanding would materialise B copies)
        return AttentionMask(_own_key_for_empty_rows(attention_mask, q_len, prefix_len), key_padding=False)
    raise ValueError(f"attention_mask must be [B, S] (padding) or [B, 1, Sq, Sk] (bool), "
                     f"got {attention_mask.dim()}-D")


# ---------------------------------------------------------------------- SDPA
def _backend_names() -> dict[int, str]:
    from torch.nn.attention import SDPBackend
    return {int(getattr(SDPBackend, n)): n.lower() for n in dir(SDPBackend) if n.isupper()}


_BACKENDS = _backend_names()


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, enable_gqa: bool = False) -> str:
    """The kernel `F.scaled_dot_product_attention` picks for these inputs under the current
    backend settings (`torch.nn.attention.sdpa_kernel`): "flash_attention" (on CPU: the CPU flash
    kernel), "efficient_attention", "cudnn_attention", "math", "overrideable", or "none" when no
    allowed kernel takes the call (SDPA itself would raise)."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False, scale=None, enable_gqa=enable_gqa)
    except RuntimeError:
        return "none"
    return _BACKENDS.get(int(choice), str(int(choice)))


def _kv_for_fused(q, k, v, attn_mask, dropout_p) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k, v, enable_gqa) for the SDPA call: K/V heads repeated when GQA would put it on math."""
    if k.shape[1] == q.shape[1]:
        return k, v, False
    if sdpa_backend(q, k, v, attn_mask, dropout_p, enable_gqa=True) not in ("math", "none"):
        return k, v, True
    rep = q.shape[1] // k.shape[1]  # head i of q reads KV head i // rep, as enable_gqa does
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False


def attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[AttentionMask] = None,
                   dropout_p: float = 0.0) -> dict:
    """What `attention(q, k, v, mask)` does: {"backend": SDPA kernel, "expanded_kv": K/V heads
    repeated first, "mask_shape": shape of the mask SDPA gets (None = unmasked)}."""
    attn_mask = None if mask is None else mask.allowed
    k2, v2, gqa = _kv_for_fused(q, k, v, attn_mask, dropout_p)
    return {"backend": sdpa_backend(q, k2, v2, attn_mask, dropout_p, enable_gqa=gqa),
            "expanded_kv": k2.shape[1] != k.shape[1],
            "mask_shape": None if attn_mask is None else tuple(attn_mask.shape)}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[AttentionMask] = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q [B, h, Sq, D], k/v [B, g, Sk, D] (h % g == 0)."""
    attn_mask = None if mask is None else mask.allowed
    k, v, gqa = _kv_for_fused(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)


# ---------------------------------------------------------------------- Transformer Engine
def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [S, B, ...] -> t[index[i, b], b, ...] (index [S, B])."""
    return t.gather(0, index.view(*index.shape, *([1] * (t.dim() - 2))).expand_as(t))


def te_attention(core: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[AttentionMask], **kwargs) -> torch.Tensor:
    """TE `DotProductAttention` (q/k/v [S, B, heads, D], "sbhd") with our mask: "no_mask"; key
    padding with Sq = Sk -> "padding" with TE's [B, 1, 1, S] mask (True = masked out) on rows
    whose real tokens were moved first, output rows of padding set to 0 (TE leaves them unwritten
    in sbhd) and moved back; any other mask -> "arbitrary" (~allowed, broadcastable)."""
    if mask is None:
        return core(q, k, v, attn_mask_type="no_mask", **kwargs)
    if not mask.key_padding or q.shape[0] != k.shape[0]:
        return core(q, k, v, attn_mask_type="arbitrary", attention_mask=~mask.allowed, **kwargs)
    order, dest, pad = mask.te_padding()
    if order is not None:
        q, k, v = (_gather_seq(t, order) for t in (q, k, v))
    out = core(q, k, v, attn_mask_type="padding", attention_mask=pad, **kwargs)
    out = out.masked_fill(pad[:, 0, 0, :].t().reshape(pad.shape[-1], pad.shape[0], *([1] * (out.dim() - 2))), 0.0)
    return out if dest is None else _gather_seq(out, dest)
