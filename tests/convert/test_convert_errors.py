"""Bad inputs give clear errors naming the file / field / fix; the CLI works end to end (issue 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_diffu.convert.checkpoint import hf_to_native, native_to_hf
from megatron_diffu.convert.safetensors_io import SafetensorsFolder
from megatron_diffu.convert.synthetic import qwen2_config, write_random_hf_checkpoint

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
REPO = Path(__file__).resolve().parents[2]


def tiny(folder: Path, **kw) -> Path:
    cfg = qwen2_config(num_layers=2, hidden=32, ffn=48, heads=4, kv_heads=2, vocab=96, dtype="float32")
    cfg.update(kw)
    return write_random_hf_checkpoint(folder, cfg, max_shard_bytes=20_000)  # several shards + index


def test_unknown_architecture(tmp_path):
    src = tiny(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture \(model_type='llama'"):
        hf_to_native(src, tmp_path / "out", progress=False)


def test_missing_shard_is_named(tmp_path):
    src = tiny(tmp_path / "hf")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(src / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        SafetensorsFolder(src)
    with pytest.raises(FileNotFoundError, match=victim):
        hf_to_native(src, tmp_path / "out", progress=False)


def test_vocab_mismatch_between_config_and_weights(tmp_path):
    src = tiny(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vocab_size=128 but the weights have 96 rows"):
        hf_to_native(src, tmp_path / "out", progress=False)


def test_shape_mismatch_names_the_tensor(tmp_path):
    src = tiny(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\), expected \(64, 32\)"):
        hf_to_native(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("tp,pp,field", [(3, 1, "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
                                         (4, 1, "num_query_groups=2 is not divisible"),
                                         (1, 3, "pipeline_model_parallel_size=3 exceeds num_layers=2")])
def test_layout_that_does_not_divide_the_model(tmp_path, tp, pp, field):
    src = tiny(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"target layout TP=\d PP=\d does not divide") as e:
        hf_to_native(src, tmp_path / "out", tp=tp, pp=pp, progress=False)
    assert field in str(e.value)
    assert not (tmp_path / "out" / "iter_0000000").exists()  # nothing half-written


def test_existing_output_and_missing_run_config(tmp_path):
    src = tiny(tmp_path / "hf")
    hf_to_native(src, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="iter_0000000 already exists|tokenizer already exists"):
        hf_to_native(src, tmp_path / "out", progress=False)
    os.remove(tmp_path / "out" / "iter_0000000" / "run_config.yaml")
    with pytest.raises(FileNotFoundError, match="run_config.yaml is missing"):
        native_to_hf(tmp_path / "out", tmp_path / "hf2", progress=False)
    assert not (tmp_path / "hf2").exists()


def _cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", REPO / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~15 s idle, ~40 s on the shared machine
def test_cli_both_directions_with_verify(tmp_path, capsys):
    src = tiny(tmp_path / "hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--direction", "hf-to-native",
                        "--input", str(src), "--output", str(tmp_path / "nat"), "--target-tensor-parallel-size", "2",
                        "--verify"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "verify: max |logits(HF) - logits(native)|" in r.stdout and "hf-to-native:" in r.stderr
    main = _cli()
    assert main(["--direction", "native-to-hf", "--input", str(tmp_path / "nat"), "--output", str(tmp_path / "exp"),
                 "--verify", "--max-shard-size", "50KB", "--mask-token-id", "95", "--quiet"]) == 0
    diff = float(capsys.readouterr().out.split("= ")[1].split()[0])
    assert diff < 1e-5
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["mask_token_id"] == 95
    assert main(["--direction", "hf-to-native", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
