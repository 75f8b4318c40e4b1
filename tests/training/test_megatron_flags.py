"""Megatron flags keep Megatron's meaning (issue 15, item 2): a table flag -> resolved config for every
flag we claim, the value flags that must name our architecture, the refusals, --help, --print-config,
and the LR lengths in samples / as a fraction, checked against Megatron's scheduler formula."""
from __future__ import annotations

import math

import pytest
import yaml

from megatron_diffu.config import ConfigError
from megatron_diffu.stages.diffusion.config import PretrainRunConfig
from megatron_diffu.training.lr_schedule import LRSchedule

BASE = ["--train-iters", "10", "--mock-data"]

# flag argv -> {section.field: resolved value}
TABLE = [
    (["--fused-adam"], {"optimizer.fused_adam": True}), (["--no-fused-adam"], {"optimizer.fused_adam": False}),
    (["--save-retain-interval", "5"], {"checkpoint.save_retain_interval": 5}),
    (["--no-save-rng"], {"checkpoint.no_save_rng": True}),
    (["--tensor-model-parallel-size", "2"], {"parallel.tensor_model_parallel_size": 2}),
    (["--pipeline-model-parallel-size", "2"], {"parallel.pipeline_model_parallel_size": 2}),
    (["--sequence-parallel"], {"parallel.sequence_parallel": True}),
    (["--num-layers", "3"], {"model.num_layers": 3}), (["--hidden-size", "96"], {"model.hidden_size": 96}),
    (["--ffn-hidden-size", "200"], {"model.ffn_hidden_size": 200}),
    (["--num-attention-heads", "8"], {"model.num_attention_heads": 8}),
    (["--num-query-groups", "2"], {"model.num_query_groups": 2}),
    (["--kv-channels", "16"], {"model.kv_channels": 16}),
    (["--max-position-embeddings", "4096"], {"model.max_position_embeddings": 4096}),
    (["--rotary-base", "1000000"], {"model.rotary_base": 1e6}),
    (["--untie-embeddings-and-output-weights"], {"model.untie_embeddings_and_output_weights": True}),
    (["--init-method-std", "0.01"], {"model.init_method_std": 0.01}),
    (["--attention-dropout", "0.1"], {"model.attention_dropout": 0.1}),
    (["--hidden-dropout", "0.1"], {"model.hidden_dropout": 0.1}),
    (["--norm-epsilon", "1e-5"], {"model.norm_epsilon": 1e-5}),
    (["--bf16"], {"model.bf16": True}),
    (["--recompute-granularity", "full"], {"model.recompute_granularity": "full"}),
    (["--recompute-num-layers", "1"], {"model.recompute_num_layers": 1}),
    (["--seq-length", "128"], {"data.seq_length": 128}),
    (["--split", "90,5,5"], {"data.split": "90,5,5"}),
    (["--tokenizer-type", "SentencePieceTokenizer"], {"data.tokenizer_type": "SentencePieceTokenizer"}),
    (["--tokenizer-model", "tok.json"], {"data.tokenizer_model": "tok.json"}),
    (["--make-vocab-size-divisible-by", "64"], {"data.make_vocab_size_divisible_by": 64}),
    (["--seed", "7"], {"model.seed": 7, "data.seed": 7}),
    (["--micro-batch-size", "4"], {"training.micro_batch_size": 4}),
    (["--global-batch-size", "32"], {"training.global_batch_size": 32}),
    (["--train-iters", "99"], {"training.train_iters": 99}),
    (["--eval-interval", "50"], {"training.eval_interval": 50}), (["--eval-iters", "100"], {"training.eval_iters": 100}),
    (["--exit-interval", "5"], {"training.exit_interval": 5}),
    (["--exit-duration-in-mins", "30"], {"training.exit_duration_in_mins": 30.0}),
    (["--exit-signal-handler"], {"training.exit_signal_handler": True}),
    (["--no-exit-signal-handler"], {"training.exit_signal_handler": False}),
    (["--exit-signal", "SIGUSR1"], {"training.exit_signal": "SIGUSR1"}),
    (["--optimizer", "adam"], {"optimizer.optimizer": "adam"}),
    (["--lr", "1e-4"], {"optimizer.lr": 1e-4}), (["--min-lr", "1e-5"], {"optimizer.min_lr": 1e-5}),
    (["--lr-decay-style", "linear"], {"optimizer.lr_decay_style": "linear"}),
    (["--lr-decay-iters", "8"], {"optimizer.lr_decay_iters": 8}),
    (["--lr-warmup-iters", "2"], {"optimizer.lr_warmup_iters": 2}),
    (["--warmup-iters", "2"], {"optimizer.lr_warmup_iters": 2}),
    (["--lr-warmup-fraction", "0.1"], {"optimizer.lr_warmup_fraction": 0.1}),
    (["--lr-warmup-init", "1e-6"], {"optimizer.lr_warmup_init": 1e-6}),
    (["--lr-wsd-decay-style", "cosine"], {"optimizer.lr_wsd_decay_style": "cosine"}),
    (["--lr-wsd-decay-iters", "3"], {"optimizer.lr_wsd_decay_iters": 3}),
    (["--weight-decay", "0.1"], {"optimizer.weight_decay": 0.1}), (["--clip-grad", "0.5"], {"optimizer.clip_grad": 0.5}),
    (["--adam-beta1", "0.8"], {"optimizer.adam_beta1": 0.8}), (["--adam-beta2", "0.95"], {"optimizer.adam_beta2": 0.95}),
    (["--adam-eps", "1e-6"], {"optimizer.adam_eps": 1e-6}),
    (["--save", "ck"], {"checkpoint.save": "ck"}), (["--load", "ck"], {"checkpoint.load": "ck"}),
    (["--save", "ck", "--save-interval", "5"], {"checkpoint.save": "ck", "checkpoint.save_interval": 5}),
    (["--load", "ck", "--finetune"], {"checkpoint.load": "ck", "checkpoint.finetune": True}),
    (["--no-load-optim"], {"checkpoint.no_load_optim": True}),
    (["--no-load-rng"], {"checkpoint.no_load_rng": True}),
    (["--no-save-optim"], {"checkpoint.no_save_optim": True}),
    (["--log-interval", "1"], {"logging.log_interval": 1}),
    (["--tensorboard-dir", "tb"], {"logging.tensorboard_dir": "tb"}),
    (["--tensorboard-log-dir", "tb"], {"logging.tensorboard_dir": "tb"}),
    (["--log-throughput"], {"logging.log_throughput": True}),
    (["--log-timers-to-tensorboard"], {"logging.log_timers_to_tensorboard": True}),
    (["--log-validation-ppl-to-tensorboard"], {"logging.log_validation_ppl_to_tensorboard": True}),
    # accepted Megatron flags naming what the model is (no field changes)
    (["--normalization", "RMSNorm"], {}), (["--position-embedding-type", "rope"], {}),
    (["--position-embedding-type=rope"], {}), (["--ckpt-format", "torch_dist"], {}),
    (["--recompute-granularity", "full", "--recompute-method", "block"], {"model.recompute_granularity": "full"}),
    (["--distributed-backend", "nccl"], {}), (["--swiglu", "--disable-bias-linear", "--group-query-attention",
                                              "--use-mcore-models", "--use-flash-attn"], {}),
]


def _get(cfg, dotted):
    sec, name = dotted.split(".")
    return getattr(getattr(cfg, sec), name)


@pytest.mark.parametrize("argv,expect", TABLE, ids=[" ".join(a) for a, _ in TABLE])
def test_flag_resolves_to_megatrons_meaning(argv, expect):
    cfg = PretrainRunConfig.from_args(BASE + argv)
    default = PretrainRunConfig.from_args(BASE)
    for key, value in expect.items():
        assert _get(cfg, key) == value, key
    changed = {f"{s}.{k}" for s, d in cfg.to_dict().items() for k, v in d.items() if default.to_dict()[s][k] != v}
    assert changed <= set(expect) | {"training.train_iters"}  # nothing else moved


def test_samples_flags_with_train_samples():
    cfg = PretrainRunConfig.from_args(["--mock-data", "--train-samples", "1000", "--lr-decay-samples", "800",
                                       "--lr-warmup-samples", "64"]).validate()
    assert (cfg.optimizer.lr_decay_samples, cfg.optimizer.lr_warmup_samples) == (800, 64)
    with pytest.raises(ConfigError, match="with --train-iters set the LR schedule in iterations"):
        PretrainRunConfig.from_args(BASE + ["--lr-decay-samples", "800"]).validate()
    with pytest.raises(ConfigError, match="with --train-samples set the LR schedule in samples"):
        PretrainRunConfig.from_args(["--mock-data", "--train-samples", "100", "--lr-decay-iters", "8"]).validate()
    with pytest.raises(ConfigError, match="only one of --lr-warmup-fraction"):
        PretrainRunConfig.from_args(BASE + ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"]).validate()


@pytest.mark.parametrize("argv,match", [
    (["--normalization", "LayerNorm"], "RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "rotary"),
    (["--recompute-method", "uniform"], "'uniform' is not implemented"),
    (["--ckpt-format", "torch"], "torch_dist"),
    (["--normalization"], "needs a value"),
    (["--fp16"], "loss scaling"),
    (["--rampup-batch-size", "16", "8", "1000"], "one global batch size"),
    (["--exit-signal", "SIGINT"], "SIGTERM and SIGUSR1"),
])
def test_unsupported_values_and_flags_are_errors_with_the_reason(argv, match):
    with pytest.raises(ConfigError, match=match):
        PretrainRunConfig.from_args(BASE + argv).validate()


def test_help_gives_description_default_and_megatron_difference():
    text = " ".join(PretrainRunConfig.build_parser().format_help().split())
    for argv, _ in TABLE:
        for a in argv:
            if a.startswith("--"):
                assert a.split("=")[0] in text, a
    assert "decay after warm-up: constant, linear, cosine, wsd, inverse-square-root (default: 'cosine'; " \
           "Megatron's default: 'linear', because DiffuCoder's and Dream's recipes decay with cosine" in text
    assert "(default: 10; Megatron's default: 100, because" in text  # --log-interval
    assert "--no-load-optim load without the optimizer state" in text
    assert "--fp16 refused: fp16 training needs loss scaling" in text
    assert "--print-config print the resolved configuration (YAML) and exit" in text


def test_print_config_prints_the_resolved_yaml_and_exits(capsys, tmp_path):
    from megatron_diffu.pretrain import main

    argv = BASE + ["--lr", "1e-4", "--no-load-optim", "--save", str(tmp_path / "ck"), "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == PretrainRunConfig.from_args(argv).to_dict()
    assert printed["optimizer"]["lr"] == 1e-4 and printed["checkpoint"]["no_load_optim"] is True
    assert not (tmp_path / "ck").exists()  # nothing ran
    assert main(BASE + ["--fp16", "--print-config"]) == 2


def _megatron_lr(num_steps, max_lr, min_lr, warmup_steps, decay_steps, init_lr=0.0):
    """Megatron-core OptimizerParamScheduler.get_lr (cosine), steps counted in whatever unit."""
    if warmup_steps > 0 and num_steps <= warmup_steps:
        return init_lr + (max_lr - init_lr) * float(num_steps) / float(warmup_steps)
    if num_steps > decay_steps:
        return min_lr
    ratio = float(num_steps - warmup_steps) / float(decay_steps - warmup_steps)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


def test_lr_lengths_in_samples_and_as_a_fraction_follow_megatrons_scheduler():
    gbs = 24
    cfg = PretrainRunConfig.from_args(["--mock-data", "--train-samples", "2400", "--lr-decay-samples", "2000",
                                       "--lr-warmup-samples", "100", "--lr", "1e-3", "--min-lr", "1e-5",
                                       "--lr-warmup-init", "1e-6", "--global-batch-size", str(gbs)]).validate()
    sched = LRSchedule.from_config(cfg.optimizer, cfg.resolved_train_iters(1), gbs)
    for i in range(1, 101):  # Megatron counts the sample-based schedule in samples: gbs per step
        assert sched(i) == pytest.approx(_megatron_lr(i * gbs, 1e-3, 1e-5, 100, 2000, 1e-6), rel=1e-12, abs=1e-15)
    frac = PretrainRunConfig.from_args(BASE + ["--train-iters", "200", "--lr-decay-iters", "150",
                                               "--lr-warmup-fraction", "0.1", "--lr", "1e-3"]).validate()
    sched = LRSchedule.from_config(frac.optimizer, 200, 8)
    assert sched.warmup_iters == 15 and sched.decay_iters == 150  # fraction of the decay length, as Megatron
    for i in range(1, 201):
        assert sched(i) == pytest.approx(_megatron_lr(i, 1e-3, 0.0, 15.0, 150), rel=1e-12, abs=1e-15)


def test_exit_duration_in_mins_saves_and_exits(tmp_path):
    from training_helpers import build_trainer, make_stdlib_dataset, tiny_args

    from megatron_diffu.training import checkpointing

    prefix = make_stdlib_dataset(tmp_path)
    trainer = build_trainer(tiny_args(prefix, train_iters=50, extra=[
        "--exit-duration-in-mins", "1e-9", "--save", str(tmp_path / "ck"), "--no-exit-signal-handler"]))
    assert trainer.train() == 0
    assert trainer.iteration == 1  # out of time after the first iteration
    assert checkpointing.resolve_checkpoint_dir(tmp_path / "ck").name == "iter_0000001"
