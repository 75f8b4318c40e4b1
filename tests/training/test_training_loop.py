"""The trainer on real stdlib data: learning, bit-exact resume, non-finite steps, finetune loads."""
import math

import pytest
import torch

from training_helpers import build_trainer, make_stdlib_dataset, run_losses, tiny_args

from megatron_diffu.stages.diffusion.data import PackedWindows
from megatron_diffu.stages.diffusion.objective import DocumentMasking, PerPosition
from megatron_diffu.stages.diffusion.stage import DiffusionStage
from megatron_diffu.training import checkpointing
from megatron_diffu.training.trainer import TrainingError


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_stdlib_dataset(tmp_path_factory.mktemp("stdlib_train"))


@pytest.fixture(scope="module")
def uninterrupted(data_prefix):
    torch.manual_seed(0)
    losses, trainer = run_losses(tiny_args(data_prefix, train_iters=6))
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


def test_loss_goes_down_on_stdlib(data_prefix):
    trainer = build_trainer(tiny_args(data_prefix, train_iters=30, extra=[
        "--lr", "1e-2", "--eval-interval", "30", "--eval-iters", "1", "--eval-mc-samples", "2"]))
    before = trainer.evaluate()  # the ELBO bound on fixed validation samples and noise
    assert abs(before["elbo_loss"] - math.log(trainer.cfg.model.vocab_size)) < 1.0  # ~uniform at init
    trainer.train()
    ce = [m["masked_ce"] for m in trainer.history]  # unweighted CE of masked tokens: low variance
    assert all(math.isfinite(m["loss"]) for m in trainer.history)
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 2.0, ce
    (_, _), (it, after) = trainer.validation_history
    assert it == 30 and after["elbo_loss"] < before["elbo_loss"] - 2.0, (before, after)
    assert after["elbo_ppl"] == pytest.approx(math.exp(after["elbo_loss"]))


def test_resume_is_bit_exact_including_data_order(data_prefix, uninterrupted, tmp_path):
    ref_losses, ref_params = uninterrupted
    save = str(tmp_path / "ck")
    # same run config, stopped after iteration 3 (--exit-interval saves, then exits)
    first, _ = run_losses(tiny_args(data_prefix, 6, ["--save", save, "--exit-interval", "3"]))
    assert first == ref_losses[:3]
    trainer = build_trainer(tiny_args(data_prefix, 6, ["--save", save, "--load", save]))
    assert trainer.iteration == 3 and trainer.consumed_samples == 12
    trainer.train()
    assert [m["loss"] for m in trainer.history] == ref_losses[3:]
    for p, q in zip(trainer.model.parameters(), ref_params):
        assert torch.equal(p, q)
    assert checkpointing.resolve_checkpoint_dir(save).name == "iter_0000006"


class _NaNStage(DiffusionStage):
    """Poisons the loss of chosen iterations (a model/data blow-up stand-in)."""

    def __init__(self, bad_iterations):
        super().__init__(PackedWindows(), DocumentMasking(), PerPosition())
        self.bad = set(bad_iterations)

    def forward_step(self, model, batch, input_tensor):
        out, loss_fn = super().forward_step(model, batch, input_tensor)
        if self.trainer.iteration not in self.bad:
            return out, loss_fn

        def poisoned(o):
            loss, rep = loss_fn(o)
            return loss * float("nan"), dict(rep, loss_sum=rep["loss_sum"] * float("nan"))
        return out, poisoned


def _trainer_with_stage(args, stage):
    from megatron_diffu.stages.diffusion.config import PretrainRunConfig
    from megatron_diffu.training.trainer import Trainer
    cfg = PretrainRunConfig.from_args(args)
    stage.configure(cfg, 1)
    return Trainer(cfg, stage, device=torch.device("cpu"))  # pinned: CUDA would be the default on a GPU machine


def test_non_finite_step_is_skipped_then_training_stops(data_prefix, capsys):
    tr = _trainer_with_stage(tiny_args(data_prefix, 4, ["--max-skipped-steps", "2"]), _NaNStage({2}))
    tr.train_step()
    before = [p.detach().clone() for p in tr.model.parameters()]
    m = tr.train_step()
    assert m["skipped"] and all(torch.equal(p, q) for p, q in zip(tr.model.parameters(), before))
    assert "non-finite loss" in capsys.readouterr().out
    assert not tr.train_step()["skipped"] and tr.skipped_in_a_row == 0
    tr2 = _trainer_with_stage(tiny_args(data_prefix, 6, ["--max-skipped-steps", "2"]), _NaNStage({1, 2, 3}))
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        tr2.train()


def test_finetune_loads_weights_only_from_a_converter_style_checkpoint(data_prefix, uninterrupted, tmp_path):
    """A checkpoint with model.* keys only, plain full tensors (what convert/ writes) + run_config.yaml."""
    import torch.distributed.checkpoint as dcp
    import yaml

    src = build_trainer(tiny_args(data_prefix, 1))
    src.train()
    d = tmp_path / "hf" / "iter_0000000"
    d.mkdir(parents=True)
    state = {f"model.{n}": t.clone() for n, (t, _) in src.model.sharded_state_dict().items()}
    dcp.save(state, checkpoint_id=str(d), no_dist=True)
    (d / "run_config.yaml").write_text(yaml.safe_dump({"model": src.cfg.model.to_dict()}))
    (tmp_path / "hf" / "latest_checkpointed_iteration.txt").write_text("0\n")
    tr = build_trainer(tiny_args(data_prefix, 2, ["--load", str(tmp_path / "hf"), "--finetune"]))
    assert tr.iteration == 0 and tr.consumed_samples == 0 and tr.optimizer.step_count == 0
    for (n, p), (_, q) in zip(tr.model.named_parameters(), src.model.named_parameters()):
        assert torch.equal(p, q), n
    model, cfg = checkpointing.load_inference_model(tmp_path / "hf")
    x = torch.randint(0, 1000, (1, 16))
    assert torch.equal(model(x), src.model.eval()(x))
    # a different model shape is refused, naming both sides
    with pytest.raises(checkpointing.CheckpointError, match="hidden_size: checkpoint 32 vs config 48"):
        build_trainer(tiny_args(data_prefix, 2, ["--load", str(tmp_path / "hf"), "--finetune", "--hidden-size", "48"]))
