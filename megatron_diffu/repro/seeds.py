"""SFT over seeds (`--set sft_seeds=1235,1236`): the `sft` stage repeated with other seeds from the same
pretraining checkpoint (same data and recipe; another data order and other masks), each scored greedily
on the held-out problems, and the spread in the report. One SFT run of this recipe is one draw of a
bimodal outcome (docs/MINI_REPRO.md: five seeds scored 0.145-0.48), which one run cannot show."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from megatron_diffu.repro.evaluate import trailing_mean

SEED_STAGE_PREFIX = "sft_seed"
LOSS_TAIL_STEPS = 500


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --set sft_seeds={text!r}: give comma-separated integers") from None


def base_sft_seed(run: Any) -> int:
    """The seed the `sft` stage ran with: its config's model.seed unless train_flags sets --seed."""
    from megatron_diffu.stages.diffusion.config import SFTRunConfig

    cfg = SFTRunConfig.from_args(["--config", run.sft_config, *run.s.train_flags.split()])
    return int(cfg.model.seed)


def seed_stage(run: Any, seed: int) -> dict:
    """SFT from the pretraining checkpoint with `--seed seed` (after train_flags, so it wins), scored greedily."""
    from megatron_diffu.repro.eval_stages import greedy_heldout

    arm = f"{SEED_STAGE_PREFIX}{seed}"
    res = run._sft(arm, run.ckpt("pretrain"), run.s.sft_iters, last=("--seed", str(seed)))
    return {**res, "arm": arm, "seed": seed, "greedy": greedy_heldout(run, arm), "loss_tail": loss_tail(res["log"])}


def _losses(path: str) -> list[tuple[int, float]]:
    """(iteration, loss) of a training log's jsonl (one row per step); [] if there is none yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if "loss" in r and "iteration" in r]


def loss_tail(log_jsonl: str) -> dict:
    """Mean training loss over the last LOSS_TAIL_STEPS iterations (at most half the run): where an SFT
    run ended up (the runs that learn to copy constants end near 0.005-0.01, the others 0.02-0.04)."""
    pts = _losses(log_jsonl)
    if not pts:
        return {"loss": None, "from_iteration": None}
    last = pts[-1][0]
    start = last - min(LOSS_TAIL_STEPS, last // 2)
    tail = [y for x, y in pts if x > start]
    return {"loss": sum(tail) / len(tail), "from_iteration": start + 1, "to_iteration": last}


def _row(seed: int, arm: str, greedy: dict, tail: dict) -> dict:
    sp = greedy.get("splits") or {}
    return {"seed": seed, "arm": arm, "pass@1": greedy.get("pass@1"), "ci95": greedy.get("ci95"),
            "n": greedy.get("n"), "new_constants": sp.get("heldout_constants", {}).get("pass@1"),
            "new_templates": sp.get("heldout_templates", {}).get("pass@1"), "loss_tail": tail.get("loss"),
            "loss_tail_from": tail.get("from_iteration")}


def seed_rows(run: Any) -> list[dict]:
    """The `sft` stage and every `sft_seed<N>` stage: one row per SFT seed (empty without sft_seeds)."""
    if not run.sft_seeds:
        return []
    rows = []
    ev = run.result("eval_sft")
    if ev:
        rows.append(_row(base_sft_seed(run), "sft", ev["greedy"], loss_tail(run.path("logs", "sft_train.log.jsonl"))))
    for n in run.sft_seeds:
        r = run.result(f"{SEED_STAGE_PREFIX}{n}")
        if r:
            rows.append(_row(n, r["arm"], r["greedy"], r["loss_tail"]))
    return rows


def spread(rows: list[dict]) -> dict:
    """Mean, sample standard deviation, min, median and max over seeds of pass@1 and new-constants pass@1."""
    out: dict = {"n_seeds": len(rows)}
    for key in ("pass@1", "new_constants"):
        v = [r[key] for r in rows if r[key] is not None]
        if v:
            out[key] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "min": min(v), "median": statistics.median(v), "max": max(v)}
    return out


def draw_seed_losses(ax, run: Any, rows: list[dict], window: int = 50) -> None:
    """SFT loss per seed, a running mean of `window` steps, log scale (the copying runs fall below the rest)."""
    for r in rows:
        pts = _losses(run.path("logs", f"{r['arm']}_train.log.jsonl"))
        ys = [y for _, y in pts]
        ax.plot([x for x, _ in pts], trailing_mean(ys, window), label=f"seed {r['seed']}: pass@1 {r['pass@1']:.3f}")
    ax.set_yscale("log"), ax.set_xlabel("SFT iteration"), ax.set_ylabel(f"SFT loss (mean of {window} steps)")
    ax.set_title("SFT loss by seed (same data, pretraining and recipe)")
    ax.legend(fontsize=7)


def seed_markdown(seeds: Any, f, ci) -> list[str]:
    """The report.md section (f: number format, ci: interval format)."""
    if not seeds:
        return []
    md = ["", "## SFT over seeds (greedy, held-out problems)", "",
          "| seed | SFT run | pass@1 | 95% CI | new constants | new templates | SFT loss, last steps |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['arm']} | {f(r['pass@1'])} | {ci(r['ci95'])} | {f(r['new_constants'])} | "
           f"{f(r['new_templates'])} | {f(r['loss_tail'])} (from {r['loss_tail_from']}) |" for r in seeds["rows"]]
    sm = seeds["summary"]
    for key in ("pass@1", "new_constants"):
        if key in sm:
            v = sm[key]
            md.append(f"\n{key} over {sm['n_seeds']} seeds: mean {v['mean']:.3f}, sd {v['sd']:.3f}, "
                      f"min {v['min']:.3f}, median {v['median']:.3f}, max {v['max']:.3f}.")
    md.append("\nThe arms below all start from the `sft` row's checkpoint.")
    return md
