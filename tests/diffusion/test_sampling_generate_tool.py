"""tools/generate.py: prompts from flags/files, chat template, JSON output, --show-order, all wired to
the same sampler a direct call uses."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_sampling_reference import _one_thread  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_tool_matches_direct_sampler_call(tmp_path, capsys):
    from megatron_diffu.data.tokenizer import build_tokenizer, padded_vocab_size
    from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Reverse a list."}) + "\n\n" + json.dumps("Add two numbers.") + "\n")
    png = tmp_path / "order_{i}.png"
    tool = _tool()
    rc = tool.main(["--random-init", "tiny", "--prompt", "def add(a, b):", "--prompt-file", str(prompts_file),
                    "--chat", "--json", "--show-order", "--no-color", "--order-png", str(png),
                    "--max-new-tokens", "8", "--steps", "4", "--alg", "maskgit_plus", "--batch-size", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def add(a, b):", "Reverse a list.", "Add two numbers."]
    assert "AR-ness: local@1=" in captured.err and "tokens/s" in captured.err
    assert all((tmp_path / f"order_{i}.png").exists() for i in range(3))

    # the same thing by hand
    tok = build_tokenizer("HuggingFaceTokenizer")
    cfg = TransformerConfig.from_preset("tiny", vocab_size=padded_vocab_size(tok.vocab_size, 128, 8))
    model = DiffusionTransformer(cfg).eval()
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in rows]
    scfg = SamplingConfig(max_new_tokens=8, steps=4, alg="maskgit_plus")
    stops = [tok.eod_id, tok.im_end_id, tok.pad_id]
    expect = []
    for start in (0, 2):  # the tool's batches of 2, keyed by global prompt index
        out = diffusion_generate(model, ids[start:start + 2], scfg, mask_id=tok.mask_id, pad_id=tok.pad_id,
                                 stop_ids=stops, sample_index=list(range(start, min(start + 2, 3))))
        expect += [tok.decode(c) for c in out.completions]
    assert [r["completion"] for r in rows] == expect


def test_generate_tool_errors_name_the_input(tmp_path):
    tool = _tool()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"text": "no prompt field"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: object without a \"prompt\" field"):
        tool.main(["--random-init", "tiny", "--prompt-file", str(bad), "--max-new-tokens", "4", "--steps", "2"])
    with pytest.raises(SystemExit, match="block_length=3: must divide max_new_tokens=8"):
        tool.main(["--random-init", "tiny", "--prompt", "x", "--max-new-tokens", "8", "--block-length", "3"])


def test_generate_tool_loads_hf_folder(tmp_path):
    """An HF Qwen2/Dream folder loads through the converter's name map: same logits as the weights
    read with the safetensors library and mapped in memory."""
    from safetensors.torch import load_file

    from megatron_diffu.convert import hf as H
    from megatron_diffu.convert.loading import load_hf_folder
    from megatron_diffu.convert.synthetic import qwen2_config, write_random_hf_checkpoint
    from megatron_diffu.model.transformer import DiffusionTransformer
    from megatron_diffu.parallel.state import ProcessGrid

    config = qwen2_config(num_layers=1, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=256, dtype="float32")
    folder = write_random_hf_checkpoint(tmp_path / "hf", config, seed=5)
    model, cfg = load_hf_folder(folder, ProcessGrid.single(), torch.device("cpu"), bf16=False)
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    ref = DiffusionTransformer(H.transformer_config_from_hf(config)).eval()
    ref.load_global_state_dict(H.hf_state_dict_to_native(sd, cfg))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids))
    # the bundled Qwen tokenizer's mask id does not fit this 256-row model: a clear error
    with pytest.raises(SystemExit, match="mask id 151666 is outside the model's vocabulary"):
        _tool().main(["--load", str(folder), "--prompt", "x", "--max-new-tokens", "4", "--steps", "2"])
