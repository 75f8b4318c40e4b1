"""`--set sft_seeds=...`: the SFT stage repeated over seeds, each scored greedily, and the spread in the report."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from megatron_diffu.repro import mini, seeds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_log(path, losses):
    with open(path, "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"iteration": i, "loss": loss, "lr": 1e-3}) + "\n")


def test_loss_tail_is_the_mean_of_the_last_500_steps_or_the_last_half(tmp_path):
    p = str(tmp_path / "a.jsonl")
    losses = [1.0 / i for i in range(1, 1201)]
    _write_log(p, losses)
    got = seeds.loss_tail(p)
    assert got["from_iteration"] == 701 and got["to_iteration"] == 1200
    assert got["loss"] == pytest.approx(sum(losses[700:]) / 500, rel=1e-12)
    _write_log(p, [4.0, 3.0, 2.0, 1.0, 0.5, 0.25])  # a short run: its last half
    assert seeds.loss_tail(p) == {"loss": pytest.approx((1.0 + 0.5 + 0.25) / 3), "from_iteration": 4,
                                        "to_iteration": 6}


def test_spread_is_mean_sample_sd_min_median_max():
    rows = [{"pass@1": p, "new_constants": c} for p, c in ((0.145, 0.24), (0.48, 0.78), (0.37, 0.6), (0.155, None))]
    sm = seeds.spread(rows)
    ps = [0.145, 0.48, 0.37, 0.155]
    assert sm["n_seeds"] == 4
    assert sm["pass@1"]["mean"] == pytest.approx(sum(ps) / 4)
    m = sum(ps) / 4
    assert sm["pass@1"]["sd"] == pytest.approx((sum((x - m) ** 2 for x in ps) / 3) ** 0.5)
    assert (sm["pass@1"]["min"], sm["pass@1"]["median"], sm["pass@1"]["max"]) == (0.145, (0.155 + 0.37) / 2, 0.48)
    assert sm["new_constants"]["median"] == 0.6 and sm["new_constants"]["mean"] == pytest.approx(statistics.fmean([0.24, 0.78, 0.6]))


def test_seed_stages_follow_eval_sft_and_the_base_seed_is_read_from_the_config(tmp_path):
    s = mini.SETTINGS["tiny"]
    run = mini.Run(str(tmp_path), "tiny", mini.replace(s, sft_seeds="7, 8"))
    names = [n for n, _ in run.stages()]
    assert names[names.index("eval_sft") + 1:names.index("select_rl")] == ["sft_seed7", "sft_seed8"]
    assert seeds.base_sft_seed(run) == 1234  # examples/mini_repro/sft.yaml's model.seed
    assert seeds.base_sft_seed(mini.Run(str(tmp_path), "tiny", mini.replace(s, train_flags="--seed 99"))) == 99
    assert [n for n, _ in mini.Run(str(tmp_path), "tiny", s).stages()].count("sft_seed7") == 0
    with pytest.raises(SystemExit, match="sft_seeds='7,x'"):
        mini.Run(str(tmp_path), "tiny", mini.replace(s, sft_seeds="7,x")).stages()
    # a seed stage is planned as an SFT stage plus a greedy evaluation (a third of eval_<arm>'s three runs)
    assert mini.planned_share("sft_seed7") == pytest.approx(mini.PLAN["sft"] + mini.PLAN["eval_sft"] / 3)


def test_tiny_run_with_a_second_seed_trains_it_and_reports_both(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    stages = ["data", "pretrain", "sft", "eval_sft", "sft_seed7", "report"]
    r = subprocess.run([sys.executable, "-m", "megatron_diffu.repro.mini", "--mode", "tiny", "--out", str(tmp_path),
                        "--set", "sft_seeds=7", "--only", *stages], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cmd = [ln for ln in r.stdout.splitlines() if "$ " in ln and "sft_seed7.log)" in ln]
    assert len(cmd) == 1 and cmd[0].split("  (log:")[0].endswith("--seed 7"), cmd  # last: it wins over train_flags
    base = [json.loads(x) for x in open(tmp_path / "logs" / "sft_train.log.jsonl")]
    other = [json.loads(x) for x in open(tmp_path / "logs" / "sft_seed7_train.log.jsonl")]
    assert len(base) == len(other) == mini.SETTINGS["tiny"].sft_iters
    assert base[0]["loss"] != other[0]["loss"]  # another seed: other masks at the same first batch's start
    rep = json.loads((tmp_path / "report.json").read_text())
    rows = rep["sft_seeds"]["rows"]
    assert [(x["seed"], x["arm"]) for x in rows] == [(1234, "sft"), (7, "sft_seed7")]
    ev = json.loads((tmp_path / "stages" / "eval_sft.json").read_text())["greedy"]
    st = json.loads((tmp_path / "stages" / "sft_seed7.json").read_text())
    assert rows[0]["pass@1"] == ev["pass@1"] and rows[1]["pass@1"] == st["greedy"]["pass@1"]
    assert rows[1]["loss_tail"] == pytest.approx(statistics.fmean(x["loss"] for x in other[len(other) // 2:]))
    assert rep["sft_seeds"]["summary"]["pass@1"]["mean"] == pytest.approx((rows[0]["pass@1"] + rows[1]["pass@1"]) / 2)
    assert (tmp_path / "sft_loss_by_seed.png").stat().st_size > 1000
    assert "## SFT over seeds" in (tmp_path / "report.md").read_text()
