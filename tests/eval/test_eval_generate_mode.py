"""tools/evaluate.py generation mode, wired to the real checkpoint loader, tokenizer and sampler:
a tiny random model saved with save_checkpoint, two problems, two samples each, then a rerun
that resumes (nothing is generated twice). The tiny model writes garbage, so we check the
plumbing (records, ids, pass@k keys, resume), not the score."""
import json
import os
import sys

import pytest

pytestmark = pytest.mark.slow  # ~30 s on 2 shared cores: tokenizer, 151k-row checkpoint, two runs
import torch

from megatron_diffu.testing import ModelOnlyRunConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from megatron_diffu.data.tokenizer import build_tokenizer, padded_vocab_size
    from megatron_diffu.model.config import TransformerConfig
    from megatron_diffu.model.transformer import DiffusionTransformer
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.checkpointing import save_checkpoint

    tok = build_tokenizer("HuggingFaceTokenizer", None)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=padded_vocab_size(tok.vocab_size, 128, 1))
    model = DiffusionTransformer(cfg)
    save = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(save, 1, model, None, ProcessGrid.single(), ModelOnlyRunConfig(cfg), {"iteration": 1})
    return str(save)


def test_generate_score_and_resume(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import evaluate as tool
    import megatron_diffu.diffusion.sampling as sampling

    calls = []
    real = sampling.diffusion_generate

    def counting(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(sampling, "diffusion_generate", counting)
    out = tmp_path / "gen.jsonl"
    argv = ["--load", tiny_checkpoint, "--out", str(out), "--limit", "2", "--n-samples", "2", "--batch-size", "4",
            "--max-new-tokens", "8", "--steps", "4", "--temperature", "1.0", "--k", "1,2", "--timeout", "2"]
    torch.manual_seed(0)
    assert tool.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{\n"):])  # the loader prints a line before the report
    assert set(report) >= {"pass@1", "pass@2", "n_records"} and report["n_records"] == 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task_id"], r["sample_index"]) for r in records) == \
        [("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0), ("HumanEval/1", 1)]
    assert all(isinstance(r["completion"], str) and r["result"] for r in records)
    assert calls == [4]
    assert tool.main(argv) == 0  # resume: everything is there, nothing generated again
    assert calls == [4]


def test_heldout_problems_from_an_hf_export_equal_the_native_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """`--load` takes an HF export too (the quickstart evaluates one): greedy completions from the
    exported folder equal those from the native checkpoint; `--heldout` skips the RL set (0..39)."""
    import evaluate as tool

    from megatron_diffu.convert.checkpoint import native_to_hf

    hf = native_to_hf(tiny_checkpoint, tmp_path / "hf", dtype="float32", progress=False)
    common = ["--heldout", "--limit", "2", "--n-samples", "1", "--max-new-tokens", "6", "--steps", "3",
              "--temperature", "0", "--k", "1", "--timeout", "2"]
    runs = {}
    for name, load in (("native", tiny_checkpoint), ("hf", str(hf))):
        out = tmp_path / f"{name}.jsonl"
        assert tool.main(["--load", load, "--out", str(out), *common]) == 0
        runs[name] = {r["task_id"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
    capsys.readouterr()
    assert list(runs["native"]) == ["HumanEval/40", "HumanEval/41"]
    assert runs["hf"] == runs["native"]
