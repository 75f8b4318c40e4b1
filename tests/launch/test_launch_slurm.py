"""The SLURM examples on a real one-node cluster (scripts/slurm_local.sh start), in CPU mode.

`examples/slurm/pretrain.sbatch` with MDIFFU_CPU=1 and examples/slurm_tiny_cpu.yaml: 2 srun
tasks (gloo, data parallel 2) train the tiny model.
- a full run exits 0 through `sbatch --wait` and leaves a checkpoint of the last iteration;
- pre-emption: `scancel --signal=USR1` while it trains -> the trainer checkpoints and exits 75, the
  script requeues the job (same job id, Restarts=1), the rerun resumes from the saved iteration
  and logs exactly the losses of the uninterrupted run (the reference is the full run above);
- a rank that raises mid-training fails the whole job quickly (srun --kill-on-bad-exit), with that
  rank's traceback in the job log, and the job is not requeued.

Skips (with the reason) when no cluster answers. Each job pays the CPU start-up of 2 ranks
(imports dominate on a loaded 2-core machine), hence `slow`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "examples/slurm/pretrain.sbatch"
CONFIG = "examples/slurm_tiny_cpu.yaml"
JOB_TIMEOUT = 420  # seconds for one job (start-up of 2 ranks is ~1 min on a loaded 2-core box)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_problem() -> str | None:
    for tool in ("sbatch", "sinfo", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install and start a local cluster with `scripts/slurm_local.sh start` (root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering (scripts/slurm_local.sh status)"
    states = out.stdout.split()
    if out.returncode or not any(s.rstrip("*~#") in ("idle", "mix", "alloc", "comp") for s in states):
        return (f"no usable SLURM node (sinfo rc={out.returncode}, states={states}, {out.stderr.strip()[:200]}): "
                f"start the local cluster with `scripts/slurm_local.sh start`")
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _sbatch(tmp: Path, name: str, args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    """Submit the example script in CPU mode with `sbatch --wait` (the Popen ends with the job)."""
    env = dict(os.environ, MDIFFU_CPU="1", CONFIG=CONFIG, SAVE=str(tmp / "ckpt"), MDIFFU_ROOT=str(ROOT),
               MDIFFU_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    cmd = ["sbatch", "--wait", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2",
           "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0", "--time=15", f"--output={tmp}/%x-%j.out",
           SCRIPT, "--log-file", str(tmp / "train.log"), "--tensorboard-dir", "none", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _job_id(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()  # --parsable prints "<id>[;cluster]" at submission
    assert line, f"sbatch printed no job id; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    return line.split(";")[0]


def _wait(proc: subprocess.Popen, job: str, timeout: float = JOB_TIMEOUT) -> int:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job], timeout=30)
        proc.kill()
        raise AssertionError(f"job {job} did not finish within {timeout}s (hang?)")
    return proc.returncode


def _log(tmp: Path, name: str, job: str) -> str:
    return (tmp / f"{name}-{job}.out").read_text(errors="replace")


def _losses(tmp: Path) -> list[tuple[int, float]]:
    path = tmp / "train.log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(int(r["iteration"]), float(r["loss"])) for r in rows if "loss" in r and "iteration" in r]


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


@pytest.fixture(scope="module")
def full_run(cluster, tmp_path_factory):
    """The uninterrupted reference run (also the 'exits 0 and checkpoints' test)."""
    tmp = tmp_path_factory.mktemp("slurm_full")
    proc = _sbatch(tmp, "mdiffu-full", [])
    job = _job_id(proc)
    rc = _wait(proc, job)
    return tmp, job, rc


def test_sbatch_cpu_run_exits_zero_and_checkpoints(full_run):
    tmp, job, rc = full_run
    log = _log(tmp, "mdiffu-full", job)
    assert rc == 0, f"sbatch --wait returned {rc}; job log:\n{log[-4000:]}"
    assert "2 x 1 micro x 2 DP" in log, "the two srun tasks did not form one data-parallel job:\n" + log[-3000:]
    assert "training finished" in log
    assert (tmp / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (tmp / "ckpt" / "iter_0000006" / "run_config.yaml").exists()
    assert [i for i, _ in _losses(tmp)] == list(range(1, 7))


def test_usr1_checkpoints_requeues_and_resumes_with_same_losses(full_run, tmp_path):
    ref_tmp, _, ref_rc = full_run
    assert ref_rc == 0, "reference run failed (see the test above)"
    reference = dict(_losses(ref_tmp))
    proc = _sbatch(tmp_path, "mdiffu-preempt", [])
    job = _job_id(proc)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not _losses(tmp_path):  # signal once training has started
        assert proc.poll() is None, f"job ended before training started:\n{_log(tmp_path, 'mdiffu-preempt', job)}"
        assert time.monotonic() < deadline, "no training step logged in time"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    rc = _wait(proc, job)
    log = _log(tmp_path, "mdiffu-preempt", job)
    assert rc == 0, f"sbatch --wait returned {rc}; job log:\n{log[-4000:]}"
    assert "received SIGUSR1" in log and f"requeueing job {job}" in log, log[-4000:]
    assert _job_field(job, "Restarts") == "1", "the job was not requeued exactly once"
    assert "restart 1:" in log and "training finished" in log, log[-4000:]
    saved = int(log.split("checkpointed at iteration ")[1].split()[0])
    assert 1 <= saved < 6, f"pre-emption checkpoint at iteration {saved}: signal came too late to test resume"
    assert f"at iteration {saved}" in log.split("restart 1:")[1], "the rerun did not resume from the saved iteration"
    got = _losses(tmp_path)
    assert [i for i, _ in got] == list(range(1, 7)), f"iterations logged across the two runs: {[i for i, _ in got]}"
    for it, loss in got:
        assert loss == reference[it], \
            f"iteration {it}: loss {loss} != uninterrupted run's {reference[it]} (resumed from {saved})"


_FAIL_WRAPPER = textwrap.dedent("""
    # `python -m MODULE ARGS` with rank 1 raising at its second training step
    import os, runpy, sys
    if os.environ.get("SLURM_PROCID") == "1":
        from megatron_diffu.training import trainer as T
        original = T.Trainer.train_step
        def train_step(self, *a, **k):
            if self.iteration >= 1:
                raise RuntimeError("injected failure on rank 1 at iteration %d" % (self.iteration + 1))
            return original(self, *a, **k)
        T.Trainer.train_step = train_step
    assert sys.argv[1] == "-m", sys.argv
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


def test_failed_rank_fails_the_job_with_its_error(cluster, tmp_path):
    wrapper = tmp_path / "fail_rank1.py"
    wrapper.write_text(_FAIL_WRAPPER)
    proc = _sbatch(tmp_path, "mdiffu-fail", [], {"MDIFFU_PYTHON": f"{sys.executable} {wrapper}"})
    job = _job_id(proc)
    rc = _wait(proc, job)  # the hang guard: a rank left waiting in a collective fails here after JOB_TIMEOUT
    log = _log(tmp_path, "mdiffu-fail", job)
    assert rc not in (0, 75), f"a failed rank must fail the job (rc={rc}):\n{log[-4000:]}"
    # srun --label prefixes the task id; torch may add its own "[rank1]:" prefix
    assert re.search(r"^1: (\[rank1\]: )?RuntimeError: injected failure on rank 1 at iteration 2$", log, re.M), \
        log[-4000:]
    assert "FAILED with exit code" in log and "requeueing" not in log
    assert _job_field(job, "Restarts") == "0"
    # ended by the failed rank (srun --kill-on-bad-exit stops the other one), not by a time limit or scancel
    state = _job_field(job, "JobState")
    assert state == "FAILED", f"JobState={state}:\n{log[-4000:]}"
