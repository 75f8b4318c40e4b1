"""The pretraining objective against the references' semantics, written out plainly
(docs/ALGORITHMS.md sec. 2.2, 2.4).

- DiffuLLaMA (HKUNLP/DiffuLLaMA, DiffuLLaMA-training/train.py): `src_mask` is all False, so every
  position may be masked, the eod token included (a base model that never predicts eod cannot
  stop); its loss is sum over masked positions of CE / t divided by the number of masked tokens
  of the micro-batch (`loss_mask.sum()`), and gradient accumulation / DDP average those
  micro-batch losses.
- `never_mask_token_ids` holds tokens that are never masked, in every batch.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
from training_helpers import build_trainer, make_stdlib_dataset, tiny_args  # noqa: E402

from megatron_diffu.diffusion import objective as obj  # noqa: E402


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_stdlib_dataset(tmp_path_factory.mktemp("stdlib"))


def _first_step(prefix, extra, train_iters=1):
    trainer = build_trainer(tiny_args(prefix, train_iters=train_iters, extra=["--no-exit-signal-handler"] + extra))
    trainer.iteration = 1
    return trainer, trainer.stage.step_inputs(trainer).micro_batches


def _pretraining_batches(prefix, extra, steps=100):
    trainer, batches = _first_step(prefix, extra, train_iters=steps)
    for _ in range(steps - 1):
        batches += trainer.stage.data.micro_batches(trainer)
    return trainer, torch.cat([b["tokens"] for b in batches]), torch.cat([b["maskable"] for b in batches])


def test_eod_is_maskable_by_default_and_not_with_no_mask_eod(prefix, one_thread):
    trainer, tokens, maskable = _pretraining_batches(prefix, [])
    eod = trainer.stage.tokenizer.eod_id
    assert (tokens == eod).any(), "the test data must hold document boundaries"
    assert maskable.all()  # DiffuLLaMA: every position
    assert trainer.stage.special_ids == []
    _, tokens2, maskable = _pretraining_batches(prefix, ["--no-mask-eod"])
    assert torch.equal(tokens, tokens2)
    assert not maskable[tokens == eod].any() and maskable[tokens != eod].all()


def test_never_mask_token_ids_apply_even_when_the_batch_carries_maskable():
    cfg = obj.DiffusionConfig(never_mask_token_ids=[5], random_truncation_prob=0.0)
    tokens = torch.tensor([[1, 5, 2, 5, 3, 5, 4, 5]] * 64)
    batch = {"tokens": tokens, "sample_index": torch.arange(64), "maskable": torch.ones_like(tokens, dtype=torch.bool)}
    inputs = obj.prepare_inputs(batch, cfg, seed=3, mask_token_id=9)
    assert not inputs.logit_positions[tokens == 5].any()
    assert inputs.logit_positions[tokens != 5].any()
    assert obj.predictable_count(batch, [], True, cfg) == 64 * 3  # positions 2, 4, 6 (0 is never a target)


@torch.no_grad()
def _reference_loss(trainer, batches, per_micro_batch_masked: bool) -> float:
    """Recompute the step's loss from the same noised inputs with a plain full-vocabulary CE."""
    stage, model = trainer.stage, trainer.model
    losses, total_w, total_tokens = [], 0.0, 0
    for b in batches:
        inp = stage.masking.noise(b, trainer, stage.mask_token_id, stage.special_ids)
        logits = model(inp.input_ids, attention_mask=inp.attention_mask, position_ids=inp.position_ids)
        ce = F.cross_entropy(logits[inp.logit_positions].float(), inp.targets, reduction="none")
        wsum = float((ce / inp.t[inp.logit_positions.nonzero()[:, 0]]).sum())  # 1/t of each masked token's row
        losses.append(wsum / int(inp.logit_positions.sum()))
        total_w, total_tokens = total_w + wsum, total_tokens + b["tokens"].numel()
    return sum(losses) / len(losses) if per_micro_batch_masked else total_w / total_tokens


@pytest.mark.parametrize("mode", ["masked", "position"])
def test_step_loss_matches_the_normaliser(prefix, mode, one_thread):
    trainer, batches = _first_step(prefix, ["--loss-normalization", mode, "--random-truncation-prob", "0"])
    assert trainer.stage.normaliser.name == mode
    step = trainer.stage.step_inputs  # the batches again, with their normaliser attached
    trainer.stage.data.setup(trainer, trainer.stage.tokenizer)
    got = 0.0
    with torch.no_grad():
        for b in step(trainer).micro_batches:
            out, loss_fn = trainer.stage.forward_step(trainer.model, b, None)
            got += float(loss_fn(out)[0])
    want = _reference_loss(trainer, batches, mode == "masked")
    assert got == pytest.approx(want, rel=1e-4)
    assert want != pytest.approx(_reference_loss(trainer, batches, mode != "masked"), rel=1e-2)
