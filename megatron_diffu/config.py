"""Composite run configs: part dataclasses + YAML (nested by section) + Megatron-style flags.

A run config is a dataclass whose fields are *sections*, each itself a dataclass owned by one
part (`model: TransformerConfig`, `data: DataConfig`, `diffusion: DiffusionConfig`, ...).

    cfg = PretrainConfig.from_args(["--config", "examples/pretrain_tiny_cpu.yaml", "--lr", "3e-4"])
    cfg.validate(world_size=4)      # once at start-up; raises ConfigError listing every problem

Rules:
- Every field of every section gets a flag derived from its name (`micro_batch_size` ->
  `--micro-batch-size`); booleans take `--x` / `--no-x`; lists take several values
  (`--data-path 0.7 a 0.3 b`); `--x none` sets an Optional field to None.
- `--config FILE.yaml` loads YAML nested by section; flags override it. Unknown YAML keys and
  unknown flags are errors with a did-you-mean.
- A field name used by several sections (`seed`, `seq_length`...) is ONE flag that sets all of
  them; in YAML set it in any one section (it is copied to the others; conflicting explicit
  values are an error).
- `ALIASES`: Megatron flag spellings that differ from our field names.
- `model: {preset: tiny, ...}` / `--model-preset tiny`: start from a TransformerConfig preset,
  then apply the explicitly set model fields.
- Extending (SFT/GRPO): subclass `RunConfig` (or `PretrainConfig`) and add a section field whose
  default_factory is a dataclass; its fields get flags automatically. Override
  `validate_extra(world_size) -> list[str]` for stage-specific cross-checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from megatron_diffu.diffusion.objective import DiffusionConfig
from megatron_diffu.model.config import PRESETS, TransformerConfig

try:  # owned by the data engineer; DESIGN.md: data/config.py
    from megatron_diffu.data.config import DataConfig  # type: ignore
except ImportError:  # pragma: no cover - only while the data part is not there yet
    @dataclass
    class DataConfig:  # type: ignore[no-redef]
        data_path: list[str] = field(default_factory=list)
        split: str = "969,30,1"
        seq_length: int = 128
        tokenizer_type: str = "QwenTokenizer"
        tokenizer_model: Optional[str] = None
        seed: int = 1234


class ConfigError(ValueError):
    """A configuration problem; the message names the field/flag/file and the fix."""


# ------------------------------------------------------------------------------------ sections
@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    pipeline_model_parallel_split: Optional[list[int]] = None  # layers per stage; None = even split

    def validate(self) -> list[str]:
        e = []
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            e.append("parallel: --tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.pipeline_model_parallel_split is not None and \
                len(self.pipeline_model_parallel_split) != self.pipeline_model_parallel_size:
            e.append(f"parallel.pipeline_model_parallel_split={self.pipeline_model_parallel_split} needs "
                     f"{self.pipeline_model_parallel_size} entries (one per pipeline stage)")
        return e


LR_DECAY_STYLES = ("constant", "linear", "cosine", "wsd", "inverse-square-root")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"  # AdamW (decoupled weight decay), Megatron's --optimizer adam
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_wsd_decay_style: str = "linear"
    lr_wsd_decay_iters: Optional[int] = None  # WSD: length of the final decay phase
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping

    def validate(self) -> list[str]:
        e = []
        if self.optimizer != "adam":
            e.append(f"optimizer.optimizer={self.optimizer!r}: only 'adam' (AdamW) is implemented")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            e.append(f"optimizer.lr_decay_style={self.lr_decay_style!r}: choose one of {LR_DECAY_STYLES}")
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            e.append(f"optimizer.lr_wsd_decay_style={self.lr_wsd_decay_style!r}: choose one of {WSD_DECAY_STYLES}")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            e.append(f"optimizer: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.lr_warmup_iters < 0:
            e.append(f"optimizer.lr_warmup_iters={self.lr_warmup_iters} must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_eps <= 0:
            e.append("optimizer: adam_beta1/adam_beta2 must be in [0, 1) and adam_eps > 0")
        if self.clip_grad < 0 or self.weight_decay < 0:
            e.append("optimizer: clip_grad and weight_decay must be >= 0")
        return e


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro_batch_size * data-parallel size
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None  # alternative to train_iters (converted at start-up)
    eval_interval: int = 1000  # 0 disables validation
    eval_iters: int = 10  # validation micro-batch rounds per evaluation
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1 -> checkpoint then exit (training/signals.py)
    exit_interval: Optional[int] = None  # stop after this iteration (saving first)
    max_skipped_steps: int = 10  # consecutive non-finite steps before giving up
    empty_unused_memory_level: int = 0

    def validate(self) -> list[str]:
        e = []
        if self.micro_batch_size < 1:
            e.append(f"training.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.train_iters is None and self.train_samples is None:
            e.append("training: set --train-iters or --train-samples")
        if self.train_iters is not None and self.train_samples is not None:
            e.append("training: set only one of --train-iters and --train-samples")
        if self.eval_interval < 0 or self.eval_iters < 0 or self.max_skipped_steps < 1:
            e.append("training: eval_interval, eval_iters must be >= 0 and max_skipped_steps >= 1")
        return e


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: Optional[int] = 3  # None: keep every checkpoint
    finetune: bool = False  # load model weights only; iteration/optimizer/data position restart
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False

    def validate(self) -> list[str]:
        e = []
        if self.save_interval is not None and self.save_interval < 1:
            e.append(f"checkpoint.save_interval={self.save_interval} must be >= 1")
        if self.save_interval is not None and not self.save:
            e.append("checkpoint: --save-interval needs --save DIR")
        if self.keep_last is not None and self.keep_last < 1:
            e.append(f"checkpoint.keep_last={self.keep_last} must be >= 1 (or none to keep all)")
        if self.finetune and not self.load:
            e.append("checkpoint: --finetune needs --load DIR (the checkpoint to start from)")
        return e


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    log_file: Optional[str] = None  # also append the log lines (rank 0) to this file; JSONL metrics beside it
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: measured (CPU) / known (GPU)

    def validate(self) -> list[str]:
        return [] if self.log_interval >= 1 else [f"logging.log_interval={self.log_interval} must be >= 1"]


# ------------------------------------------------------------------------------------ composite
ALIASES: dict[str, str] = {
    # Megatron flag -> our field's flag
    "--tensor-parallel-size": "--tensor-model-parallel-size",
    "--pipeline-parallel-size": "--pipeline-model-parallel-size",
    "--warmup-iters": "--lr-warmup-iters",
    "--lr-decay-samples": "--lr-decay-iters",
    "--save-retain-interval": "--keep-last",
    "--exit-signal": "--exit-signal-handler",
    "--tensorboard-log-dir": "--tensorboard-dir",
}
# accepted for Megatron compatibility, with no effect (documented): they name what we always do
ACCEPTED_NOOP_FLAGS = {"--swiglu": 0, "--normalization": 1, "--position-embedding-type": 1,
                       "--disable-bias-linear": 0, "--add-qkv-bias": 0, "--group-query-attention": 0,
                       "--ckpt-format": 1, "--use-mcore-models": 0, "--no-masked-softmax-fusion": 0,
                       "--distributed-backend": 1, "--use-flash-attn": 0}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_scalar(kind: Any, text: str, what: str) -> Any:
    if kind is bool:
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what}: expected true/false, got {text!r}")
    try:
        if kind is int:
            f = float(text)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if kind is float:
            return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected {kind.__name__}, got {text!r}") from None
    return text if kind in (str, Any) else kind(text)


def coerce(value: Any, tp: Any, what: str) -> Any:
    """Convert a YAML/flag value to the annotated type, with an error naming `what`."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ConfigError(f"{what}: may not be null")
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple, Sequence, typing.Sequence):
        (item,) = typing.get_args(base)[:1] or (Any,)
        items = value if isinstance(value, (list, tuple)) else str(value).split()
        return [coerce(v, item, f"{what}[{i}]") for i, v in enumerate(items)]
    if base is Any:
        return value
    if isinstance(value, str) or base is bool:
        return _parse_scalar(base, value, what) if not isinstance(value, bool) or base is not bool else value
    if base is float and isinstance(value, (int, float)):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base in (int, float, str) and not isinstance(value, base):
        raise ConfigError(f"{what}: expected {base.__name__}, got {value!r}")
    return value


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class RunConfig:
    """Base of the stage configs: iterate `sections()`; fields of sections get flags."""

    explicit: set = field(default_factory=set, repr=False, compare=False)  # {"section.field"} set by the user

    # -------------------------------------------------------------- structure
    @classmethod
    def section_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if f.name != "explicit" and dataclasses.is_dataclass(hints[f.name])}

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.section_types()}

    @classmethod
    def field_index(cls) -> dict[str, list[tuple[str, str, Any]]]:
        """flag -> [(section, field, type)] (several sections for a shared field name)."""
        index: dict[str, list[tuple[str, str, Any]]] = {}
        for sec, sec_type in cls.section_types().items():
            hints = typing.get_type_hints(sec_type)
            for f in dataclasses.fields(sec_type):
                if f.name.startswith("_"):
                    continue
                index.setdefault(_flag(f.name), []).append((sec, f.name, hints[f.name]))
        return index

    # -------------------------------------------------------------- loading
    @classmethod
    def from_args(cls, argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None):
        """`--config FILE.yaml` + flags (flags win). `defaults`: a nested dict applied first."""
        import sys
        argv = list(sys.argv[1:] if argv is None else argv)
        config_file, rest = _pop_config_flag(argv)
        values: dict[str, dict[str, Any]] = {}
        if defaults:
            _merge(values, defaults)
        if config_file:
            _merge(values, load_yaml(config_file, cls))
        _merge(values, cls._parse_flags(rest))
        return cls.from_dict(values, source=config_file or "flags")

    @classmethod
    def from_yaml(cls, path: str | Path):
        return cls.from_dict(load_yaml(path, cls), source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]], source: str = "dict"):
        """Build from a nested {section: {field: value}} dict (values coerced, names checked)."""
        types = cls.section_types()
        index = cls.field_index()
        kwargs, explicit = {}, set()
        shared: dict[str, tuple[str, Any]] = {}
        for sec, sec_type in types.items():
            given = dict(values.get(sec) or {})
            preset = given.pop("preset", None) if sec == "model" else None
            hints = typing.get_type_hints(sec_type)
            known = {f.name for f in dataclasses.fields(sec_type)}
            for key in given:
                if key not in known:
                    raise ConfigError(f"{source}: unknown key {sec}.{key}{_suggest(key, sorted(known))}; "
                                      f"valid keys of '{sec}': {sorted(known)}")
            parsed = {k: coerce(v, hints[k], f"{source}: {sec}.{k}") for k, v in given.items()}
            for k, v in parsed.items():
                explicit.add(f"{sec}.{k}")
                if len(index[_flag(k)]) > 1:
                    if k in shared and shared[k][1] != v:
                        raise ConfigError(f"{source}: {k} is set to {shared[k][1]!r} in '{shared[k][0]}' and {v!r} "
                                          f"in '{sec}'; it is one setting (--{k.replace('_', '-')}): set it once")
                    shared[k] = (sec, v)
            if preset is not None:
                if preset not in PRESETS:
                    raise ConfigError(f"{source}: model.preset={preset!r} is not a preset{_suggest(str(preset), sorted(PRESETS))}; "
                                      f"choose one of {sorted(PRESETS)}")
                parsed = {**PRESETS[preset], **parsed}
            kwargs[sec] = parsed
        for k, (sec, v) in shared.items():  # a shared field set anywhere applies to every section
            for s, name, _ in index[_flag(k)]:
                kwargs[s].setdefault(name, v)
                explicit.add(f"{s}.{name}")
        unknown_sections = sorted(set(values) - set(types))
        if unknown_sections:
            s = unknown_sections[0]
            raise ConfigError(f"{source}: unknown section {s!r}{_suggest(s, sorted(types))}; sections: {sorted(types)}")
        built = {sec: types[sec](**kwargs[sec]) for sec in types}
        return cls(explicit=explicit, **built)

    @classmethod
    def _parse_flags(cls, argv: list[str]) -> dict[str, dict[str, Any]]:
        index = cls.field_index()
        parser = argparse.ArgumentParser(prog=f"megatron_diffu ({cls.__name__})", allow_abbrev=False, add_help=True)
        for flag, targets in index.items():
            base, _ = _strip_optional(targets[0][2])
            dest = flag[2:].replace("-", "_")
            helptext = "sets " + ", ".join(f"{s}.{n}" for s, n, _ in targets)
            if base is bool:
                parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            elif typing.get_origin(base) in (list, tuple):
                parser.add_argument(flag, dest=dest, nargs="+", default=None, help=helptext)
            else:
                parser.add_argument(flag, dest=dest, default=None, help=helptext)
        parser.add_argument("--model-preset", dest="model_preset", default=None, help=f"one of {sorted(PRESETS)}")
        for alias, target in ALIASES.items():
            if target in index:
                parser.add_argument(alias, dest=target[2:].replace("-", "_"), default=argparse.SUPPRESS,
                                    nargs="+" if typing.get_origin(_strip_optional(index[target][0][2])[0]) in (list, tuple) else None,
                                    help=f"alias of {target}")
        argv = _drop_noop_flags(argv)
        ns, unknown = parser.parse_known_args(argv)
        if unknown:
            bad = [u for u in unknown if u.startswith("--")] or unknown
            known = sorted(list(index) + list(ALIASES) + ["--config", "--model-preset"])
            flag = bad[0].split("=")[0]
            raise ConfigError(f"unknown flag {flag}{_suggest(flag, known)} (run with --help for the list)")
        out: dict[str, dict[str, Any]] = {}
        for flag, targets in index.items():
            v = getattr(ns, flag[2:].replace("-", "_"), None)
            if v is None:
                continue
            for sec, name, tp in targets:
                out.setdefault(sec, {})[name] = coerce(v, tp, f"flag {flag}")
        if ns.model_preset:
            out.setdefault("model", {})["preset"] = ns.model_preset
        return out

    # -------------------------------------------------------------- output
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(sec) for name, sec in self.sections().items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str | Path) -> None:
        import os
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    def is_explicit(self, section: str, name: str) -> bool:
        return f"{section}.{name}" in self.explicit

    # -------------------------------------------------------------- validation
    def validate(self, world_size: int = 1) -> "RunConfig":
        """One pass over every section and the cross-section rules; raises ConfigError with all problems."""
        errors: list[str] = []
        for name, sec in self.sections().items():
            v = getattr(sec, "validate", None)
            if v is None:
                continue
            if isinstance(sec, TransformerConfig):
                try:
                    sec.validate(self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size)
                except ValueError as exc:
                    errors.append(str(exc))
                continue
            try:
                got = v()
            except (ValueError, TypeError) as exc:
                got = [str(exc)]
            errors.extend(got if isinstance(got, list) else [])
        errors.extend(self.validate_extra(world_size))
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self

    def validate_extra(self, world_size: int) -> list[str]:
        """Cross-section checks; subclasses extend (call super)."""
        return []


def _pop_config_flag(argv: list[str]) -> tuple[Optional[str], list[str]]:
    out, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return path, out


def _drop_noop_flags(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=")[0]
        if name in ACCEPTED_NOOP_FLAGS:
            i += 1 + (ACCEPTED_NOOP_FLAGS[name] if "=" not in argv[i] else 0)
            continue
        out.append(argv[i])
        i += 1
    return out


def _merge(into: dict, new: dict) -> None:
    for sec, vals in new.items():
        into.setdefault(sec, {}).update(vals or {})


def load_yaml(path: str | Path, cls: type = None) -> dict[str, dict[str, Any]]:
    """Read a sectioned YAML config; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or any(not isinstance(v, (dict, type(None))) for v in data.values()):
        raise ConfigError(f"{path}: expected sections (model:, parallel:, data:, ...) each holding key: value pairs")
    if cls is not None:
        types = cls.section_types()
        for sec in data:
            if sec not in types:
                raise ConfigError(f"{path}: unknown section {sec!r}{_suggest(sec, sorted(types))}; sections: {sorted(types)}")
    return {k: dict(v or {}) for k, v in data.items()}


# ------------------------------------------------------------------------------------ stages
@dataclass
class PretrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=TransformerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        return max(1, world_size // max(1, mp))

    def resolved_global_batch_size(self, world_size: int) -> int:
        t = self.training
        return t.global_batch_size or t.micro_batch_size * self.data_parallel_size(world_size)

    def num_micro_batches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.resolved_global_batch_size(world_size) // (self.training.micro_batch_size * dp)

    def resolved_train_iters(self, world_size: int) -> int:
        t = self.training
        if t.train_iters is not None:
            return int(t.train_iters)
        gbs = self.resolved_global_batch_size(world_size)
        return -(-int(t.train_samples or 0) // gbs)

    def validate_extra(self, world_size: int) -> list[str]:
        e = super().validate_extra(world_size)
        p, t = self.parallel, self.training
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % mp:
            e.append(f"world size {world_size} is not divisible by tensor_model_parallel_size * "
                     f"pipeline_model_parallel_size = {mp}: launch a multiple of {mp} processes")
            return e
        dp = world_size // mp
        gbs = self.resolved_global_batch_size(world_size)
        if gbs % (t.micro_batch_size * dp):
            e.append(f"training.global_batch_size={gbs} is not divisible by micro_batch_size * data-parallel size "
                     f"= {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp}: use a multiple of "
                     f"{t.micro_batch_size * dp} (e.g. --global-batch-size {max(1, gbs // (t.micro_batch_size * dp)) * t.micro_batch_size * dp})")
        seq = getattr(self.data, "seq_length", None)
        if seq is not None and seq > self.model.max_position_embeddings:
            e.append(f"data.seq_length={seq} exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
        if p.sequence_parallel and seq is not None and seq % p.tensor_model_parallel_size:
            e.append(f"--sequence-parallel needs seq_length ({seq}) divisible by tensor_model_parallel_size "
                     f"({p.tensor_model_parallel_size})")
        return e
