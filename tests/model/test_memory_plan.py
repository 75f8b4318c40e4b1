"""tools/memory_plan.py: per-rank parameters from the real (meta-device) model, the activation probe
scales linearly with tokens, the two summary lines, exit 1 when it does not fit."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import memory_plan  # noqa: E402

CONFIG = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")


def test_tiny_plan_lines_and_exit_status(capsys):
    assert memory_plan.main(["--config", CONFIG, "--world-size", "1", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    run = memory_plan._load_config(CONFIG)
    assert f"parameters: {run.model.num_parameters()}" in out
    assert "peak per GPU:" in out and "fits in 80 GB" in out
    assert memory_plan.main(["--config", CONFIG, "--world-size", "1", "--gpu-memory-gb", "0.001",
                             "--overhead-gb", "0"]) == 1


def test_stage_params_add_up_and_activations_scale_linearly():
    run = memory_plan._load_config(CONFIG)
    run.parallel.pipeline_model_parallel_size = 2
    plans = [memory_plan.stage_plan(run, 2, r) for r in range(2)]
    tied = not run.model.untie_embeddings_and_output_weights
    extra = run.model.vocab_size * run.model.hidden_size if tied else 0  # last stage's embedding copy
    assert sum(p["params"] for p in plans) == run.model.num_parameters() + extra
    assert plans[0]["in_flight"] == 2 and plans[1]["in_flight"] == 1
    from megatron_diffu.parallel.state import ProcessGrid
    a = memory_plan.layer_activation_bytes(run.model, ProcessGrid.single(), False, tokens=64)
    b = memory_plan.layer_activation_bytes(run.model, ProcessGrid.single(), False, tokens=256)
    assert a == pytest.approx(b, rel=0.02)
