"""Checkpoint retention and RNG saving keep Megatron's meaning: `--save-retain-interval N` keeps
every checkpoint at a multiple of N besides the `--keep-last` newest; `--no-save-rng` writes no
`rng.<rank>` entry, and such a checkpoint still resumes."""
import sys
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

sys.path.insert(0, str(Path(__file__).parent))
from training_helpers import build_trainer, make_stdlib_dataset, tiny_args  # noqa: E402


def _kept(save: Path) -> list[str]:
    return sorted(p.name for p in save.glob("iter_*") if p.is_dir())


def test_retain_interval_keeps_multiples_and_no_save_rng_writes_no_rng(tmp_path):
    prefix = make_stdlib_dataset(tmp_path)
    save = tmp_path / "ck"
    args = tiny_args(prefix, train_iters=5, extra=["--save", str(save), "--save-interval", "1", "--keep-last", "1",
                                                   "--save-retain-interval", "2", "--no-save-rng",
                                                   "--no-exit-signal-handler"])
    build_trainer(args).train()
    assert _kept(save) == ["iter_0000002", "iter_0000004", "iter_0000005"]  # multiples of 2 + the newest
    keys = set(FileSystemReader(str(save / "iter_0000005")).read_metadata().state_dict_metadata)
    assert not any(k.startswith("rng.") for k in keys) and "train_state" in keys
    resumed = build_trainer(tiny_args(prefix, train_iters=6, extra=["--load", str(save), "--no-exit-signal-handler"]))
    assert resumed.iteration == 5


def test_without_retain_interval_only_the_newest_are_kept(tmp_path):
    prefix = make_stdlib_dataset(tmp_path)
    save = tmp_path / "ck"
    build_trainer(tiny_args(prefix, train_iters=4, extra=["--save", str(save), "--save-interval", "1",
                                                          "--keep-last", "2", "--no-exit-signal-handler"])).train()
    assert _kept(save) == ["iter_0000003", "iter_0000004"]
    keys = set(FileSystemReader(str(save / "iter_0000004")).read_metadata().state_dict_metadata)
    assert "rng.0" in keys
