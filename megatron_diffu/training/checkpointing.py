"""Checkpoints with torch.distributed.checkpoint (DCP): save, resume, finetune, inference load.

Layout (docs/DESIGN.md):

    SAVE/iter_0000100/            DCP: .metadata + one file per rank, plus run_config.yaml
    SAVE/latest_checkpointed_iteration.txt

DCP keys:
- `model.<global name>`: each parameter as a DTensor `Shard(tp_shard_dim)` over this rank's TP
  mesh (plain tensor when replicated or TP=1); DP replicas and the tied-embedding copy of the last
  pipeline stage are deduplicated by DCP's planner.
- `optimizer.{exp_avg,exp_avg_sq,fp32_param}.<global name>`: Adam state / fp32 master, sharded
  like the parameter (ZeRO-1 shards are gathered over DP for the save, so any layout can load).
- `<name>.<global name>`: the stage's extra model states (`Stage.checkpoint_states`, e.g. GRPO's
  `reference.*` policy), sharded and resharded exactly like `model.*`.
- `fp8.<module name>`: the FP8 scaling state (amax histories and scales) of each FP8 linear,
  pickled bytes (model/fp8.py `fp8_state_entries`: native histories/scales or TE's `_extra_state`).
  Names carry global layer ids, so any pipeline split finds its layers. The training passes reduce
  the amax over the TP x DP ranks of a stage, so every such rank holds the same state: the entry is
  replicated, DCP's planner keeps one copy, and any TP/DP size loads it. A checkpoint without it
  into an FP8 run: fresh scales (a note); one with it into a run without FP8: ignored (a note);
  `--finetune` loads weights only (fresh scales).
- `train_state`: iteration, consumed samples (the data position), optimizer step count, LR
  schedule, world size / layout, the stage's own state (`Stage.state_dict()`).
- `rng.<global rank>`: torch/cuda/numpy/python RNG states of each rank (restored only when the
  layout is unchanged; the noise of the objective does not use them).

Atomicity: every rank writes into `iter_X.tmp-<pid of rank 0>/`; after DCP's final barrier rank 0
writes run_config.yaml, renames the directory to `iter_X`, and only then replaces the tracker
file (write temp + os.replace). A crash at any point leaves the previous `latest` intact; stale
`*.tmp-*` directories are removed by the next successful save. Old checkpoints beyond
`keep_last` are deleted after the tracker moves on.

Resharding: DCP maps the saved chunks onto whatever local shards the loading layout asks for,
so a checkpoint saved at TP=2/PP=2/DP=2 loads at TP=1/PP=1 and vice versa; HF-converted
checkpoints (plain full tensors, `model.*` keys only) load the same way (`--finetune`).
"""
from __future__ import annotations

import os
import warnings
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_diffu.common.atomic import atomic_write_text, fsync_path
from megatron_diffu.model.fp8 import fp8_modules, fp8_state_entries, load_fp8_state_entries
from megatron_diffu.parallel.state import ProcessGrid, group_size

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "run_config.yaml"
MODEL_PREFIX = "model."
FP8_PREFIX = "fp8."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (missing, incomplete, or a different model)."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


# ------------------------------------------------------------------------------ DTensor wrapping
_MESH_CACHE: dict[tuple, Any] = {}


def _tp_mesh(grid: ProcessGrid):
    from torch.distributed.device_mesh import DeviceMesh

    key = (id(grid.tp_group), tuple(grid.tp_ranks))
    if key not in _MESH_CACHE:
        device_type = "cuda" if "nccl" in str(dist.get_backend(grid.tp_group)).lower() else "cpu"
        _MESH_CACHE[key] = DeviceMesh.from_group(grid.tp_group, device_type)
    return _MESH_CACHE[key]


def _wrap(local: torch.Tensor, shard_dim: Optional[int], grid: ProcessGrid):
    """DTensor Shard(dim) over the TP mesh, or the plain tensor when not sharded."""
    if shard_dim is None or grid.tp_size == 1 or not _dist():
        return local
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, _tp_mesh(grid), [Shard(shard_dim)], run_check=False)


def _shard_dims(model) -> dict[str, Optional[int]]:
    return {n: d for n, (_, d) in model.sharded_state_dict().items()}


# ------------------------------------------------------------------------------ paths
def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A save directory (tracker file, or the newest complete iter_*) or an iter_* directory -> the iter dir.

    A tracker file that exists but does not name a complete iteration is an error naming the file
    (never "no checkpoint": a run that went on from scratch would overwrite the checkpoints)."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    tracker = path / TRACKER_FILE
    if tracker.exists():
        try:
            text = tracker.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{tracker}: unreadable ({e}); fix it or write the iteration to resume "
                                  f"from into it (the iter_* directories beside it)") from None
        try:
            it = int(text)
            if it < 0:
                raise ValueError
        except ValueError:
            raise CheckpointError(f"{tracker}: corrupt: expected an iteration number, found {text[:80]!r}; write "
                                  f"the iteration to resume from into it ({_iters_hint(path)}) or delete the "
                                  f"save directory to start from scratch") from None
        d = path / iter_dir_name(it)
        if not (d / ".metadata").exists():
            raise CheckpointError(f"{tracker} names iteration {it} but {d}/.metadata does not exist "
                                  f"({_iters_hint(path)}); point the tracker at a complete iteration")
        return d
    iters = _complete_iters(path)
    if iters:
        return iters[-1]
    raise CheckpointError(f"{path}: no checkpoint ({TRACKER_FILE}, iter_*/.metadata or .metadata not found)")


def _complete_iters(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("iter_*") if p.is_dir() and "tmp" not in p.name and (p / ".metadata").exists())


def _iters_hint(path: Path) -> str:
    iters = _complete_iters(path)
    return ("complete iterations here: " + ", ".join(p.name for p in iters[-3:])) if iters else \
        "no complete iter_* directory here"


def has_checkpoint(path: Optional[str | Path]) -> bool:
    """True when `path` holds a checkpoint; False when it holds none (missing or empty directory, no
    tracker, no complete iter_*). A tracker file that is corrupt or names a missing iteration raises
    CheckpointError: it is a checkpoint that cannot be used, not the absence of one."""
    if not path:
        return False
    path = Path(path)
    if (path / TRACKER_FILE).exists():
        resolve_checkpoint_dir(path)  # raises, naming the file
        return True
    try:
        resolve_checkpoint_dir(path)
        return True
    except CheckpointError:
        return False


def check_shard_files(ckpt_dir: str | Path, keys: Optional[Iterable[str]] = None) -> None:
    """Every DCP data file the checkpoint's .metadata lists for `keys` (default: all) exists and is
    long enough; else CheckpointError naming the shard (a copy that stopped early, a full disk)."""
    ckpt_dir = Path(ckpt_dir)
    md = read_checkpoint_metadata(ckpt_dir)
    wanted = None if keys is None else set(keys)
    need: dict[str, int] = {}
    for index, info in (md.storage_data or {}).items():
        if wanted is not None and index.fqn not in wanted:
            continue
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, end in sorted(need.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint shard missing (listed in {ckpt_dir / '.metadata'}); the "
                                  f"checkpoint is incomplete: copy the shard again or load another iteration")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"{f}: checkpoint shard truncated ({size} bytes, the metadata needs {end}); "
                                  f"copy it again or load another iteration")


def read_checkpoint_metadata(ckpt_dir: str | Path):
    """DCP metadata of `ckpt_dir`; a missing or corrupt .metadata is a CheckpointError naming it."""
    f = Path(ckpt_dir) / ".metadata"
    try:
        return FileSystemReader(str(ckpt_dir)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing; not a complete checkpoint") from None
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged: "
                              f"copy it again or load another iteration") from None


def dcp_load_checked(state: dict, ckpt_dir: str | Path, no_dist: bool) -> None:
    """dcp.load with the shards checked first and any read failure named as the checkpoint's."""
    check_shard_files(ckpt_dir, state.keys())
    try:
        dcp.load(state, storage_reader=FileSystemReader(str(ckpt_dir)), no_dist=no_dist)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures in its own exception types
        raise CheckpointError(f"{ckpt_dir}: reading the checkpoint failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); a shard may be "
                              f"damaged: copy it again or load another iteration") from None


def read_run_config(ckpt_dir: str | Path) -> dict:
    f = Path(ckpt_dir) / RUN_CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (every checkpoint carries its run config; was it written by "
                              f"megatron_diffu?)")
    return yaml.safe_load(f.read_text()) or {}


def checkpoint_tensor_shapes(ckpt_dir: str | Path) -> dict[str, tuple[int, ...]]:
    md = read_checkpoint_metadata(ckpt_dir)
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def check_model_shapes(ckpt_dir: Path, model_cfg) -> None:
    """Refuse a checkpoint whose model differs from `model_cfg`, naming both."""
    from megatron_diffu.model.transformer import global_parameter_shapes

    saved = {k[len(MODEL_PREFIX):]: s for k, s in checkpoint_tensor_shapes(ckpt_dir).items() if k.startswith(MODEL_PREFIX)}
    if not saved:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has no model.* tensors")
    want = global_parameter_shapes(model_cfg)
    bad = [f"{n}: checkpoint {saved.get(n)} vs config {s}" for n, s in want.items() if saved.get(n) != s]
    bad += [f"{n}: in the checkpoint, not in the config's model" for n in saved if n not in want]
    if not bad:
        return
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "untie_embeddings_and_output_weights", "add_qkv_bias")
    ours = {f: getattr(model_cfg, f) for f in fields}
    try:
        theirs = {f: read_run_config(ckpt_dir).get("model", {}).get(f) for f in fields}
        diff = {f: (theirs[f], ours[f]) for f in fields if theirs[f] != ours[f]}
        desc = "; ".join(f"{f}: checkpoint {a} vs config {b}" for f, (a, b) in diff.items())
    except CheckpointError:
        desc = ""
    raise CheckpointError(
        f"checkpoint {ckpt_dir} holds a different model than the config: {desc or 'see tensors'}\n  "
        + "\n  ".join(bad[:6]) + ("\n  ..." if len(bad) > 6 else "")
        + "\n  fix: use the checkpoint's model settings (its run_config.yaml) or a matching checkpoint")


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------ save
def _save_pause_hook(iteration: int) -> None:
    """Test hook: MDIFFU_TEST_SAVE_PAUSE="ITER:SECONDS" sleeps after the data is written but before
    the rename of that iteration's save (so a test can kill -9 the process mid-save)."""
    spec = os.environ.get("MDIFFU_TEST_SAVE_PAUSE")
    if spec:
        it, secs = spec.split(":")
        if int(it) == int(iteration):
            print(f"[checkpoint] test pause {secs}s before committing iteration {iteration}", flush=True)
            time.sleep(float(secs))


def save_checkpoint(save_dir: str | Path, iteration: int, model, optimizer, grid: ProcessGrid,
                    run_config, train_state: dict, keep_last: Optional[int] = None,
                    save_optim: bool = True, states: Optional[dict[str, Any]] = None, save_rng: bool = True,
                    retain_interval: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory.

    `states`: extra model states saved like the model, {name: object with sharded_state_dict()}
    under DCP keys `<name>.<global name>` (GRPO's reference policy: `reference.*`)."""
    save_dir = Path(save_dir)
    t0 = time.time()
    rank = _rank()
    tmp_name = [f"{iter_dir_name(iteration)}.tmp-{os.getpid()}"]
    if _dist():
        dist.broadcast_object_list(tmp_name, src=0)
    tmp, final = save_dir / tmp_name[0], save_dir / iter_dir_name(iteration)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state: dict[str, Any] = {}
    for name, (local, dim) in model.sharded_state_dict().items():
        state[MODEL_PREFIX + name] = _wrap(local, dim, grid)
    state.update(_extra_state_tensors(states, grid))
    state.update({FP8_PREFIX + n: b for n, b in fp8_state_entries(model).items()})
    if save_optim and optimizer is not None:
        # one parameter at a time; ZeRO shards are gathered per parameter to the host of one DP
        # rank (never the whole fp32 state at once on the device); keys are canonical names
        shapes = optimizer.state_shapes()
        host = "cpu" if getattr(optimizer, "distributed", False) else None
        for kind, name, t in optimizer.iter_state_tensors(device=host):
            state[f"optimizer.{kind}.{name}"] = _wrap(t, shapes[name][1], grid)
    state["train_state"] = pickle.dumps(dict(train_state, world_size=grid.world_size,
                                             layout=(grid.tp_size, grid.pp_size, grid.dp_size)))
    if save_rng:
        state[f"rng.{rank}"] = pickle.dumps(rng_state())
    writer = FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True, thread_count=1)
    with warnings.catch_warnings():  # "no process group: single process" is what we mean
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer, no_dist=not _dist())
    if rank == 0:
        _save_pause_hook(iteration)
        run_config.save_yaml(tmp / RUN_CONFIG_FILE)
        if final.exists():  # re-saving an iteration (e.g. exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(save_dir)
        atomic_write_text(save_dir / TRACKER_FILE, f"{iteration}\n", fsync=True)
        _fsync_dir(save_dir)
        _prune(save_dir, keep_last, keep=final, retain_interval=retain_interval)
        print(f"[checkpoint] saved iteration {iteration} to {final} in {time.time() - t0:.2f}s", flush=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    """Best effort: some filesystems refuse fsync on a directory; the rename is atomic regardless."""
    try:
        fsync_path(path)
    except OSError:
        pass


def _prune(save_dir: Path, keep_last: Optional[int], keep: Path, retain_interval: Optional[int] = None) -> None:
    """Remove crashed saves, then every checkpoint that is neither among the `keep_last` newest nor
    (with `retain_interval`, Megatron's --save-retain-interval) at a multiple of that interval."""
    for stale in save_dir.glob("iter_*.tmp-*"):  # crashed saves
        shutil.rmtree(stale, ignore_errors=True)
    if not keep_last:
        return
    done = sorted(p for p in save_dir.glob("iter_*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep_last]:
        retained = retain_interval and _iteration_of(old) % retain_interval == 0
        if old != keep and not retained:
            shutil.rmtree(old, ignore_errors=True)


def _iteration_of(ckpt_dir: Path) -> int:
    try:
        return int(ckpt_dir.name.split("_")[1])
    except (IndexError, ValueError):
        return -1


def _extra_state_tensors(states: Optional[dict[str, Any]], grid: ProcessGrid) -> dict[str, Any]:
    return {f"{key}.{name}": _wrap(local, dim, grid)
            for key, obj in (states or {}).items() for name, (local, dim) in obj.sharded_state_dict().items()}


# ------------------------------------------------------------------------------ load
def load_checkpoint(load_dir: str | Path, model, optimizer, grid: ProcessGrid, model_cfg, *,
                    finetune: bool = False, load_optim: bool = True, load_rng: bool = True,
                    verbose: bool = True, states: Optional[dict[str, Any]] = None) -> Optional[dict]:
    """Load into `model` (and `optimizer`, and the extra `states` that the checkpoint holds) in
    place. Returns the saved train_state, with `restored_states` = the names of the extra states
    found and loaded (None with `finetune`: model weights only). Collective."""
    ckpt = resolve_checkpoint_dir(load_dir)
    check_model_shapes(ckpt, model_cfg)
    saved = checkpoint_tensor_shapes(ckpt)
    md_keys = set(read_checkpoint_metadata(ckpt).state_dict_metadata)
    dims = _shard_dims(model)
    state: dict[str, Any] = {MODEL_PREFIX + n: _wrap(t, d, grid) for n, (t, d) in model.sharded_state_dict().items()}
    want_optim = optimizer is not None and load_optim and not finetune
    opt_targets: dict[str, dict[str, torch.Tensor]] = {}
    if want_optim:
        for kind in ("exp_avg", "exp_avg_sq", "fp32_param"):
            names = [n for n in dims if f"optimizer.{kind}.{n}" in saved]
            if kind != "fp32_param" and len(names) != len(dims):
                raise CheckpointError(f"{ckpt}: no optimizer state ({kind}) for this model; pass --no-load-optim "
                                      f"to load the weights with a fresh optimizer")
            if kind == "fp32_param" and (optimizer.master_is_param or not names):
                continue
            opt_targets[kind] = {}
            # canonical shapes (TE's own names/shapes differ); only what this rank's ZeRO shard
            # needs, on the host: no full fp32 copy of the state on the device
            shapes, needed = optimizer.state_shapes(), set(optimizer.needed_state_names())
            for n in names:
                if n not in needed or n not in shapes:
                    continue
                t = torch.empty(shapes[n][0], dtype=torch.float32, device="cpu")
                opt_targets[kind][n] = t
                state[f"optimizer.{kind}.{n}"] = _wrap(t, shapes[n][1], grid)
    restored, fp8_keys = [], []
    if not finetune:
        for key, tensors in _extra_states_present(states, md_keys, grid).items():
            state.update(tensors)
            restored.append(key)
        fp8_keys = _fp8_targets(model, md_keys, ckpt)
        state.update({k: b"" for k in fp8_keys})
        state["train_state"] = b""
        if load_rng and f"rng.{_rank()}" in md_keys:
            state[f"rng.{_rank()}"] = b""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_load_checked(state, ckpt, no_dist=not _dist())
    if optimizer is not None:
        if want_optim:
            optimizer.load_state_tensors(opt_targets, step_count=pickle.loads(state["train_state"]).get("optimizer_step", 0))
        else:
            optimizer.sync_master_from_params()
    if finetune:
        if verbose and _rank() == 0:
            print(f"[checkpoint] finetune: loaded model weights from {ckpt}", flush=True)
        return None
    fresh = load_fp8_state_entries(model, {k[len(FP8_PREFIX):]: state[k] for k in fp8_keys})
    if fresh and fp8_keys and _rank() == 0:  # saved by the other implementation (native vs TE)
        print(f"[checkpoint] note: {len(fresh)} FP8 linear(s) have no matching scaling state in {ckpt}: "
              f"fresh scales for them (e.g. {fresh[0]})", flush=True)
    train_state = dict(pickle.loads(state["train_state"]), restored_states=restored)
    rng_key = f"rng.{_rank()}"
    if load_rng and rng_key in state and train_state.get("world_size") == grid.world_size:
        set_rng_state(pickle.loads(state[rng_key]))
    if _rank() == 0:
        print(f"[checkpoint] resumed from {ckpt} at iteration {train_state.get('iteration')}", flush=True)
    return train_state


def _fp8_targets(model, md_keys: set, ckpt: Path) -> list[str]:
    """The `fp8.*` keys to read for this model's FP8 linears; a note (rank 0) when the checkpoint
    has none for an FP8 model (fresh scales), or has some for a model without FP8 (ignored)."""
    names = fp8_modules(model)
    keys = [FP8_PREFIX + n for n in names if FP8_PREFIX + n in md_keys]
    saved = any(k.startswith(FP8_PREFIX) for k in md_keys)
    if _rank() == 0 and names and not keys:
        print(f"[checkpoint] note: {ckpt} holds no FP8 scaling state (saved without FP8): the FP8 "
              f"linears start from fresh scales (1, empty amax history)", flush=True)
    elif _rank() == 0 and saved and not names:
        print(f"[checkpoint] note: {ckpt} holds FP8 scaling state (fp8.*) but this run does not use "
              f"FP8: ignored", flush=True)
    return keys


def _extra_states_present(states: Optional[dict[str, Any]], md_keys: set, grid: ProcessGrid) -> dict[str, dict]:
    """{name: its DCP targets} for each extra state whose every tensor the checkpoint holds."""
    out = {}
    for key, obj in (states or {}).items():
        tensors = _extra_state_tensors({key: obj}, grid)
        if tensors and all(k in md_keys for k in tensors):
            out[key] = tensors
    return out


def load_inference_model(path: str | Path, grid: Optional[ProcessGrid] = None, device=None,
                         sequence_parallel: bool = False, dtype: Optional[torch.dtype] = None,
                         transformer_impl: Optional[str] = None, fp8_format: Optional[str] = None):
    """(model, TransformerConfig) from a native or HF-converted checkpoint, for sampling/eval/export.

    `path`: a save dir or an iter_* dir. The model is built for `grid` (default: one process,
    all layers) with this rank's pipeline stage and TP shard, loaded (collective when `grid` has
    groups), set to eval mode. `dtype` overrides the saved `bf16` setting.

    The checkpoint holds canonical weights whatever implementation trained it, so the model is
    built with the LOCAL implementation and no FP8 (a Transformer Engine / FP8 checkpoint is
    evaluated without TE) unless `transformer_impl` / `fp8_format` ask otherwise.
    """
    from megatron_diffu.model.builder import build_model_shard
    from megatron_diffu.model.config import TransformerConfig

    grid = grid or ProcessGrid.single()
    ckpt = resolve_checkpoint_dir(path)
    section = read_run_config(ckpt).get("model")
    if not isinstance(section, dict):
        raise CheckpointError(f"{ckpt / RUN_CONFIG_FILE}: no 'model:' section")
    known = {f for f in TransformerConfig.__dataclass_fields__}
    cfg = TransformerConfig(**{k: v for k, v in section.items() if k in known})
    if dtype is not None:
        cfg.bf16 = dtype == torch.bfloat16
    cfg.transformer_impl = transformer_impl or "local"
    cfg.fp8_format = fp8_format
    model = build_model_shard(cfg, grid, sequence_parallel=sequence_parallel, device=device, init_weights=False)
    load_checkpoint(ckpt, model, None, grid, cfg, finetune=True, verbose=False)
    model.eval()
    return model, cfg
