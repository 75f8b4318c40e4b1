"""Measure a conversion's wall time and peak resident memory in a fresh process.

`measure(mode, direction, src, dst)` runs `python -m megatron_diffu.convert.measure ...` and returns
{"seconds", "peak_rss_mb", "baseline_rss_mb", "peak_above_baseline_mb"}: the child records its RSS
after the imports (baseline), runs the conversion while a thread polls /proc/self/statm every 10 ms,
and reports max(polled, ru_maxrss). Modes:

* `stream`: our converter (megatron_diffu.convert.checkpoint).
* `naive`: the obvious non-streaming conversion, the baseline: load every tensor
  (safetensors.torch.load_file / one DCP load of all keys), convert the whole state dict in memory,
  save it in one call (dcp.save / safetensors.torch.save_file).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class _Poller(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_mb(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.01)


def _naive_hf_to_native(src: Path, dst: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from . import hf as H
    from .native_io import MODEL_PREFIX

    cfg = H.transformer_config_from_hf(H.read_hf_config(src))
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    native = H.hf_state_dict_to_native(sd, cfg)
    del sd
    dcp.save({MODEL_PREFIX + k: v for k, v in native.items()}, checkpoint_id=str(dst / "iter_0000000"), no_dist=True)


def _naive_native_to_hf(src: Path, dst: Path) -> None:
    from safetensors.torch import save_file

    from . import hf as H
    from .checkpoint import load_run_config
    from .native_io import NativeCheckpoint

    ck = NativeCheckpoint(src)
    cfg, _ = load_run_config(ck.dir)
    native = ck.load(list(ck.shapes))
    sd = H.native_state_dict_to_hf(native, cfg)
    del native
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _child(mode: str, direction: str, src: Path, dst: Path) -> dict:
    import torch

    from .checkpoint import hf_to_native, native_to_hf

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    baseline = _rss_mb()
    poller = _Poller()
    poller.start()
    t0 = time.perf_counter()
    if mode == "stream":
        (hf_to_native(src, dst, progress=False) if direction == "hf-to-native" else
         native_to_hf(src, dst, max_shard_size="2GB", progress=False))
    else:
        (_naive_hf_to_native if direction == "hf-to-native" else _naive_native_to_hf)(src, dst)
    seconds = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    peak = max(poller.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
            "peak_above_baseline_mb": peak - baseline}


def measure(mode: str, direction: str, src: Path, dst: Path, timeout: float = 3600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "megatron_diffu.convert.measure", mode, direction, str(src), str(dst)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"measured conversion failed ({mode} {direction}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    m, d, s, o = sys.argv[1:5]
    print(json.dumps(_child(m, d, Path(s), Path(o))))
