"""The mini reproduction driver (megatron_diffu.repro.mini) at its smallest settings (`--mode tiny`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(out, *extra, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "megatron_diffu.repro.mini", "--mode", "tiny", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_data_stage_builds_disjoint_files(tmp_path):
    override = ("--set", "sft_flags=--lr 1e-3")  # read by SFT only: the data stage is unchanged
    r = _run(tmp_path, "--only", "data", *override, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["command"] == "bash examples/mini_repro.sh --mode tiny --set 'sft_flags=--lr 1e-3'"
    data = tmp_path / "data"
    for name in ("sp.model", "pretrain_text_document.bin", "sft_sft_document.bin", "problems_heldout_templates.jsonl"):
        assert (data / name).exists(), name
    recs = {s: [json.loads(x) for x in open(data / f"problems_{s}.jsonl")]
            for s in ("train", "rlpool", "heldout_constants", "heldout_templates")}
    held_text = {r["canonical_solution"] for s in ("heldout_constants", "heldout_templates") for r in recs[s]}
    corpus = open(data / "pretrain.jsonl").read() + open(data / "sft.jsonl").read()
    train_sol = {r["canonical_solution"] for r in recs["train"]}
    assert not held_text & train_sol
    assert all(r["split"] == "rl_constants" for r in recs["rlpool"])  # RL problems SFT never saw
    rl_text = {r["canonical_solution"] for r in recs["rlpool"]}
    assert not rl_text & (train_sol | held_text)
    for r in recs["rlpool"]:  # no RL problem reaches pretraining or SFT
        assert json.dumps(r["canonical_solution"])[1:-1] not in corpus
    for r in recs["heldout_templates"]:  # no unseen-template solution reaches any training file
        assert json.dumps(r["canonical_solution"])[1:-1] not in corpus
    # a rerun skips the finished stage
    again = _run(tmp_path, "--only", "data", *override, timeout=120)
    assert "done already" in again.stdout
    other = _run(tmp_path, "--only", "data", timeout=120)  # without the override: another run
    assert other.returncode != 0 and "made with other settings (sft_flags)" in other.stderr


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_the_report(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["stages"]) == {"sft", "coupled_grpo", "d1_grpo", "sft_continued"}
    for arm in rep["stages"].values():
        assert 0.0 <= arm["pass@1"] <= 1.0 and len(arm["ci95"]) == 2 and arm["n"] == 10
        assert set(arm["splits"]) == {"heldout_constants", "heldout_templates"}
    assert {"sft@T0.2", "sft@T1.2", "coupled_grpo@T0.2", "coupled_grpo@T1.2"} == set(rep["arness"])
    assert any(k.startswith("exact") for k in rep["samplers"]) and rep["wall_s"] > 0
    assert (tmp_path / "report.md").exists() and (tmp_path / "decoding_order.png").exists()
    assert rep["reward_curves"]["coupled_grpo"] and rep["reward_curves"]["d1_grpo"]
