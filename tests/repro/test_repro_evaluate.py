"""Statistics of the mini reproduction's evaluation (megatron_diffu.repro.evaluate)."""
from __future__ import annotations

import math

from megatron_diffu.repro import evaluate as ev


def test_bootstrap_interval_matches_the_normal_formula_on_a_known_case():
    values = [1.0] * 60 + [0.0] * 140  # p = 0.3, n = 200
    lo, hi = ev.bootstrap_ci(values, n_boot=4000, seed=1)
    wlo, whi = ev.normal_ci(0.3, 200)
    assert abs(whi - wlo - 2 * 1.959964 * math.sqrt(0.3 * 0.7 / 200)) < 1e-12
    assert abs(lo - wlo) < 0.01 and abs(hi - whi) < 0.01, ((lo, hi), (wlo, whi))
    assert ev.bootstrap_ci([1.0] * 10) == [1.0, 1.0]  # no variation, no width
    assert ev.bootstrap_ci(values, seed=5) == ev.bootstrap_ci(values, seed=5)  # seeded


def test_paired_difference_excludes_zero_only_for_a_real_gap():
    a, b = [1.0] * 50 + [0.0] * 50, [1.0] * 20 + [0.0] * 80  # a is b plus 30 solved problems
    d = ev.paired_bootstrap_diff(a, b)
    assert abs(d["diff"] - 0.3) < 1e-12 and d["excludes_zero"] and d["ci95"][0] > 0.15
    assert not ev.paired_bootstrap_diff(a, a[::-1])["excludes_zero"]


def test_pass_at_k_summaries_per_split():
    recs = [{"task_id": f"t{i}", "sample_index": j, "passed": (i < 2 and j < 5) or i == 0}
            for i in range(4) for j in range(10)]
    s = ev.passk_summary(recs, (1, 10))
    assert abs(s["pass@1"] - (1.0 + 0.5) / 4) < 1e-12 and abs(s["pass@10"] - 0.5) < 1e-12 and s["n"] == 4
    one = [r for r in recs if r["sample_index"] == 0]
    p = ev.pass1_summary(one, {"t0": "a", "t1": "a", "t2": "b", "t3": "b"})
    assert p["pass@1"] == 0.5 and p["n"] == 4
    assert p["splits"]["a"]["pass@1"] == 1.0 and p["splits"]["b"]["pass@1"] == 0.0


def test_reward_trend_is_the_plain_trailing_mean():
    values = [0.9375, 0.8125, 1.34375, 0.625, 1.4375, 0.5703125, 1.0625]
    for w in (1, 3, 20):
        want = [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]
        assert all(abs(a - b) < 1e-12 for a, b in zip(ev.trailing_mean(values, w), want))
