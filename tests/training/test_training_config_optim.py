"""Config parsing/validation errors, the LR schedule formulas, AdamW against torch.optim.AdamW."""
import math

import pytest
import torch

from megatron_diffu.config import ConfigError
from megatron_diffu.stages.diffusion.config import PretrainRunConfig
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.training.lr_schedule import LRSchedule
from megatron_diffu.training.optimizer import MixedPrecisionAdamW


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_then_flags_override_and_shared_seed(tmp_path):
    f = _yaml(tmp_path, "model:\n  preset: tiny\n  hidden_size: 32\n  seed: 7\ntraining:\n  micro_batch_size: 2\n"
                        "  train_iters: 10\noptimizer:\n  lr: 0.1\n")
    cfg = PretrainRunConfig.from_args(["--config", f, "--lr", "3e-4", "--tensor-parallel-size", "1", "--bf16",
                                    "--data-path", "0.3", "a", "0.7", "b", "--swiglu"])
    assert cfg.model.hidden_size == 32 and cfg.model.num_layers == 2  # preset + override
    assert cfg.optimizer.lr == 3e-4 and cfg.model.bf16 is True and cfg.training.micro_batch_size == 2
    assert cfg.model.seed == 7 and cfg.data.seed == 7  # one --seed for model and data
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    again = PretrainRunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text,match", [
    ("training:\n  micro_batch_sise: 2\n", r"unknown key training.micro_batch_sise \(did you mean 'micro_batch_size'\?\)"),
    ("trainng:\n  train_iters: 2\n", r"unknown section 'trainng' \(did you mean 'training'\?\)"),
    ("training:\n  train_iters: abc\n", r"training.train_iters: expected int, got 'abc'"),
    ("model:\n  preset: tinyy\n", r"model.preset='tinyy' is not a preset \(did you mean 'tiny'\?\)"),
    ("model:\n  seed: 1\ndata:\n  seed: 2\n", r"seed is set to 1 in 'model' and 2 in 'data'"),
    ("- a\n- b\n", r"expected sections"),
])
def test_yaml_errors_name_the_key_and_fix(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        PretrainRunConfig.from_args(["--config", _yaml(tmp_path, text)])


def test_flag_and_validation_errors():
    with pytest.raises(ConfigError, match=r"unknown flag --micro-batchsize \(did you mean '--micro-batch-size'\?\)"):
        PretrainRunConfig.from_args(["--micro-batchsize", "2"])
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file"):
        PretrainRunConfig.from_args(["--config", "nope.yaml"])
    base = ["--train-iters", "3", "--mock-data"]
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible by micro_batch_size \* data-parallel "
                                          r"size = 3 \* 2 = 6"):
        PretrainRunConfig.from_args(base + ["--micro-batch-size", "3", "--global-batch-size", "10"]).validate(world_size=2)
    with pytest.raises(ConfigError) as e:
        PretrainRunConfig.from_args(["--mock-data", "--lr-decay-style", "cosin", "--save-interval", "5",
                                  "--tensor-model-parallel-size", "3"]).validate(world_size=4)
    msg = str(e.value)
    for part in ("set --train-iters or --train-samples", "lr_decay_style='cosin'", "--save-interval needs --save",
                 "world size 4 is not divisible", "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"):
        assert part in msg, part
    cfg = PretrainRunConfig.from_args(base + ["--micro-batch-size", "2", "--global-batch-size", "8"]).validate(world_size=2)
    assert cfg.num_micro_batches(2) == 2 and cfg.resolved_train_iters(2) == 3
    assert PretrainRunConfig.from_args(["--train-samples", "100", "--global-batch-size", "8", "--mock-data"]
                                    ).resolved_train_iters(1) == 13


def test_lr_schedules_match_formulas():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_style="cosine", decay_iters=110)
    assert s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lin = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=0, decay_style="linear", decay_iters=100)
    assert lin(25) == pytest.approx(0.75)
    wsd = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=10, decay_style="wsd", decay_iters=100, wsd_decay_iters=20)
    assert wsd(50) == 1.0 and wsd(80) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    assert LRSchedule(lr=2.0, decay_style="constant", decay_iters=5)(1000) == 2.0
    isr = LRSchedule(lr=1.0, warmup_iters=4, decay_style="inverse-square-root", decay_iters=100)
    assert isr(16) == pytest.approx(0.5)


def _model():
    return DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64))


def test_adamw_equals_torch_adamw_with_clipping_and_no_decay_on_norms_biases():
    cfg = PretrainRunConfig.from_args(["--weight-decay", "0.1", "--clip-grad", "0.05", "--adam-beta2", "0.99",
                                   "--adam-eps", "1e-4"]).optimizer  # eps >> the float noise of the
    # key-bias gradient (exactly 0 in theory: softmax is shift-invariant), which Adam would amplify
    ours, ref = _model(), _model()
    opt = MixedPrecisionAdamW(ours, cfg, ProcessGrid.single())
    # Megatron: no decay for biases (the fused qkv bias is 2-D) and norms
    decay = [p for n, p in ref.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in ref.named_parameters() if p.dim() <= 1 or n.endswith(".bias")]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.99), eps=1e-4)
    x = torch.randint(0, 64, (2, 8))
    for step in range(3):
        opt.zero_grad()
        ours(x).float().pow(2).mean().backward()
        opt.reduce_gradients()
        norm = opt.grad_norm()
        opt.step(1e-2, norm)
        torch_opt.zero_grad()
        ref(x).float().pow(2).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        torch_opt.step()
        assert norm == pytest.approx(ref_norm.item(), rel=1e-5)
        for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (step, n)


def test_bf16_model_keeps_fp32_master_weights():
    cfg = PretrainRunConfig.from_args([]).optimizer
    model = DiffusionTransformer(TransformerConfig.from_preset("tiny", vocab_size=64, bf16=True))
    opt = MixedPrecisionAdamW(model, cfg, ProcessGrid.single())
    assert opt.master.dtype == torch.float32 and opt.grad_buffer.dtype == torch.float32
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):  # two micro-batches accumulate in fp32
        model(x).float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    opt.reduce_gradients()
    before = opt.master.clone()
    opt.step(1e-6, opt.grad_norm())  # an update far below bf16 resolution still moves the fp32 master
    assert not torch.equal(before, opt.master)
    assert torch.equal(opt.param_buffer, opt.master.to(torch.bfloat16))
