"""The launch examples are consistent: the YAMLs load and validate for the layouts their
comments promise, the 7B table's arithmetic is recomputed here from the model's own FLOP
count, and the sbatch scripts parse and carry the pre-emption settings."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megatron_diffu.stages.diffusion.config import PretrainRunConfig

ROOT = Path(__file__).resolve().parents[2]
YAML_7B = ROOT / "examples" / "diffucoder_7b_adapt.yaml"
H100_BF16_PEAK, MFU = 989e12, 0.40


def _table_rows() -> list[list[float]]:
    rows = []
    for line in YAML_7B.read_text().splitlines():
        m = re.match(r"#\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+~(\d+) GB\s+([\d.]+) s\s+([\d.]+) days", line)
        if m:
            rows.append([float(x) for x in m.groups()])
    return rows


def test_7b_recipe_tokens_and_layouts():
    cfg = PretrainRunConfig.from_args(["--config", str(YAML_7B)])
    tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
    # one phase = 65B tokens (the paper's adaptation budget), within one step
    assert abs(cfg.training.train_iters * tokens_per_step - 65e9) < tokens_per_step
    assert cfg.model.num_layers == 28 and cfg.model.hidden_size == 3584 and cfg.model.num_query_groups == 4
    flops_token = cfg.model.flops_per_token(cfg.data.seq_length)
    rows = _table_rows()
    assert len(rows) >= 5, "layout table not found in the YAML comments"
    for gpus, nodes, tp, pp, dp, mbs, micro, mem_gb, step_s, days in rows:
        assert gpus == nodes * 8 == tp * pp * dp
        assert micro * mbs * dp == cfg.training.global_batch_size
        assert mem_gb < 80
        achieved = gpus * H100_BF16_PEAK * MFU
        assert step_s == pytest.approx(tokens_per_step * flops_token / achieved, rel=0.01)
        assert days == pytest.approx(130e9 * flops_token / achieved / 86400, rel=0.01)
        c = PretrainRunConfig.from_args(["--config", str(YAML_7B), "--tensor-model-parallel-size", str(int(tp)),
                                      "--pipeline-model-parallel-size", str(int(pp)),
                                      "--micro-batch-size", str(int(mbs))])
        c.validate(int(gpus))


def test_tiny_cpu_config_validates_for_two_ranks():
    cfg = PretrainRunConfig.from_args(["--config", str(ROOT / "examples" / "slurm_tiny_cpu.yaml"), "--save", "/tmp/x"])
    cfg.validate(2)
    assert cfg.training.global_batch_size == 2 * cfg.training.micro_batch_size


@pytest.mark.parametrize("name", ["pretrain", "sft", "grpo"])
def test_sbatch_scripts_parse_and_requeue(name):
    path = ROOT / "examples" / "slurm" / f"{name}.sbatch"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for directive in ("--requeue", "--open-mode=append", "--output=%x-%j.out", "--ntasks-per-node=8",
                      "--gpus-per-node=8"):
        assert f"#SBATCH {directive}" in text, f"{path.name} lacks #SBATCH {directive}"
    assert re.search(r"#SBATCH --signal=USR1@\d+", text)
    assert f"STAGE={name}" in text and "_launch.sh" in text
    for helper in ("_launch.sh", "_task.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / helper)]).returncode == 0


def test_task_wrapper_maps_requeue_code(tmp_path):
    """_task.sh: 75 -> exit 0 + marker (so srun --kill-on-bad-exit spares the other ranks); others pass."""
    task = ROOT / "examples" / "slurm" / "_task.sh"
    env = {"MDIFFU_EXIT_MARK": str(tmp_path), "SLURM_PROCID": "3", "PATH": "/usr/bin:/bin"}
    assert subprocess.run(["bash", str(task), "bash", "-c", "exit 75"], env=env).returncode == 0
    assert (tmp_path / "task-3").exists()
    assert subprocess.run(["bash", str(task), "bash", "-c", "exit 1"], env=env).returncode == 1
    assert subprocess.run(["bash", str(task), "bash", "-c", "exit 0"], env=env).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task-3"]
