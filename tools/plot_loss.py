#!/usr/bin/env python3
"""Plot the training loss (and validation ELBO) from a run's `<log_file>.jsonl` into a PNG.

    python tools/plot_loss.py runs/quickstart/train.log.jsonl --out runs/quickstart/loss.png

The JSONL is written by the trainer when `--log-file` is set (one object per iteration, plus
`{"iteration": N, "validation": {...}}` records). Written atomically (`common.atomic.atomic_path`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.common.atomic import atomic_path  # noqa: E402


def read_metrics(path: str) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    train, valid = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not JSON ({exc}); is this the trainer's .jsonl metrics file?")
            it = int(rec.get("iteration", 0))
            if "validation" in rec:
                valid[it] = rec["validation"]
            elif not rec.get("skipped"):
                train[it] = rec  # a resumed run re-logs iterations: keep the last record
    return sorted(train.items()), sorted(valid.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="the trainer's <log_file>.jsonl")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window (iterations)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.metrics):
        print(f"error: {args.metrics}: no such file (run training with --log-file)", file=sys.stderr)
        return 2
    train, valid = read_metrics(args.metrics)
    if not train:
        print(f"error: {args.metrics}: no training iterations recorded", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [i for i, _ in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "diffusion loss (1/t weighted)"), ("masked_ce", "CE of masked tokens")):
        ys = [m.get(key) for _, m in train]
        if any(y is None for y in ys):
            continue
        k = max(1, args.smooth)
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(its, ys, alpha=0.25)
        ax.plot(its, smooth, label=f"{label} (avg {k})", color=ax.lines[-1].get_color())
    if valid:
        ax.plot([i for i, _ in valid], [v["elbo_loss"] for _, v in valid], "o-", label="validation ELBO bound")
    ax.set_xlabel("iteration")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")  # always PNG, whatever --out ends with (as before)
    print(f"wrote {args.out} ({len(train)} iterations, {len(valid)} validations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
