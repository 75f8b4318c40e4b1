"""init_distributed: Slurm nodelist expansion, launcher env resolution, and a real 2-process
rendezvous from srun-style variables only (no torchrun variables), on gloo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from megatron_diffu.parallel.launch import (LaunchEnv, choose_backend, default_port, expand_nodelist, free_port,
                                            resolve_launch_env)

NODELISTS = {
    "node01": ["node01"],
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu-[8-10],login1": ["gpu-8", "gpu-9", "gpu-10", "login1"],
    "gpu-[8-10]-ib": ["gpu-8-ib", "gpu-9-ib", "gpu-10-ib"],  # a suffix: accepted here, not by scontrol 22.05
    "a[098-101],b[1,3]": ["a098", "a099", "a100", "a101", "b1", "b3"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
}


@pytest.mark.parametrize("nodelist", list(NODELISTS))
def test_expand_nodelist(nodelist):
    assert expand_nodelist(nodelist) == NODELISTS[nodelist]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (Slurm client absent)")
def test_expand_nodelist_matches_scontrol():
    for nodelist in (n for n in NODELISTS if not n.endswith("-ib")):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode and "configuration source" in out.stderr:
            pytest.skip("scontrol has no slurm.conf (start the local cluster: scripts/slurm_local.sh start)")
        assert out.returncode == 0, out.stderr
        assert expand_nodelist(nodelist) == out.stdout.split(), nodelist


@pytest.mark.parametrize("bad", ["node[01-", "node]1[", "node[a-b]", "node[5-3]", ""])
def test_expand_nodelist_errors(bad):
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(bad)


def test_torchrun_env_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert resolve_launch_env(env) == LaunchEnv("torchrun", 3, 8, 1, "h0", 1234)


def test_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert resolve_launch_env(env) == LaunchEnv("slurm", 5, 8, 1, "gpu07", default_port("123456"))
    assert default_port("123456") == 20000 + 123456 % 20000
    env.update(MASTER_ADDR="ib-gpu07", MASTER_PORT="6000")
    assert resolve_launch_env(env) == LaunchEnv("slurm", 5, 8, 1, "ib-gpu07", 6000)
    # a step smaller than the job: the step's task count and nodes are what matter
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "3", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n3"}
    assert resolve_launch_env(env) == LaunchEnv("slurm", 1, 2, 1, "n3", default_port("9"))


def test_batch_script_is_single_process(capsys):
    # the sbatch script itself (no srun step) must not pose as rank 0 of N and hang
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1"}
    assert resolve_launch_env(env).launcher == "single"
    assert "outside an srun step" in capsys.readouterr().err


def test_single_and_errors():
    assert resolve_launch_env({}) == LaunchEnv("single", 0, 1, 0)
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        resolve_launch_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                            "SLURM_JOB_NODELIST": "n1"})
    assert choose_backend(None, {"MDIFFU_DIST_BACKEND": "gloo"}) == "gloo"
    with pytest.raises(ValueError, match="choose nccl or gloo"):
        choose_backend("mpi", {})


_CHILD = textwrap.dedent("""
    import torch, torch.distributed as dist
    from megatron_diffu.parallel.launch import init_distributed
    torch.set_num_threads(1)
    rank, world, local = init_distributed(timeout_s=60)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"RESULT {rank} {world} {local} {dist.get_backend()} {t.item()}", flush=True)
    dist.destroy_process_group()
""")


def test_srun_style_rendezvous_two_processes():
    """Two real processes that only see srun's variables find each other and all-reduce."""
    port = free_port()
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_STEP_ID="0",
                   SLURM_JOB_ID="42", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port),
                   MDIFFU_DIST_BACKEND="gloo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        finally:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"RESULT {r} 2 {r} gloo 3.0" in out, out


def test_single_process_no_group():
    code = ("import torch.distributed as dist\nfrom megatron_diffu.parallel.launch import init_distributed\n"
            "print(init_distributed(), dist.is_initialized())\n"
            "print(init_distributed(init_single_process_group=True), dist.get_world_size())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(0, 1, 0) False", "(0, 1, 0) 1"]
