"""Run configs: section dataclasses + YAML (nested by section) + Megatron-style flags.

This module is the generic machinery and imports no part of the package: each part owns its
section dataclass (`model/config.py: TransformerConfig`, `parallel/config.py: ParallelConfig`,
`data/config.py: DataConfig`, `diffusion/objective.py: DiffusionConfig`, `training/*`: optimizer,
training, checkpoint, logging) and each stage composes the sections it uses into a run config
(`stages/diffusion/config.py: PretrainRunConfig, SFTRunConfig`, `stages/grpo/config.py: GRPORunConfig`).

    cfg = PretrainRunConfig.from_args(["--config", "examples/pretrain_tiny_cpu.yaml", "--lr", "3e-4"])
    cfg.validate(world_size=4)      # once at start-up; raises ConfigError listing every problem

Rules:
- One validation contract (`SectionConfig`): a section's `problems() -> list[str]` lists what is
  wrong (never raises); `validate()` raises ConfigError with all of them and returns the section.
- Every field of every section gets a flag derived from its name (`micro_batch_size` ->
  `--micro-batch-size`); booleans take `--x` / `--no-x`; lists take several values
  (`--data-path 0.7 a 0.3 b`); `--x none` sets an Optional field to None.
- `--config FILE.yaml` loads YAML nested by section; flags override it. Unknown YAML keys and
  unknown flags are errors with a did-you-mean.
- A field name used by several sections (`seed`, `seq_length`...) is ONE flag that sets all of
  them; in YAML set it in any one section (it is copied to the others; conflicting explicit
  values are an error).
- `ALIASES`: Megatron flag spellings that differ from our field names.
- Presets: a section type with a `PRESETS` class attribute (TransformerConfig) accepts
  `model: {preset: tiny, ...}` / `--model-preset tiny`: start from the preset, then apply the
  explicitly set fields.
- A run config subclasses `RunConfig` with one field per section (default_factory = the section
  dataclass) and overrides `cross_section_problems(world_size)` for rules spanning sections.
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

from megatron_diffu.common.atomic import atomic_write_text

class ConfigError(ValueError):
    """A configuration problem; the message names the field/flag/file and the fix."""


class SectionConfig:
    """The one validation contract of every config dataclass of the package.

    `problems(*context) -> list[str]`: every problem found, each naming the field and the fix
    (empty when fine; never raises). `validate(*context) -> self`: raises ConfigError listing
    them all. A run config's `validate` collects the `problems` of all its sections at once.
    """

    def problems(self, *context: Any, **named: Any) -> list[str]:
        return []

    def validate(self, *context: Any, **named: Any):
        errors = self.problems(*context, **named)
        if errors:
            raise ConfigError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(errors))
        return self


# ------------------------------------------------------------------------------------ composite
ALIASES: dict[str, str] = {
    # Megatron flag -> our field's flag (same meaning; only the spelling differs)
    "--tensor-parallel-size": "--tensor-model-parallel-size",
    "--pipeline-parallel-size": "--pipeline-model-parallel-size",
    "--warmup-iters": "--lr-warmup-iters",
    "--tensorboard-log-dir": "--tensorboard-dir",
}
# accepted for Megatron compatibility, with no effect (documented): they name what we always do
ACCEPTED_NOOP_FLAGS = {"--swiglu": 0, "--disable-bias-linear": 0, "--add-qkv-bias": 0, "--group-query-attention": 0,
                       "--use-mcore-models": 0, "--no-masked-softmax-fusion": 0, "--use-flash-attn": 0}
# Megatron value flags that pick what our one architecture/format is: the value must be that one
NOOP_VALUE_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "--normalization": (("RMSNorm",), "the model is Qwen2.5/Dream: RMSNorm (LayerNorm is not implemented)"),
    "--position-embedding-type": (("rope",), "the model is Qwen2.5/Dream: rotary embeddings (--rotary-base sets theta)"),
    "--ckpt-format": (("torch_dist",), "checkpoints are torch.distributed.checkpoint (Megatron's torch_dist)"),
    "--distributed-backend": (("nccl", "gloo"), "NCCL on GPUs, gloo on CPU, chosen by the device"),
    "--recompute-method": (("block",), "--recompute-granularity full recomputes the first --recompute-num-layers "
                                       "layers of each stage (Megatron's 'block'); 'uniform' is not implemented"),
}
# Megatron flags we refuse, with the reason (an error, never silently ignored): flag -> (values, reason)
REFUSED_FLAGS: dict[str, tuple[int, str]] = {
    "--fp16": (0, "fp16 training needs loss scaling, which is not implemented; use --bf16 (what DiffuCoder and "
                  "Dream train in) or fp32"),
    "--rampup-batch-size": (3, "the data order and exact resume assume one global batch size for the whole run; "
                               "DiffuCoder/Dream use none: set a constant --global-batch-size"),
}
PRINT_CONFIG_FLAG = "--print-config"


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
            presets = _presets_of(sec_type)
            preset = given.pop("preset", None) if presets else None
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
                if preset not in presets:
                    raise ConfigError(f"{source}: {sec}.preset={preset!r} is not a preset{_suggest(str(preset), sorted(presets))}; "
                                      f"choose one of {sorted(presets)}")
                parsed = {**presets[preset], **parsed}
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
    def flag_docs(cls) -> dict[str, tuple[str, Optional[tuple[Any, str]]]]:
        """field name -> (description, (Megatron's default, why ours differs) or None), from each section
        type's `FLAG_HELP` / `MEGATRON_DEFAULTS` class attributes and the run config's `EXTRA_FLAG_HELP`."""
        docs: dict[str, tuple[str, Optional[tuple[Any, str]]]] = {}
        for sec_type in cls.section_types().values():
            helps = dict(getattr(sec_type, "FLAG_HELP", None) or {})
            megatron = dict(getattr(sec_type, "MEGATRON_DEFAULTS", None) or {})
            for name in set(helps) | set(megatron):
                docs.setdefault(name, (helps.get(name, ""), megatron.get(name)))
        for name, text in (getattr(cls, "EXTRA_FLAG_HELP", None) or {}).items():
            docs.setdefault(name, (text, None))
        return docs

    @classmethod
    def _help_text(cls, targets: list, docs: dict) -> str:
        sec, name, _ = targets[0]
        desc, megatron = docs.get(name, ("", None))
        default = _field_default(cls.section_types()[sec], name)
        text = (desc + " " if desc else "") + f"(default: {default!r}"
        if megatron is not None:
            text += f"; Megatron's default: {megatron[0]!r}, because {megatron[1]}"
        text += "; sets " + ", ".join(f"{s}.{n}" for s, n, _ in targets) + ")"
        return text.replace("%", "%%")

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """The flag parser (also what --help prints: each flag's description, default, Megatron's default
        where ours differs and why, the section field it sets)."""
        index = cls.field_index()
        docs = cls.flag_docs()
        parser = argparse.ArgumentParser(prog=f"megatron_diffu ({cls.__name__})", allow_abbrev=False, add_help=True,
                                         description="Megatron-style flags; every flag is also a YAML key "
                                                     "(--config FILE.yaml), flags win.")
        parser.add_argument("--config", metavar="FILE.yaml", help="YAML config nested by section; flags override it")
        parser.add_argument(PRINT_CONFIG_FLAG, action="store_true",
                            help="print the resolved configuration (YAML) and exit")
        for flag, targets in index.items():
            base, _ = _strip_optional(targets[0][2])
            dest = flag[2:].replace("-", "_")
            helptext = cls._help_text(targets, docs)
            if base is bool and targets[0][1].startswith("no_"):  # Megatron's --no-load-optim etc.: set-only
                parser.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=helptext)
            elif base is bool:
                parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            elif typing.get_origin(base) in (list, tuple):
                parser.add_argument(flag, dest=dest, nargs="+", default=None, help=helptext)
            else:
                parser.add_argument(flag, dest=dest, default=None, help=helptext)
        preset_sections = {sec: _presets_of(t) for sec, t in cls.section_types().items() if _presets_of(t)}
        for sec, presets in preset_sections.items():
            parser.add_argument(f"--{sec}-preset", dest=f"{sec}_preset", default=None, help=f"one of {sorted(presets)}")
        for alias, target in ALIASES.items():
            if target in index:
                parser.add_argument(alias, dest=target[2:].replace("-", "_"), default=argparse.SUPPRESS,
                                    nargs="+" if typing.get_origin(_strip_optional(index[target][0][2])[0]) in (list, tuple) else None,
                                    help=f"alias of {target}")
        for flag, nargs in ACCEPTED_NOOP_FLAGS.items():
            if flag in parser._option_string_actions:  # noqa: SLF001 - a field of that name: dropped before parsing
                continue
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                help="accepted for Megatron compatibility: it names what this model always does")
        for flag, (allowed, reason) in NOOP_VALUE_FLAGS.items():
            parser.add_argument(flag, choices=allowed, default=argparse.SUPPRESS,
                                help=f"accepted only as {'/'.join(allowed)}: {reason}".replace("%", "%%"))
        for flag, (nargs, reason) in REFUSED_FLAGS.items():
            kind = {"action": "store_true"} if not nargs else {"nargs": nargs}
            parser.add_argument(flag, default=argparse.SUPPRESS, help=f"refused: {reason}".replace("%", "%%"), **kind)
        return parser

    @classmethod
    def _parse_flags(cls, argv: list[str]) -> dict[str, dict[str, Any]]:
        index = cls.field_index()
        preset_sections = {sec: _presets_of(t) for sec, t in cls.section_types().items() if _presets_of(t)}
        parser = cls.build_parser()
        argv = _drop_noop_flags([a for a in argv if a != PRINT_CONFIG_FLAG])
        ns, unknown = parser.parse_known_args(argv)
        if unknown:
            bad = [u for u in unknown if u.startswith("--")] or unknown
            known = sorted(list(index) + list(ALIASES) + ["--config"] + [f"--{s}-preset" for s in preset_sections])
            flag = bad[0].split("=")[0]
            raise ConfigError(f"unknown flag {flag}{_suggest(flag, known)} (run with --help for the list)")
        out: dict[str, dict[str, Any]] = {}
        for flag, targets in index.items():
            v = getattr(ns, flag[2:].replace("-", "_"), None)
            if v is None:
                continue
            for sec, name, tp in targets:
                out.setdefault(sec, {})[name] = coerce(v, tp, f"flag {flag}")
        for sec in preset_sections:
            if getattr(ns, f"{sec}_preset"):
                out.setdefault(sec, {})["preset"] = getattr(ns, f"{sec}_preset")
        return out

    # -------------------------------------------------------------- output
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(sec) for name, sec in self.sections().items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    def is_explicit(self, section: str, name: str) -> bool:
        return f"{section}.{name}" in self.explicit

    # -------------------------------------------------------------- validation
    def validate(self, world_size: int = 1) -> "RunConfig":
        """One pass over every section's `problems()` and the cross-section rules; raises
        ConfigError listing every problem."""
        errors: list[str] = []
        for name, sec in self.sections().items():
            if isinstance(sec, SectionConfig):
                errors.extend(sec.problems(**self.section_context(name, world_size)))
        errors.extend(self.cross_section_problems(world_size))
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self

    def section_context(self, name: str, world_size: int) -> dict[str, Any]:
        """Keyword arguments for section `name`'s `problems()` (e.g. the model's TP/PP sizes)."""
        return {}

    def cross_section_problems(self, world_size: int) -> list[str]:
        """Rules that involve several sections; run configs extend (call super)."""
        return []


def _presets_of(section_type: type) -> dict[str, dict[str, Any]]:
    """A section type may offer named starting points: a class attribute `PRESETS` {name: {field: value}}."""
    return dict(getattr(section_type, "PRESETS", None) or {})


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


def _field_default(section_type: type, name: str) -> Any:
    for f in dataclasses.fields(section_type):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def _drop_noop_flags(argv: list[str]) -> list[str]:
    """Remove the accepted no-op flags; check the value flags (NOOP_VALUE_FLAGS) and refuse REFUSED_FLAGS,
    each error naming the flag and the reason."""
    out, i = [], 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name in REFUSED_FLAGS:
            raise ConfigError(f"{name} is not supported: {REFUSED_FLAGS[name][1]}")
        if name in NOOP_VALUE_FLAGS:
            allowed, reason = NOOP_VALUE_FLAGS[name]
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"{name} needs a value ({'/'.join(allowed)})")
            if value not in allowed:
                raise ConfigError(f"{name} {value}: not supported: {reason}; accepted: {'/'.join(allowed)}")
            i += 1 if eq else 2
            continue
        if name in ACCEPTED_NOOP_FLAGS:
            i += 1 + (ACCEPTED_NOOP_FLAGS[name] if not eq else 0)
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
