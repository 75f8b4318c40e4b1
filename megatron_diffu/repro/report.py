"""report.json, report.md and the PNGs of a mini reproduction run (from OUT/stages/*.json and the logs)."""
from __future__ import annotations

import json
import os
from typing import Any

from megatron_diffu.common.atomic import atomic_path, atomic_write_json, atomic_write_text
from megatron_diffu.repro.evaluate import trailing_mean
from megatron_diffu.repro.seeds import draw_seed_losses, seed_markdown, seed_rows, spread

ARMS = ("sft", "coupled_grpo", "d1_grpo", "sft_continued")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _arm_entry(ev: dict) -> dict:
    g, t2, t1 = ev.get("greedy", {}), ev.get("t0.2", {}), ev.get("t1.0", {})
    return {"pass@1": g.get("pass@1"), "ci95": g.get("ci95"), "n": g.get("n"), "splits": g.get("splits"),
            "pass@1_t0.2": t2.get("pass@1"), "ci95_t0.2": t2.get("ci95"), "splits_t0.2": t2.get("splits"),
            "pass@10_t1.0": t1.get("pass@10"), "ci95_pass@10": t1.get("pass@10_ci95"), "n_pass@10": t1.get("n"),
            "pass@1_t1.0": t1.get("pass@1"), "tokens_per_s_greedy": g.get("tokens_per_s")}


def _paired(a: dict, b: dict) -> dict:
    from megatron_diffu.repro.evaluate import paired_bootstrap_diff

    pa, pb = a.get("greedy", {}).get("per_problem", {}), b.get("greedy", {}).get("per_problem", {})
    keys = sorted(set(pa) & set(pb))
    return {**paired_bootstrap_diff([pa[k] for k in keys], [pb[k] for k in keys]), "n": len(keys)}


def _plot(path: str, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(run: Any) -> dict:
    stages, evals = {}, {}
    for arm in ARMS:
        ev = run.result(f"eval_{arm}")
        if ev:
            evals[arm] = ev
            stages[arm] = _arm_entry(ev)
    dicts = lambda d: {k: v for k, v in (d or {}).items() if isinstance(v, dict)}  # noqa: E731 (drop wall_s)
    arness = dicts(run.result("arness"))
    samplers = dicts(run.result("samplers"))
    meta = run.result("_meta") or {"stage_s": {}}
    comparisons = {}
    if "coupled_grpo" in evals and "sft" in evals:
        comparisons["coupled_grpo - sft"] = _paired(evals["coupled_grpo"], evals["sft"])
    if "coupled_grpo" in evals and "d1_grpo" in evals:
        comparisons["coupled_grpo - d1_grpo"] = _paired(evals["coupled_grpo"], evals["d1_grpo"])
    if "d1_grpo" in evals and "sft" in evals:
        comparisons["d1_grpo - sft"] = _paired(evals["d1_grpo"], evals["sft"])
    if "sft_continued" in evals and "sft" in evals:
        comparisons["sft_continued - sft"] = _paired(evals["sft_continued"], evals["sft"])
    curves = {}
    for arm in ("coupled_grpo", "d1_grpo"):
        rows = [r for r in _read_jsonl(run.path("logs", f"{arm}_train.log.jsonl")) if "reward_mean" in r]
        curves[arm] = [(r["iteration"], r["reward_mean"]) for r in rows]
    sc = [r for r in _read_jsonl(run.path("logs", "sft_continued_train.log.jsonl")) if "loss" in r]
    settings = {}
    if os.path.exists(run.path("settings.json")):
        with open(run.path("settings.json")) as f:
            settings = json.load(f)
    data = run.result("data") or {}
    sel = run.result("select_rl") or {}
    seeds = seed_rows(run)
    report = {"stages": stages, "comparisons": comparisons,
              "arness": {k: {kk: vv for kk, vv in v.items() if kk != "mean_reveal_step"} for k, v in arness.items()},
              "samplers": samplers, "reward_curves": curves, "data": data, "rl_selection": sel,
              "stage_wall_s": meta.get("stage_s", {}), "wall_s": sum(meta.get("stage_s", {}).values()),
              "settings": settings}
    if seeds:
        report["sft_seeds"] = {"rows": seeds, "summary": spread(seeds)}
    atomic_write_json(run.path("report.json"), report)
    _pngs(run, curves, arness)
    if seeds:
        _plot(run.path("sft_loss_by_seed.png"), lambda ax: draw_seed_losses(ax, run, seeds))
    atomic_write_text(run.path("report.md"), _markdown(report, arness, samplers, sc))
    return {"report": run.path("report.json")}


REWARD_WINDOW = 20  # GRPO iterations (10 rollouts at num_iterations 2) per point of the reward trend


def _pngs(run: Any, curves: dict, arness: dict) -> None:
    if any(curves.values()):
        def draw_rewards(ax):
            # each step's mean reward is set by which few prompts it drew; the trailing mean shows the trend
            for arm, pts in curves.items():
                if pts:
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    line, = ax.plot(xs, ys, ".", alpha=0.35)
                    ax.plot(xs, trailing_mean(ys, REWARD_WINDOW), color=line.get_color(),
                            label=f"{arm} (trailing mean of {REWARD_WINDOW})")
            ax.set_xlabel("GRPO iteration"), ax.set_ylabel("mean reward (2 pass_rate + 0.5 format)")
            ax.set_title("reward per arm (dots: steps; sft_continued: no reward)")
            ax.legend()
        _plot(run.path("reward_curves.png"), draw_rewards)
    if arness:
        def draw_order(ax):
            for k, v in arness.items():
                ms = v.get("mean_reveal_step") or []
                ax.plot(range(len(ms)), ms, label=f"{k} (local@1 {v['local@1']:.2f}, global@1 {v['global@1']:.2f})")
            ax.set_xlabel("position in the completion"), ax.set_ylabel("mean reveal step")
            ax.set_title("decoding order (one token per step); diagonal = left to right")
            ax.legend(fontsize=7)
        _plot(run.path("decoding_order.png"), draw_order)


def _mode_command(mode: str | None) -> str:
    """The command of a run whose settings.json predates its "command" key (no overrides recorded)."""
    flag = {"quick": " --quick", "tiny": " --mode tiny"}.get(mode or "", "")
    return f"bash examples/mini_repro.sh{flag} (overrides, if any, not recorded)"


def _markdown(report: dict, arness: dict, samplers: dict, sc: list) -> str:
    settings, data, sel = report["settings"], report["data"], report["rl_selection"]
    stages, comparisons = report["stages"], report["comparisons"]
    f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    ci = lambda c: "-" if not c else f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    md = [f"# Mini DiffuCoder reproduction ({settings.get('mode', '?')})", "",
          f"Command: `{settings.get('command') or _mode_command(settings.get('mode'))}`  ",
          f"Machine: {settings.get('machine', '?')}  ", f"Wall time: {report['wall_s']:.0f} s", "",
          f"Tasks: {data.get('templates_train')} training templates, {data.get('templates_heldout')} held-out "
          f"templates; {data.get('n_train')} training problems; held-out: {data.get('n_heldout_constants')} new constants "
          f"+ {data.get('n_heldout_templates')} new templates. RL set: {sel.get('selected')} of {sel.get('pool')} pool "
          f"problems of split `{settings.get('rl_split', 'train')}` ({sel.get('intermediate')} with an intermediate SFT pass rate, {sel.get('all_zero')} all-zero, "
          f"{sel.get('all_one')} all-one).", "",
          "## Held-out pass rates", "",
          "| arm | pass@1 greedy | 95% CI | new constants | new templates | pass@1 T=0.2 | 95% CI | pass@10 T=1.0 (n) |",
          "|---|---|---|---|---|---|---|---|"]
    for arm, e in stages.items():
        sp = e.get("splits") or {}
        md.append(f"| {arm} | {f(e['pass@1'])} | {ci(e['ci95'])} | "
                  f"{f(sp.get('heldout_constants', {}).get('pass@1'))} | {f(sp.get('heldout_templates', {}).get('pass@1'))} | "
                  f"{f(e['pass@1_t0.2'])} | {ci(e['ci95_t0.2'])} | {f(e['pass@10_t1.0'])} ({e['n_pass@10']}) |")
    md += ["", "Paired differences of greedy pass@1 (bootstrap over problems):", ""]
    md += [f"- {k}: {v['diff']:+.3f}, 95% CI {ci(v['ci95'])}, n={v['n']}"
           + (" (excludes 0)" if v["excludes_zero"] else " (includes 0)") for k, v in comparisons.items()]
    md += seed_markdown(report.get("sft_seeds"), f, ci)
    md += ["", "## AR-ness of the decoding order (one token per step)", "",
           "| model @ temperature | local@1 | global@1 | local@2 | global@2 | pass@1 | n |", "|---|---|---|---|---|---|---|"]
    md += [f"| {k} | {f(v['local@1'])} | {f(v['global@1'])} | {f(v['local@2'])} | {f(v['global@2'])} | "
           f"{f(v['pass@1'])} | {v['n']} |" for k, v in arness.items()]
    md += ["", "## Samplers on the coupled-GRPO model (greedy)", "",
           "| sampler | pass@1 | 95% CI | tokens/s | n |", "|---|---|---|---|---|"]
    md += [f"| {k} | {f(v['pass@1'])} | {ci(v['ci95'])} | {v['tokens_per_s']:.0f} | {v['n']} |" for k, v in samplers.items()]
    md += ["", "## Stage wall times (s)", "", " ".join(f"{k} {v:.0f};" for k, v in report["stage_wall_s"].items()), "",
           "![rewards](reward_curves.png) ![order](decoding_order.png)", ""]
    if report.get("sft_seeds"):
        md.insert(-1, "![SFT loss by seed](sft_loss_by_seed.png)")
    if sc:
        md.insert(-2, f"sft_continued: SFT loss {sc[0]['loss']:.3f} -> {sc[-1]['loss']:.3f} over {len(sc)} logged steps.")
    return "\n".join(md) + "\n"
