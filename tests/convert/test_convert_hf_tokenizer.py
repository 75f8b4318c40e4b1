"""Exports load with transformers alone, tokenizer included (issue 15, item 1).

The DiffuCoder README inference flow (AutoModel + AutoTokenizer with trust_remote_code,
`tokenizer(prompt)`, `diffusion_generate(..., temperature=0.3, top_p=0.95, alg="entropy", alg_temp=0.,
output_history=True, return_dict_in_generate=True)`, decode, split on `<|dlm_pad|>`) runs on the export
of a checkpoint pretrained here AND of an imported Qwen2 checkpoint; the exported tokenizer is Dream's
(Qwen2.5 BPE + <|beginoftext|> 151665, <|mask|> 151666, <|dlm_pad|> 151667, no Qwen3 extras) in all four
files; generation_config.json states what a call without sampling arguments really does.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_diffu.convert.checkpoint import GENERATION_DEFAULTS, hf_to_native, native_to_hf
from megatron_diffu.data.tokenizer import build_tokenizer, qwen_tokenizer_path

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

QWEN25_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
PROMPT = """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Write a function that adds two numbers.
<|im_end|>
<|im_start|>assistant
"""  # DiffuCoder's README / inference_demo.py prompt
CODE = 'def add(a, b):\n    """<think> is text here; so is </tool_response>."""\n    return a + b  # <|fim_pad|>\n'


@pytest.fixture(scope="module")
def pretrained_export(tmp_path_factory):
    """A tiny model pretrained here (2 iterations on stdlib code, the bundled Qwen tokenizer), exported."""
    from training_helpers import build_trainer, make_stdlib_dataset, tiny_args

    tmp = tmp_path_factory.mktemp("pretrained")
    prefix = make_stdlib_dataset(tmp)
    trainer = build_trainer(tiny_args(prefix, train_iters=2, extra=[
        "--save", str(tmp / "ckpt"), "--save-interval", "2", "--no-exit-signal-handler"]))
    trainer.train()
    return native_to_hf(tmp / "ckpt", tmp / "export", progress=False)


@pytest.fixture(scope="module")
def imported_export(tmp_path_factory):
    """A Qwen2 causal LM carrying the bundled (Qwen3) tokenizer.json AND tokenizer_config.json, imported and exported."""
    from megatron_diffu.convert.synthetic import qwen2_config, write_random_hf_checkpoint

    tmp = tmp_path_factory.mktemp("imported")
    src = write_random_hf_checkpoint(tmp / "hf", qwen2_config(1, 16, 32, 2, 1, 151936, dtype="float32"))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(qwen_tokenizer_path()).parent / f, src / f)
    hf_to_native(src, tmp / "native", progress=False)
    return native_to_hf(tmp / "native", tmp / "export", progress=False)


def _load(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def _check_tokenizer_files(folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json agree."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert added["<|beginoftext|>"] == 151665 and added["<|mask|>"] == 151666 and added["<|dlm_pad|>"] == 151667
    assert not {"<think>", "</think>", "<tool_response>", "</tool_response>"} & set(added)
    assert max(added.values()) == 151667
    assert json.loads((folder / "added_tokens.json").read_text()) == added
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()} == {v: k for k, v in added.items()}
    named = {"bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|dlm_pad|>",
             "mask_token": "<|mask|>"}
    assert {k: cfg[k] for k in named} == named
    smap = json.loads((folder / "special_tokens_map.json").read_text())
    assert {k: smap[k]["content"] for k in named} == named
    assert smap["additional_special_tokens"] == cfg["additional_special_tokens"]
    assert "<|im_start|>" in cfg["additional_special_tokens"] and "<think>" not in cfg["chat_template"]
    model_cfg = json.loads((folder / "config.json").read_text())
    assert (model_cfg["mask_token_id"], model_cfg["bos_token_id"], model_cfg["eos_token_id"]) == (151666, 151665, 151643)


def _check_auto_tokenizer(tok) -> None:
    ours = build_tokenizer()
    assert (tok.mask_token, tok.mask_token_id) == ("<|mask|>", 151666)
    assert (tok.pad_token, tok.pad_token_id) == ("<|dlm_pad|>", 151667)
    assert (tok.bos_token, tok.bos_token_id) == ("<|beginoftext|>", 151665)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 151643)
    assert len(tok) == ours.vocab_size == 151668
    assert tok.convert_ids_to_tokens([151665, 151666, 151667]) == ["<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"]
    assert tok.decode([151667]) == "<|dlm_pad|>"
    for text in (CODE, PROMPT, "<think>", "</think>\n<tool_response>"):
        ids = tok(text).input_ids
        assert ids == ours.encode(text), text
        assert tok.decode(ids) == text
    assert all(i < 151643 for i in tok("<think></think><tool_response></tool_response>").input_ids)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == QWEN25_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_system = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                          tokenize=False, add_generation_prompt=True)
    assert with_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    # the ChatML ids equal the project's own chat encoding (data/tokenizer.py apply_chat_template)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "def f(): pass"}]
    assert tok(with_system.replace("U", "def f(): pass")).input_ids == ours.apply_chat_template(msgs)


def _readme_flow(model, tok, max_new_tokens: int = 8, steps: int = 8) -> str:
    inputs = tok(PROMPT, return_tensors="pt")
    input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
    torch.manual_seed(0)
    output = model.diffusion_generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                      output_history=True, return_dict_in_generate=True, steps=steps,
                                      temperature=0.3, top_p=0.95, alg="entropy", alg_temp=0.)
    assert output.sequences.shape == (1, input_ids.shape[1] + max_new_tokens)
    assert len(output.history) == steps
    assert torch.equal(output.sequences[0, :input_ids.shape[1]], input_ids[0])
    assert not (output.sequences == tok.mask_token_id).any()  # every mask revealed
    generations = [tok.decode(g[len(p):].tolist()) for p, g in zip(input_ids, output.sequences)]
    answer = generations[0].split("<|dlm_pad|>")[0]
    assert isinstance(answer, str) and "<|mask|>" not in answer
    return answer


@pytest.mark.slow  # trains 2 iterations on stdlib code; two 151k-vocabulary exports
@pytest.mark.parametrize("which", ["pretrained_export", "imported_export"])
def test_export_loads_with_auto_tokenizer_and_runs_the_diffucoder_readme_flow(which, request):
    folder = request.getfixturevalue(which)
    _check_tokenizer_files(folder)
    model, tok = _load(folder)
    _check_auto_tokenizer(tok)
    assert model.config.mask_token_id == tok.mask_token_id
    _readme_flow(model, tok)


def test_generation_config_is_what_a_call_without_sampling_arguments_uses(tmp_path):
    """generation_config.json = GENERATION_DEFAULTS; a bare call follows it, and follows an edited file too."""
    from megatron_diffu.convert.synthetic import qwen2_config, write_random_hf_checkpoint

    src = write_random_hf_checkpoint(tmp_path / "hf", qwen2_config(2, 32, 48, 4, 2, 96, dtype="float32"), std=0.5)
    hf_to_native(src, tmp_path / "native", progress=False)
    export = native_to_hf(tmp_path / "native", tmp_path / "export", progress=False,
                          token_ids={"mask_token_id": 95, "pad_token_id": 94})
    gen = json.loads((export / "generation_config.json").read_text())
    assert {k: gen[k] for k in GENERATION_DEFAULTS} == GENERATION_DEFAULTS
    assert gen["mask_token_id"] == 95
    edited = tmp_path / "edited"
    shutil.copytree(export, edited)
    (edited / "generation_config.json").write_text(json.dumps(
        {**gen, "steps": 6, "max_new_tokens": 10, "alg": "maskgit_plus", "temperature": 0.0}))
    from transformers import AutoModel

    ids = torch.randint(0, 94, (2, 7), generator=torch.Generator().manual_seed(3))
    for folder, expect in ((export, gen), (edited, json.loads((edited / "generation_config.json").read_text()))):
        model = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
        bare = model.diffusion_generate(ids, return_dict_in_generate=True, output_history=True)
        assert bare.sequences.shape == (2, ids.shape[1] + expect["max_new_tokens"])
        assert len(bare.history) == expect["steps"]
        explicit = model.diffusion_generate(ids, max_new_tokens=expect["max_new_tokens"], steps=expect["steps"],
                                            alg=expect["alg"], alg_temp=expect["alg_temp"], eps=expect["eps"],
                                            temperature=expect["temperature"], top_p=expect["top_p"],
                                            top_k=expect["top_k"], mask_token_id=95)
        assert torch.equal(bare.sequences, explicit)
        # and the file is what decides: another algorithm on the same call gives other tokens
        other = "maskgit_plus" if expect["alg"] == "entropy" else "entropy"
        assert not torch.equal(explicit, model.diffusion_generate(ids, alg=other))
