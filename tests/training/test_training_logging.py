"""The Megatron-style log line: window averages, skipped-step count, ETA from the average step time,
and the JSONL file every iteration goes to."""
import json
import math

import pytest

from megatron_diffu.training.logging import MetricsLogger


def _metrics(i, step_time, loss):
    return dict(consumed_samples=8 * i, lr=3e-4, loss=loss, grad_norm=1.5, tokens_per_s=512.0, mfu=0.25,
                step_time=step_time, peak_mem_gb=1.25)


def test_log_line_averages_the_window_and_estimates_the_time_left(tmp_path, capsys):
    log = MetricsLogger(train_iters=100, log_interval=4, log_file=str(tmp_path / "train.log"))
    for i in range(1, 5):
        log.record(i, _metrics(i, step_time=0.5 + 0.5 * (i % 2), loss=float(i)))  # 1.0, 0.5, 1.0, 0.5 s
    log.record(5, {**_metrics(5, 0.1, float("nan")), "skipped": True})
    for i in range(6, 9):
        log.record(i, _metrics(i, step_time=2.0, loss=1.0))
    log.close()
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith(" iteration        4/     100 | consumed samples:           32 | lr: 3.000000E-04")
    assert "loss: 2.500000E+00" in first and "step time (ms): 750.0" in first and "peak mem (GB): 1.25" in first
    assert first.endswith("| ETA: 0:01:12")  # 96 iterations x 0.75 s
    # the ETA's step time is the mean of every recent step, the skipped one included: 9.1 s / 8
    assert "skipped iterations: 1" in second and second.endswith("| ETA: 0:01:45")  # 92 x 1.1375 s
    rows = [json.loads(line) for line in (tmp_path / "train.log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert (tmp_path / "train.log").read_text().splitlines() == [first, second]


def test_eta_is_steady_when_slow_and_fast_steps_alternate(capsys):
    """GRPO rolls out every num_iterations-th step: with log_interval 1 a one-step average would swing
    the ETA between remaining x 1.6 s and remaining x 17.4 s."""
    log = MetricsLogger(train_iters=100, log_interval=1)
    times = [17.4 if i % 2 else 1.6 for i in range(1, 12)]
    for i, t in enumerate(times, start=1):
        log.record(i, _metrics(i, t, 1.0))
    lines = capsys.readouterr().out.splitlines()

    def eta(i: int) -> str:
        s = round((100 - i) * sum(times[:i]) / i)  # remaining x mean step time so far (< 32 steps)
        return f"| ETA: {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    assert lines[9].endswith(eta(10)) and eta(10) == "| ETA: 0:14:15"  # 90 x 9.5 s
    assert lines[10].endswith(eta(11))


def test_last_line_has_no_eta(capsys):
    log = MetricsLogger(train_iters=2, log_interval=1)
    log.record(1, _metrics(1, 1.0, 1.0))
    log.record(2, _metrics(2, 1.0, 1.0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| ETA: 0:00:01") and "ETA" not in lines[1]


def _tb_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_carry_megatrons_names(tmp_path, capsys):
    """Megatron-LM training_log / evaluate names (dashboards keep working); our extras stay under train/."""
    log = MetricsLogger(train_iters=3, log_interval=1, tensorboard_dir=str(tmp_path / "tb"), global_batch_size=8,
                        log_throughput=True, log_timers_to_tensorboard=True, log_validation_ppl_to_tensorboard=True)
    for i in (1, 2):
        log.record(i, {**_metrics(i, 0.5, 2.0 + i), "masked_ce": 1.0 + i, "tflops_per_gpu": 3.5})
    log.log_validation(2, {"elbo_loss": 2.5, "elbo_ppl": 12.18})
    log.close()
    assert "throughput per GPU (TFLOP/s/GPU): 3.5" in capsys.readouterr().out
    s = _tb_scalars(tmp_path / "tb")
    assert s["lm loss"] == [(1, 3.0), (2, 4.0)] and s["lm loss vs samples"] == [(8, 3.0), (16, 4.0)]
    assert s["learning-rate"] == [(1, pytest.approx(3e-4)), (2, pytest.approx(3e-4))]
    assert [v for _, v in s["learning-rate vs samples"]] == [pytest.approx(3e-4)] * 2
    assert s["grad-norm"] == [(1, 1.5), (2, 1.5)] and s["grad-norm vs samples"] == [(8, 1.5), (16, 1.5)]
    assert s["batch-size"] == [(1, 8.0), (2, 8.0)] and s["batch-size vs samples"] == [(8, 8.0), (16, 8.0)]
    assert s["iteration-time"] == [(1, 0.5), (2, 0.5)] and s["throughput"] == [(1, 3.5), (2, 3.5)]
    assert s["lm loss validation"] == [(2, 2.5)] and s["lm loss validation vs samples"] == [(16, 2.5)]
    assert s["lm loss validation ppl"] == [(2, pytest.approx(math.exp(2.5)))]
    assert s["lm loss validation ppl vs samples"] == [(16, pytest.approx(math.exp(2.5)))]
    assert s["train/masked_ce"] == [(1, 2.0), (2, 3.0)] and s["valid/elbo_ppl"] == [(2, pytest.approx(12.18))]


def test_timers_and_ppl_follow_megatrons_flags(tmp_path):
    log = MetricsLogger(train_iters=1, log_interval=1, tensorboard_dir=str(tmp_path / "tb"), global_batch_size=8)
    log.record(1, {**_metrics(1, 0.5, 2.0), "tflops_per_gpu": 3.5})
    log.log_validation(1, {"elbo_loss": 2.5})
    log.close()
    tags = set(_tb_scalars(tmp_path / "tb"))
    assert {"lm loss", "learning-rate", "grad-norm", "batch-size", "lm loss validation"} <= tags
    assert not {"iteration-time", "throughput", "lm loss validation ppl"} & tags  # off by default, as in Megatron


def test_interval_rates_are_work_over_time_not_the_mean_of_ratios(capsys):
    """Two steps of 4096 tokens taking 0.5 s and 3.5 s: the interval ran 8192 tokens in 4 s = 2048
    tokens/s (the mean of the per-step rates, (8192 + 1170.3) / 2 = 4681, overstates it 2.3x); MFU and
    TFLOP/s the same way: FLOPs / time."""
    log = MetricsLogger(train_iters=10, log_interval=2, log_throughput=True)
    for i, dt in ((1, 0.5), (2, 3.5)):
        flops = 4096 * 6e6
        log.record(i, {**_metrics(i, dt, 1.0), "tokens_per_s": 4096 / dt, "mfu": flops / dt / 1e11,
                       "tflops_per_gpu": flops / dt / 1e12})
    line = capsys.readouterr().out.splitlines()[0]
    assert "tokens/s: 2048 |" in line
    assert f"MFU: {100 * 2 * 4096 * 6e6 / 4.0 / 1e11:.2f}%" in line  # 12.29%
    assert f"(TFLOP/s/GPU): {2 * 4096 * 6e6 / 4.0 / 1e12:.1f}" in line
