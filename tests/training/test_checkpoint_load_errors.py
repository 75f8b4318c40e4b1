"""Clear errors, nothing lost (issue 15, item 5).

A corrupt latest_checkpointed_iteration.txt stops the run naming the file (it used to start from
scratch and overwrite the checkpoints); a truncated or missing shard on --load names the shard, with no
traceback; tools/generate.py refuses a prompt + new tokens longer than the model's positions; the
converter names a truncated native shard.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from training_helpers import build_trainer, make_stdlib_dataset, tiny_args

from megatron_diffu.training import checkpointing

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(data prefix, a save dir with the checkpoint of iteration 2 of a tiny run)."""
    tmp = tmp_path_factory.mktemp("ckpt_errors")
    prefix = make_stdlib_dataset(tmp)
    trainer = build_trainer(tiny_args(prefix, train_iters=2, extra=["--save", str(tmp / "ckpt"), "--save-interval", "2",
                                                                   "--no-exit-signal-handler"]))
    trainer.train()
    return prefix, tmp / "ckpt"


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(saved[1], dst)
    return dst


def _resume(prefix: str, ckpt: Path, capsys) -> tuple[int, str]:
    from megatron_diffu.pretrain import main

    code = main(tiny_args(prefix, train_iters=4, extra=["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2",
                                                        "--no-exit-signal-handler"]))
    return code, capsys.readouterr().err


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", ["garbage\n", "", "-3", "\x00\x00"])
def test_corrupt_tracker_stops_the_run_naming_the_file_and_keeps_the_checkpoint(saved, tmp_path, capsys, content):
    ckpt = _copy(saved, tmp_path)
    tracker = ckpt / checkpointing.TRACKER_FILE
    tracker.write_text(content)
    before = _snapshot(ckpt)
    with pytest.raises(checkpointing.CheckpointError, match="latest_checkpointed_iteration.txt"):
        checkpointing.has_checkpoint(ckpt)
    code, err = _resume(saved[0], ckpt, capsys)
    assert code == 2
    assert str(tracker) in err and "corrupt" in err and "iter_0000002" in err  # names the file and the way out
    assert "Traceback" not in err
    assert _snapshot(ckpt) == before  # nothing written, nothing overwritten


def test_tracker_naming_a_missing_iteration_stops_the_run(saved, tmp_path, capsys):
    ckpt = _copy(saved, tmp_path)
    (ckpt / checkpointing.TRACKER_FILE).write_text("7\n")
    code, err = _resume(saved[0], ckpt, capsys)
    assert code == 2 and "names iteration 7" in err and "iter_0000002" in err


def test_empty_or_absent_load_dir_still_starts_from_scratch(tmp_path):
    assert not checkpointing.has_checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert not checkpointing.has_checkpoint(tmp_path / "empty")


def _shards(ckpt: Path) -> list[Path]:
    return sorted(checkpointing.resolve_checkpoint_dir(ckpt).glob("*.distcp"), key=lambda p: -p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_shard_on_load_is_named_without_traceback(saved, tmp_path, capsys, damage):
    ckpt = _copy(saved, tmp_path)
    shard = _shards(ckpt)[0]
    if damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    code, err = _resume(saved[0], ckpt, capsys)
    assert code == 2
    assert str(shard) in err and damage in err
    assert "Traceback" not in err


def test_corrupt_metadata_is_named(saved, tmp_path, capsys):
    ckpt = _copy(saved, tmp_path)
    md = checkpointing.resolve_checkpoint_dir(ckpt) / ".metadata"
    md.write_bytes(md.read_bytes()[:20])
    code, err = _resume(saved[0], ckpt, capsys)
    assert code == 2 and str(md) in err and "Traceback" not in err


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_names_a_truncated_native_shard(saved, tmp_path, capsys):
    from megatron_diffu.convert.checkpoint import native_to_hf

    ckpt = _copy(saved, tmp_path)
    shard = _shards(ckpt)[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(checkpointing.CheckpointError, match="truncated"):
        native_to_hf(ckpt, tmp_path / "export", progress=False)
    code = _load_tool("convert_checkpoint").main(["--direction", "native-to-hf", "--input", str(ckpt),
                                                  "--output", str(tmp_path / "export2"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and str(shard) in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "export2").exists() or not any((tmp_path / "export2").iterdir())


def test_generate_refuses_prompt_plus_new_tokens_beyond_the_positions(saved, one_thread):
    gen = _load_tool("generate")
    ckpt = saved[1]
    max_pos = checkpointing.read_run_config(checkpointing.resolve_checkpoint_dir(ckpt))["model"]["max_position_embeddings"]
    prompt = "def add(a, b):\n    return a + b\n"
    with pytest.raises(SystemExit, match="max_position_embeddings=64") as exc:
        gen.main(["--load", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(max_pos), "--steps", "4",
                  "--device", "cpu"])
    assert "prompt 0 has" in str(exc.value) and "--max-new-tokens" in str(exc.value)
    # within the positions it runs
    assert gen.main(["--load", str(ckpt), "--prompt", prompt, "--max-new-tokens", "8", "--steps", "2",
                     "--device", "cpu"]) == 0
