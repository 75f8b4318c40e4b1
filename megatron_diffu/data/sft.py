"""Instruction-tuning data: conversations -> ChatML tokens + response mask -> padded/packed batches.

docs/ALGORITHMS.md sec. 3. Pipeline:

1. `parse_record` normalises one JSONL record (`messages` with system/user/assistant roles, or
   `prompt`/`response` [+ `system`]) and `tokenize_conversation` turns it into Qwen ChatML ids
   with a parallel response mask: every assistant turn's content *and its <|im_end|>* is response;
   role headers, user/system turns and the "\\n" after every <|im_end|> are prompt. The trailing
   "\\n" after the last assistant turn is dropped so that padding follows <|im_end|> directly (the
   generated region at inference is exactly: response, <|im_end|>, padding).
2. Storage: two megatron-core indexed datasets with identical sequence lengths, one sequence
   (and one document) per conversation:
       PREFIX_sft_document.{bin,idx}        token ids (int32)
       PREFIX_sft_response_mask.{bin,idx}   uint8, 1 = response token
   Both are plain `megatron.core.datasets.indexed_dataset.IndexedDataset`s.
3. `SFTDataset` maps a global sample index to a row: one conversation, or with packing several
   short conversations (a greedy plan over a seeded shuffle, fixed for the run). The row order is
   reshuffled every epoch from (seed, epoch). Everything is a function of (seed, sample index).
4. `SFTCollator` pads rows to a fixed (`seq_length`) or bucketed length with the pad token.
   Padding after the response is maskable and counted (the model learns where to stop). Options:
   `sft_response_cutoff` (padding beyond the micro-batch's longest conversation is cut: not
   attended, not maskable, dropped in bucketed mode) and `sft_tail_cut_prob` (with that
   probability a micro-batch keeps only a random amount of its trailing padding), both keyed by
   (seed, first sample index of the micro-batch); with buckets a cut micro-batch is materialised
   up to a multiple of `sft_cut_length_multiple` (default 16: a few shapes, not one per length). Packed rows get a [B, 1, S, S] block-diagonal
   attention mask, position ids restarting at 0 per conversation and `segment_ids`. Each packed
   conversation is followed by `sft_pack_pad_tokens` pad tokens in its own segment, maskable and
   counted, like the padding after an unpacked response (the packing plan reserves them); 0 is
   the earlier layout (no padding learned between packed conversations). The fill padding at the
   end of a packed row is its own segment and is not maskable (a pad block with no conversation
   teaches nothing about stopping).

The micro-batch dict follows DESIGN.md ("Micro-batches"): `tokens`, `sample_index`, `maskable`,
optional `attention_mask`, `position_ids`, `segment_ids`; plus `response_mask` (the response
tokens proper, without padding) for metrics.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_diffu.common.atomic import AtomicFiles
from megatron_diffu.data.preprocess import InputError, _open_maybe_gz
from megatron_diffu.config import SectionConfig

# Purposes of the data-side random streams (numpy SeedSequence entropy: (seed, key, purpose)).
_PACK_ORDER, _EPOCH_SHUFFLE, _VALID_SPLIT, _TAIL_CUT = 1, 2, 3, 4


def _rng(seed: int, key: int, purpose: int) -> np.random.Generator:
    """A generator keyed by (seed, key, purpose) only: no global RNG, same on every rank/resume."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(key) & 0xFFFFFFFFFFFF, purpose])

TOKENS_SUFFIX = "_sft_document"
MASK_SUFFIX = "_sft_response_mask"
ROLES = ("system", "user", "assistant")


class BadRecord(InputError):
    """A JSONL record that cannot become a training conversation; the message names file:line."""


# ------------------------------------------------------------------------------------- records
def parse_record(obj: Any, where: str) -> list[dict[str, str]]:
    """Normalise one record to a list of {role, content} messages ending with an assistant turn."""
    if not isinstance(obj, Mapping):
        raise BadRecord(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRecord(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRecord(f"{where}: messages[{i}] must be an object with string fields 'role' and 'content'")
            if m["role"] not in ROLES:
                raise BadRecord(f"{where}: messages[{i}].role={m['role']!r}; use one of {ROLES}")
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in obj and "response" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
            raise BadRecord(f"{where}: fields 'prompt' and 'response' must be strings")
        out = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
        if isinstance(obj.get("system"), str):
            out.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise BadRecord(f"{where}: needs a 'messages' list or 'prompt' + 'response' strings (got keys {sorted(obj)[:8]})")
    if out[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: the conversation must end with an assistant turn (nothing to learn after it)")
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_conversation(tokenizer, messages: Sequence[Mapping[str, str]], verify: bool = False
                          ) -> tuple[list[int], list[int]]:
    """ChatML ids and the response mask (1 = assistant content + its <|im_end|>).

    The ids are the tokenizer's own `apply_chat_template`, applied one message at a time (Qwen
    ChatML encodes every message on its own, so the concatenation is the conversation's template:
    one template call per message instead of one per prefix, ~6x faster). In an assistant
    message the response starts where the message's ids stop matching the generation prompt
    (`<|im_start|>assistant\n`) and ends at its <|im_end|>. `verify=True` checks the
    concatenation against the template of the whole conversation (preprocessing does so for its
    first records, so a template that is not per-message fails loudly instead of silently).
    """
    gen = tokenizer.apply_chat_template([], add_generation_prompt=True)
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        part = tokenizer.apply_chat_template([m], add_generation_prompt=False)
        pmask = [0] * len(part)
        if m["role"] == "assistant":
            start = _common_prefix(gen, part)
            end = len(part) - 1
            while end >= start and part[end] != tokenizer.im_end_id:
                end -= 1
            for j in range(start, end + 1):
                pmask[j] = 1
        ids.extend(part)
        mask.extend(pmask)
    if verify:
        whole = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False)
        if whole != ids:
            raise ValueError("the tokenizer's chat template is not a per-message concatenation (a default system "
                             "prompt?): tokenize_conversation cannot locate the responses; add the system message "
                             "to the data explicitly")
    # drop the "\n" after the final <|im_end|>: padding (maskable) follows the end marker directly
    last = len(ids) - 1
    while last >= 0 and ids[last] != tokenizer.im_end_id:
        last -= 1
    return ids[: last + 1], mask[: last + 1]


# ------------------------------------------------------------------------------------- storage
def sft_paths(prefix: str) -> tuple[str, str]:
    """(tokens prefix, response-mask prefix) of an SFT dataset written with `--output-prefix prefix`."""
    return prefix + TOKENS_SUFFIX, prefix + MASK_SUFFIX


class SFTWriter:
    """Writes the two indexed datasets to temporary names; `commit()` moves them into place.

    `common.atomic.AtomicFiles`: an interrupted run leaves no half-written PREFIX_sft_* files, and
    the old `.idx` files are removed before the new `.bin` files arrive (the indexes move last), so
    no moment pairs an old index with new data.
    """

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.final = sft_paths(prefix)
        bins, idxs = [p + ".bin" for p in self.final], [p + ".idx" for p in self.final]
        self.files = AtomicFiles(bins + idxs, indexes=idxs)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
        self.tok = IndexedDatasetBuilder(str(self.files.temps[0]), dtype=np.int32)
        self.msk = IndexedDatasetBuilder(str(self.files.temps[1]), dtype=np.uint8)
        self.count = 0
        self.tokens = 0

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> None:
        if len(ids) != len(mask):
            raise ValueError(f"token ids ({len(ids)}) and response mask ({len(mask)}) differ in length")
        self.tok.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        self.msk.add_document(torch.tensor(mask, dtype=torch.uint8), [len(mask)])
        self.count += 1
        self.tokens += len(ids)

    def commit(self) -> None:
        for tmp_idx, builder in zip(self.files.temps[2:], (self.tok, self.msk)):
            builder.finalize(str(tmp_idx))
        self.files.commit()

    def abort(self) -> None:
        for builder in (self.tok, self.msk):
            builder.data_file.close()
        self.files.abort()


class SFTConversations:
    """Read-only view of an SFT dataset: `conv(i) -> (ids int64 [L], response mask bool [L])`."""

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        tok_p, msk_p = sft_paths(prefix)
        for p in (tok_p, msk_p):
            if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx")):
                raise FileNotFoundError(f"SFT dataset {p}.{{bin,idx}} not found: write it with "
                                        f"tools/preprocess_sft.py --output-prefix {prefix}")
        self.tokens = IndexedDataset(tok_p)
        self.mask = IndexedDataset(msk_p)
        if not np.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths):
            raise ValueError(f"{tok_p} and {msk_p} have different sequence lengths: rewrite both with tools/preprocess_sft.py")
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def conv(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[i].astype(np.int64), self.mask[i].astype(bool)


class ConcatConversations:
    """Several SFT datasets read as one (conversation ids run through them in order)."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        if not prefixes:
            raise ValueError("no SFT dataset given: pass --data-path PREFIX [PREFIX ...]")
        self.parts = [SFTConversations(p) for p in prefixes]
        self.lengths = np.concatenate([p.lengths for p in self.parts])
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def conv(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k].conv(int(i - self.offsets[k]))


# ------------------------------------------------------------------------------------- config
@dataclass
class SFTDataConfig(SectionConfig):
    """The `sft:` section: how conversations become micro-batches and how the loss is normalised.

    Field names are unique over the whole run config (flags are flat), hence the `sft_` prefix.
    """

    sft_pack: bool = False  # pack several short conversations per row (block-diagonal attention)
    sft_pack_pad_tokens: int = 64  # packed: maskable pad tokens after each conversation (0: none, the earlier rows)
    sft_length_buckets: list[int] = field(default_factory=list)  # [] = pad to seq_length
    sft_response_cutoff: bool = False  # cut padding beyond the micro-batch's longest conversation
    sft_tail_cut_prob: float = 0.0  # probability of keeping only a random part of the trailing padding
    # bucketed: a micro-batch cut short keeps its length rounded up to a multiple of this (the extra
    # positions are padding, unattended and unmaskable), so cuts make a few shapes instead of one per
    # length: kernels are planned per GEMM / attention shape (oneDNN's bf16 cache grew RSS by 0.45 GB
    # over 3500 steps; cuDNN / TE build a graph per length). 1 = the exact cut (the earlier behaviour)
    sft_cut_length_multiple: int = 16
    sft_loss_normalization: str = "token"  # token: per response token | sequence: per sequence, then mean
    #                                        | masked: per masked token of each micro-batch (Dream's SFT; sec. 3.3)
    sft_valid_data_path: Optional[str] = None  # held-out SFT prefix (tools/preprocess_sft.py output)
    sft_valid_fraction: float = 0.0  # seeded held-out fraction of data_path when no sft_valid_data_path
    sft_eval_humaneval_interval: int = 0  # 0 = never; else HumanEval pass@1 every N iterations
    sft_eval_humaneval_problems: int = 0  # 0 = all 164
    sft_eval_max_new_tokens: int = 256

    def problems(self) -> list[str]:
        e = []
        if any(b <= 0 for b in self.sft_length_buckets) or list(self.sft_length_buckets) != sorted(self.sft_length_buckets):
            e.append(f"sft.sft_length_buckets={self.sft_length_buckets} must be increasing positive lengths")
        if self.sft_pack_pad_tokens < 0:
            e.append(f"sft.sft_pack_pad_tokens={self.sft_pack_pad_tokens} must be >= 0")
        if self.sft_cut_length_multiple < 1:
            e.append(f"sft.sft_cut_length_multiple={self.sft_cut_length_multiple} must be >= 1 (1 = exact cut lengths)")
        if not 0.0 <= self.sft_tail_cut_prob <= 1.0:
            e.append(f"sft.sft_tail_cut_prob={self.sft_tail_cut_prob} must be in [0, 1]")
        if self.sft_loss_normalization not in ("token", "sequence", "masked"):
            e.append(f"sft.sft_loss_normalization={self.sft_loss_normalization!r}: choose token, sequence or masked")
        if not 0.0 <= self.sft_valid_fraction < 1.0:
            e.append(f"sft.sft_valid_fraction={self.sft_valid_fraction} must be in [0, 1)")
        return e


# ------------------------------------------------------------------------------------- rows
def pack_plan(lengths: np.ndarray, order: np.ndarray, seq_length: int) -> list[list[int]]:
    """Greedy next-fit packing of conversations (in `order`) into rows of <= seq_length tokens.

    Next-fit keeps the shuffled order (so rows stay a random mix) and is O(n). A conversation
    longer than seq_length gets a row of its own (and is truncated by the collator).
    """
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order.tolist():
        n = int(lengths[i])
        if cur and used + n > seq_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


class SFTDataset:
    """Global sample index -> row (a list of (ids, response_mask) conversations).

    `indices`: the conversation ids this split uses (train or held-out). Row order is a seeded
    permutation per epoch: `row(sample_index)` depends only on (seed, sample_index).
    """

    def __init__(self, convs: SFTConversations, seq_length: int, seed: int, pack: bool = False,
                 indices: Optional[np.ndarray] = None, pack_pad_tokens: int = 0) -> None:
        self.convs = convs
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        ids = np.arange(len(convs)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("SFT dataset split is empty: give more conversations or a smaller sft_valid_fraction")
        if pack:
            order = ids[_rng(self.seed, 0, _PACK_ORDER).permutation(len(ids))]
            # each conversation takes its length + the pad tokens that follow it (SFTCollator)
            self.rows = pack_plan(np.asarray(convs.lengths) + int(pack_pad_tokens), order, self.seq_length)
        else:
            self.rows = [[int(i)] for i in ids]
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: _rng(self.seed, epoch, _EPOCH_SHUFFLE).permutation(len(self.rows))}
        return self._perm_cache[epoch]

    def row(self, sample_index: int, shuffle: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        epoch, pos = divmod(int(sample_index), len(self.rows))
        r = self.rows[int(self._perm(epoch)[pos])] if shuffle else self.rows[pos]
        return [self.convs.conv(i) for i in r]


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): a seeded split of n conversations (at least 1 held out if asked)."""
    if valid_fraction <= 0:
        return np.arange(n), np.arange(0)
    perm = _rng(seed, 0, _VALID_SPLIT).permutation(n)
    k = max(1, int(round(n * valid_fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])


# ------------------------------------------------------------------------------------- collate
class SFTCollator:
    """Rows -> one micro-batch dict (see the module docstring for every option)."""

    def __init__(self, seq_length: int, pad_id: int, cfg: Optional[SFTDataConfig] = None, seed: int = 0,
                 length_multiple: int = 1) -> None:
        self.seq_length = int(seq_length)
        self.pad_id = int(pad_id)
        self.cfg = cfg or SFTDataConfig()
        self.seed = int(seed)
        # bucketed micro-batches cut to `cut` positions keep ceil(cut / m) * m of them (the extra
        # ones unattended, not maskable): m = lcm(FP8's multiple (model/fp8_shapes.py
        # length_multiple), sft_cut_length_multiple)
        self.length_multiple = math.lcm(max(1, int(length_multiple)), max(1, int(self.cfg.sft_cut_length_multiple)))

    def _length(self, longest: int) -> int:
        """Padded length of a micro-batch whose longest row has `longest` tokens."""
        if not self.cfg.sft_length_buckets:
            return self.seq_length
        for b in self.cfg.sft_length_buckets:
            if b >= longest:
                return min(b, self.seq_length)
        return self.seq_length

    def _cut(self, longest: int, length: int, key: int) -> int:
        """Positions >= the returned cut are removed (bucketed) or unattended and unmaskable (fixed)."""
        cut = min(longest, length) if self.cfg.sft_response_cutoff else length
        if self.cfg.sft_tail_cut_prob > 0:
            coin, frac = _rng(self.seed, key, _TAIL_CUT).random(2).tolist()
            lo = min(longest, length)
            if coin < self.cfg.sft_tail_cut_prob and cut > lo:
                cut = lo + int(frac * (cut - lo + 1))
                cut = min(cut, length)
        return cut

    def __call__(self, rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], sample_index: Sequence[int]) -> dict:
        packed = any(len(r) > 1 for r in rows) or self.cfg.sft_pack
        pad_after = self.cfg.sft_pack_pad_tokens if packed else 0
        lens = [min(sum(len(c[0]) + pad_after for c in r), self.seq_length) for r in rows]
        longest = max(lens)
        length = self._length(longest)
        cut = self._cut(longest, length, int(sample_index[0]))
        if self.cfg.sft_length_buckets:  # bucketed: the cut tail is not materialised (up to the multiple)
            length = min(length, -(-cut // self.length_multiple) * self.length_multiple)
        bsz = len(rows)
        tokens = torch.full((bsz, length), self.pad_id, dtype=torch.long)
        response = torch.zeros((bsz, length), dtype=torch.bool)
        maskable = torch.zeros((bsz, length), dtype=torch.bool)
        segment = torch.zeros((bsz, length), dtype=torch.long)
        position = torch.zeros((bsz, length), dtype=torch.long)
        for b, row in enumerate(rows):
            self._fill_row(row, tokens[b], response[b], maskable[b], segment[b], position[b], packed)
        valid = torch.arange(length).unsqueeze(0) < cut
        maskable &= valid
        batch = {"tokens": tokens, "sample_index": torch.as_tensor(list(sample_index), dtype=torch.long),
                 "maskable": maskable, "response_mask": response & valid}
        if packed:
            same = segment[:, :, None] == segment[:, None, :]
            pair = valid[:, :, None] & valid[:, None, :]
            eye = torch.eye(length, dtype=torch.bool).unsqueeze(0)
            batch["attention_mask"] = ((same & pair) | eye).unsqueeze(1)
            batch["position_ids"] = position
            batch["segment_ids"] = segment
        elif cut < length:
            batch["attention_mask"] = valid.expand(bsz, length).clone()
        return batch

    def _fill_row(self, row, tokens, response, maskable, segment, position, packed: bool) -> None:
        length = tokens.shape[0]
        at = 0
        for s, (ids, resp) in enumerate(row):
            n = min(len(ids), length - at)
            if n <= 0:
                break
            tokens[at: at + n] = torch.from_numpy(ids[:n])
            response[at: at + n] = torch.from_numpy(resp[:n])
            maskable[at: at + n] = torch.from_numpy(resp[:n])
            segment[at: at + n] = s
            position[at: at + n] = torch.arange(n)
            at += n
            if packed and n == len(ids):  # the conversation's own padding: maskable, its segment
                k = min(self.cfg.sft_pack_pad_tokens, length - at)
                maskable[at: at + k] = True
                segment[at: at + k] = s
                position[at: at + k] = torch.arange(n, n + k)
                at += k
        if at < length:
            if packed:  # fill padding: its own segment, not maskable
                segment[at:] = len(row)
                position[at:] = torch.arange(length - at)
            else:  # padding after the response: maskable, the model learns to stop
                maskable[at:] = True
                position[at:] = torch.arange(at, length)


# ------------------------------------------------------------------------------------- jsonl
def iter_jsonl(path: str) -> Iterable[tuple[int, bytes]]:
    """(line number, raw bytes) of the non-blank lines of a JSONL file (.gz allowed)."""
    with _open_maybe_gz(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def load_json_line(path: str, lineno: int, line: bytes | str) -> Any:
    """Parse one JSONL line; errors name file:line and the fix."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(f"{path}:{lineno}: not UTF-8 (byte {exc.start} of the line); "
                            "re-encode the file or rerun with --skip-bad") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                        "fix the line or rerun with --skip-bad") from None
