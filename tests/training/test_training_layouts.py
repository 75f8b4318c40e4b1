"""Two processes: DP=2 / TP=2 / PP=2 log the losses of one process; resume is bit-exact at DP=2
with the ZeRO-1 optimizer; checkpoints saved at TP=2 and PP=2 load at TP=1/PP=1 with equal logits."""
import pytest
import torch

from training_helpers import build_trainer, make_stdlib_dataset, run_losses, tiny_args

from megatron_diffu.testing import run_distributed
from megatron_diffu.training import checkpointing

ITERS = 3
# Megatron pads the vocabulary to a multiple of 128 * TP: fix it so every layout has the same model
VOCAB = ["--vocab-size", "151808"]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_stdlib_dataset(tmp_path_factory.mktemp("stdlib_layouts"))


def _probe_input():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 150000, (2, 32), generator=g)


def _layouts_worker(rank, data_prefix, tmp):
    from megatron_diffu.model.transformer import DiffusionTransformer  # noqa: F401  (import in the child)

    out = {}
    # DP=2 with the distributed optimizer: same losses as one process; resume bit-exact
    dp_args = tiny_args(data_prefix, ITERS, VOCAB + ["--use-distributed-optimizer"])
    out["dp"], _ = run_losses(dp_args)
    save = f"{tmp}/dp_ck"
    first, _ = run_losses(dp_args + ["--save", save, "--exit-interval", "2"])
    tr = build_trainer(dp_args + ["--save", save, "--load", save])
    tr.train()
    out["dp_resumed"] = first + [m["loss"] for m in tr.history]
    # TP=2 and PP=2: same losses; save for the cross-layout load in the parent
    for name, extra in (("tp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                        ("pp", ["--pipeline-model-parallel-size", "2"])):
        tr = build_trainer(tiny_args(data_prefix, ITERS, VOCAB + extra + ["--save", f"{tmp}/{name}_ck"]))
        tr.train()
        out[name] = [m["loss"] for m in tr.history]
        if name == "tp":  # TP-sharded logits of the trained model, gathered, for the parent to compare
            from megatron_diffu.parallel.cross_entropy import gather_vocab_parallel_logits
            tr.model.eval()
            with torch.no_grad():
                logits = gather_vocab_parallel_logits(tr.model(_probe_input()), tr.grid.tp_group)
            out["tp_logits"] = logits.numpy().copy()  # by value: tensors would travel as shared memory
    return out


@pytest.mark.slow
def test_layouts_match_one_process_and_checkpoints_reshard(data_prefix, tmp_path):
    ref, ref_trainer = run_losses(tiny_args(data_prefix, ITERS, VOCAB))
    results = run_distributed(_layouts_worker, world_size=2, args=(data_prefix, str(tmp_path)), timeout=600)
    r0 = results[0]
    for name in ("dp", "tp", "pp"):
        assert r0[name] == pytest.approx(ref, rel=2e-5, abs=1e-5), name
        assert results[1][name] == r0[name]  # every rank logs the same reduced loss
    assert r0["dp_resumed"] == r0["dp"]  # bit for bit, data order included
    # checkpoints written at TP=2 (DTensor shards) and PP=2 (per-stage files) load at TP=1/PP=1
    x = _probe_input()
    tp_model, _ = checkpointing.load_inference_model(tmp_path / "tp_ck")
    with torch.no_grad():
        assert torch.allclose(tp_model(x), torch.from_numpy(r0["tp_logits"]), rtol=1e-5, atol=1e-5)
    pp_model, _ = checkpointing.load_inference_model(tmp_path / "pp_ck")
    trained = ref_trainer.model.eval()
    with torch.no_grad():
        ref_logits = trained(x)
        assert torch.allclose(pp_model(x), ref_logits, rtol=1e-4, atol=1e-4)
        assert torch.allclose(tp_model(x), ref_logits, rtol=1e-4, atol=1e-4)
