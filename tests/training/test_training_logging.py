"""The Megatron-style log line: window averages, skipped-step count, ETA from the average step time,
and the JSONL file every iteration goes to."""
import json

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
    assert "skipped iterations: 1" in second and second.endswith("| ETA: 0:03:04")  # 92 x 2.0 s
    rows = [json.loads(line) for line in (tmp_path / "train.log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert (tmp_path / "train.log").read_text().splitlines() == [first, second]


def test_last_line_has_no_eta(capsys):
    log = MetricsLogger(train_iters=2, log_interval=1)
    log.record(1, _metrics(1, 1.0, 1.0))
    log.record(2, _metrics(2, 1.0, 1.0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| ETA: 0:00:01") and "ETA" not in lines[1]
