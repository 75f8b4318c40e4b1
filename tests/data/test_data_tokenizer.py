"""Tokenizers: Qwen/Dream special ids, encoding vs the unmodified tokenizer file, ChatML, SentencePiece."""
import os
import sysconfig

import pytest

from megatron_diffu.data.tokenizer import (
    build_tokenizer,
    padded_vocab_size,
    qwen_tokenizer_path,
    train_sentencepiece,
)

STDLIB = sysconfig.get_paths()["stdlib"]
SAMPLE_FILES = [os.path.join(STDLIB, p) for p in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py")]


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer("HuggingFaceTokenizer", None)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_qwen_special_ids_match_dream(qwen):
    # Dream/DiffuCoder layout: Qwen2.5 specials, then <|beginoftext|>, <|mask|>, <|dlm_pad|>.
    assert (qwen.eod_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)
    assert (qwen.bos_id, qwen.mask_id, qwen.pad_id) == (151665, 151666, 151667)
    assert qwen.vocab_size == 151668
    assert qwen.token_to_id("<|file_sep|>") == 151664  # last Qwen2.5 special kept
    for qwen3_only in ("<think>", "</think>", "<tool_response>", "</tool_response>"):
        assert qwen.token_to_id(qwen3_only) is None
    assert qwen.decode([151666, 151667, 151665]) == "<|mask|><|dlm_pad|><|beginoftext|>"
    # megatron-core duck typing
    assert qwen.eod == 151643 and qwen.pad == 151667


def test_qwen_encoding_equals_unmodified_tokenizer_file(qwen):
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(qwen_tokenizer_path())  # the shipped file, no changes of ours
    for path in SAMPLE_FILES:
        text = _read(path)
        ids = qwen.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert qwen.decode(ids) == text
    assert qwen.encode_batch([_read(p) for p in SAMPLE_FILES]) == [qwen.encode(_read(p)) for p in SAMPLE_FILES]
    # special strings parse as their ids (Hugging Face / Megatron behaviour)
    assert qwen.encode("x<|endoftext|><|mask|>")[-2:] == [151643, 151666]


def test_chat_template_is_qwen_chatml(qwen):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(): <|im_end|>"}]
    ids = qwen.apply_chat_template(msgs, add_generation_prompt=True)
    expected_text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ndef f(): <|im_end|><|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert qwen.decode(ids) == expected_text
    # markers are single ids; the marker string inside the content is plain text, not a turn end
    assert ids.count(qwen.im_start_id) == 3 and ids.count(qwen.im_end_id) == 2
    # reference: encode each piece independently and join with the marker ids
    ref = ([151644] + qwen.encode("system\nBe brief.") + [151645] + qwen.encode("\n")
           + [151644] + qwen._encode_plain("user\ndef f(): <|im_end|>") + [151645] + qwen.encode("\n")
           + [151644] + qwen.encode("assistant\n"))
    assert ids == ref
    no_prompt = qwen.apply_chat_template(msgs, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and no_prompt[-2:] == [151645, qwen.encode("\n")[0]]
    with pytest.raises(ValueError, match="message 0"):
        qwen.apply_chat_template([{"content": "no role"}])


def _megatron_pad(n, divisible, tp):  # Megatron-LM's _vocab_size_with_padding, verbatim logic
    after = n
    multiple = divisible * tp
    while after % multiple != 0:
        after += 1
    return after


@pytest.mark.parametrize("n,div,tp", [(151668, 128, 1), (151668, 128, 2), (151668, 128, 8), (8192, 128, 4),
                                      (8197, 64, 1), (1, 1, 1)])
def test_padded_vocab_size_matches_megatron(n, div, tp):
    assert padded_vocab_size(n, div, tp) == _megatron_pad(n, div, tp)


def test_sentencepiece_backend_appends_missing_specials(tmp_path):
    import sentencepiece as spm

    model = train_sentencepiece(SAMPLE_FILES, 1000, str(tmp_path / "sp"))
    tok = build_tokenizer("SentencePieceTokenizer", model)
    sp = spm.SentencePieceProcessor(model_file=model)
    n = sp.get_piece_size()
    assert n == 1000
    assert tok.eod_id == sp.eos_id() == 2 and tok.bos_id == 1  # Megatron: SentencePiece eos is the EOD
    assert (tok.mask_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == n + 4
    text = _read(SAMPLE_FILES[2])[:3000]
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.mask_id] + sp.encode("def") + [tok.pad_id]) == "<|mask|>def<|dlm_pad|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat[0] == tok.im_start_id and tok.im_end_id in chat and chat[-1] != tok.im_end_id


def test_bad_tokenizer_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("GPT2BPETokenizer", None)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
