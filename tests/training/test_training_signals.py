"""Pre-emption: kill -9 in the middle of a save keeps the previous checkpoint as latest; SIGTERM
checkpoints at the end of the step and exits with EXIT_CODE_SIGNAL (75); the result resumes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_helpers import make_stdlib_dataset, tiny_args

from megatron_diffu.training import checkpointing
from megatron_diffu.training.signals import EXIT_CODE_SIGNAL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_stdlib_dataset(tmp_path_factory.mktemp("stdlib_signals"))


def _start(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "megatron_diffu.pretrain", *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, needle, timeout=240):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n" + "".join(seen[-40:]))


@pytest.mark.slow
def test_kill9_mid_save_then_sigterm_checkpoint_and_resume(data_prefix, tmp_path):
    save = tmp_path / "ck"
    args = tiny_args(data_prefix, 40, ["--save", str(save), "--load", str(save), "--save-interval", "2"])
    # 1) SIGKILL while iteration 4's checkpoint is written (the test hook pauses before the rename)
    proc = _start(args, {"MDIFFU_TEST_SAVE_PAUSE": "4:120"})
    _wait_for(proc, "test pause")
    assert list(save.glob("iter_0000004.tmp-*")), "the save of iteration 4 is in progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (save / checkpointing.TRACKER_FILE).read_text().strip() == "2"
    assert not (save / "iter_0000004").exists()
    assert checkpointing.resolve_checkpoint_dir(save).name == "iter_0000002"
    # 2) resume from 2; SIGTERM -> checkpoint at the end of the current step, exit code 75
    proc = _start(args[:-2] + ["--save-interval", "1000"])
    _wait_for(proc, "resumed from")
    _wait_for(proc, " iteration        4/")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == EXIT_CODE_SIGNAL, out
    latest = int((save / checkpointing.TRACKER_FILE).read_text())
    assert latest >= 4 and f"exiting after a signal at iteration {latest}" in out
    assert not list(save.glob("*.tmp-*")), "the crashed save's temp dir is cleaned up"
    model, cfg = checkpointing.load_inference_model(save)
    assert cfg.hidden_size == 32
