"""Decoding-order analysis: local and global AR-ness (DiffuCoder, arXiv 2506.20639, Appx. A.2).

The paper decodes one token per step and writes the order as p_1..p_T (the position unmasked at
step t) with M_{t-1} the positions still masked before step t:

* **local AR-ness@k** = (1/T) sum_t 1[p_{t-i} = p_t - i for i = 1..k]: the new token extends, to
  the right, a run of the k tokens decoded just before it (the Figure 3 caption's "strictly
  increasing consecutive sequence"; read as ordered equality, which also satisfies the
  appendix's set form). Non-increasing in k.
* **global AR-ness@k** = (1/T) sum_t 1[p_t is among the k smallest positions of M_{t-1}]
  ("earliest mask selection"). Non-decreasing in k.

Our choices where the paper is silent (pure left-to-right decoding scores 1.0 on both, as the
paper states for AR models):

* The prompt counts as decoded before step 1, in order: for t - i <= 0 we use
  p_{t-i} = t - i - 1 in 0-based new-token positions (the last prompt token sits at -1).
* Several tokens revealed in one sampler step are linearised left to right, so a step revealing
  a contiguous span counts as consecutive next-token predictions; with one token per step
  (the paper's setting, e.g. ``threshold > 1`` or steps = N with a top-1 schedule) this is exactly
  the paper's definition.
* Positions never revealed (reveal step -1) are left out of the order and of the masked sets.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from megatron_diffu.common.atomic import atomic_path


def decoding_order(reveal_step: Sequence[int] | torch.Tensor) -> list[int]:
    """Positions sorted by reveal step (ties: left to right); -1 (never revealed) dropped."""
    steps = reveal_step.tolist() if isinstance(reveal_step, torch.Tensor) else list(reveal_step)
    return [p for p, s in sorted(((p, s) for p, s in enumerate(steps) if s >= 0), key=lambda ps: (ps[1], ps[0]))]


def local_arness(order: Sequence[int], k: int = 1) -> float:
    """Local AR-ness@k of a decoding order (positions of the new tokens, 0-based)."""
    if k < 1:
        raise ValueError(f"local AR-ness needs k >= 1, got {k}")
    if not order:
        return float("nan")

    def p(t: int) -> int:  # 1-based step index; t <= 0 = the prompt, decoded in order
        return order[t - 1] if t >= 1 else t - 1

    hits = sum(all(p(t - i) == p(t) - i for i in range(1, k + 1)) for t in range(1, len(order) + 1))
    return hits / len(order)


def global_arness(order: Sequence[int], k: int = 1) -> float:
    """Global AR-ness@k: fraction of steps that unmask one of the k earliest still-masked positions."""
    if k < 1:
        raise ValueError(f"global AR-ness needs k >= 1, got {k}")
    if not order:
        return float("nan")
    masked = sorted(order)
    hits = 0
    for pos in order:
        hits += masked.index(pos) < k
        masked.remove(pos)
    return hits / len(order)


def arness(reveal_step: torch.Tensor, ks: Sequence[int] = (1, 2, 3, 4)) -> dict[str, float]:
    """Mean local/global AR-ness@k over the rows of ``reveal_step`` [B, N] (or one row [N])."""
    rows = reveal_step[None] if reveal_step.dim() == 1 else reveal_step
    orders = [decoding_order(r) for r in rows]
    out: dict[str, float] = {}
    for k in ks:
        out[f"local@{k}"] = sum(local_arness(o, k) for o in orders) / len(orders)
        out[f"global@{k}"] = sum(global_arness(o, k) for o in orders) / len(orders)
    return out


# --------------------------------------------------------------------------- drawing
_RAMP = " .:-=+*#%@"  # early (light) -> late (dense) for terminals without colour


def order_heatmap_text(tokens: Sequence[str], reveal_step: Sequence[int], color: bool = True,
                       width: int = 100) -> str:
    """The completion with each token shaded by when it was revealed (blue early -> red late).

    ``color=False`` gives a plain rendering: the text, then under each line a ramp character per
    character of the token (`` .:-=+*#%@``, early to late) so the order reads without ANSI codes.
    """
    steps = [int(s) for s in reveal_step]
    hi = max([s for s in steps if s >= 0], default=0) or 1
    legend = f"decoding order: step 0 .. {hi} ({'blue = early, red = late' if color else 'ramp ' + repr(_RAMP)})"
    if color:
        parts = []
        for tok, s in zip(tokens, steps):
            frac = max(s, 0) / hi
            r, b = int(255 * frac), int(255 * (1 - frac))
            shown = tok.replace("\n", "\u21b5\n")
            parts.append(f"\x1b[48;2;{r};60;{b}m\x1b[97m{shown}\x1b[0m")
        return legend + "\n" + "".join(parts)
    text_lines, ramp_lines, cur_t, cur_r = [], [], "", ""
    for tok, s in zip(tokens, steps):
        shown = tok.replace("\n", "\u21b5")
        ch = "?" if s < 0 else _RAMP[round((len(_RAMP) - 1) * s / hi)]
        if len(cur_t) + len(shown) > width and cur_t:
            text_lines.append(cur_t), ramp_lines.append(cur_r)
            cur_t, cur_r = "", ""
        cur_t += shown
        cur_r += ch * len(shown)
    text_lines.append(cur_t), ramp_lines.append(cur_r)
    body = "\n".join(f"{t}\n{r}" for t, r in zip(text_lines, ramp_lines))
    return legend + "\n" + body


def order_heatmap_png(path: str, reveal_step: Sequence[int], tokens: Optional[Sequence[str]] = None,
                      columns: int = 32, title: str = "decoding order") -> str:
    """PNG: left, the new tokens in a grid coloured by reveal step (token text when it fits);
    right, reveal step against position (a pure left-to-right decode is the diagonal).
    Written atomically (temp file + rename). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.asarray([int(s) for s in reveal_step], dtype=float)
    n = len(steps)
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    grid = np.full((rows, columns), np.nan)
    grid.flat[:n] = np.where(steps >= 0, steps, np.nan)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, max(3.0, 0.35 * rows + 1.5)),
                                  gridspec_kw={"width_ratios": [3, 1.3]})
    im = ax.imshow(grid, cmap="coolwarm", aspect="auto", interpolation="nearest")
    if tokens is not None and n <= 1024:
        for i, tok in enumerate(tokens[:n]):
            label = tok.replace("\n", "\\n")[:6]
            ax.text(i % columns, i // columns, label, ha="center", va="center", fontsize=5)
    ax.set_xticks([]), ax.set_yticks(range(rows)), ax.set_yticklabels([str(r * columns) for r in range(rows)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="reveal step")
    ok = steps >= 0
    ax2.scatter(np.arange(n)[ok], steps[ok], s=6, c=steps[ok], cmap="coolwarm")
    ax2.set_xlabel("position"), ax2.set_ylabel("reveal step"), ax2.set_title("step vs position")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # the temporary name has no .png suffix
    finally:
        plt.close(fig)
    return path
