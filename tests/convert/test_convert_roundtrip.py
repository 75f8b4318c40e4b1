"""HF <-> native round trips are bit-identical, at any layout (issue 6).

References: the HF tensors are read back with the `safetensors` library (not our reader), the
native side with plain `torch.distributed.checkpoint`; the sharded native checkpoints are written
by 2 gloo ranks exactly as the trainer does (DTensor Shard(dim) over the TP mesh / disjoint
pipeline-stage keys), so the export path is exercised on real resharding.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_diffu.convert import hf as H
from megatron_diffu.convert.checkpoint import hf_to_native, native_to_hf
from megatron_diffu.convert.native_io import NativeCheckpoint
from megatron_diffu.testing import run_distributed

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


def make_tiny_qwen2(folder: Path, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                    std: float = 0.3) -> Path:
    """A random Qwen2ForCausalLM saved by transformers (GQA 4 query / 2 KV heads, q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases, peaky logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    return folder


def read_hf(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_hf_to_native_tp2_to_hf_bit_identical(tmp_path, tie, dtype):
    src = make_tiny_qwen2(tmp_path / "hf", tie=tie, dtype=dtype)
    it_dir = hf_to_native(src, tmp_path / "native", tp=2, progress=False)
    assert (tmp_path / "native" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    run_cfg = (it_dir / "run_config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in run_cfg and "rotary_base: 1000000.0" in run_cfg
    out = native_to_hf(tmp_path / "native", tmp_path / "hf2", max_shard_size="30KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    original = read_hf(src)
    if tie:
        original.pop("lm_head.weight", None)  # transformers 5 does not store the tied head
    assert_bit_identical(original, read_hf(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    assert config["rope_theta"] == 1e6 and config["tie_word_embeddings"] is tie
    assert config["auto_map"]["AutoModel"] == "modeling_dream.DreamModel"
    assert {"modeling_dream.py", "configuration_dream.py", "generation_utils.py"} <= {p.name for p in out.iterdir()}


def test_native_tensors_are_the_fused_canonical_layout(tmp_path):
    """The DCP file holds [G, (Q/G+2)D, H] qkv and [2, F, H] fc1, checked against a direct reshape."""
    src = make_tiny_qwen2(tmp_path / "hf")
    hf_to_native(src, tmp_path / "native", progress=False)
    ck = NativeCheckpoint(tmp_path / "native")
    hf = read_hf(src)
    t = ck.load(["decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc1.weight",
                 "decoder.layers.1.self_attention.linear_qkv.bias"])
    qkv = t["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv.shape == (2, (2 + 2) * 8, 32)
    p = "model.layers.1.self_attn."
    for g in range(2):  # group g: query heads 2g, 2g+1, then kv head g
        assert torch.equal(qkv[g, :16], hf[p + "q_proj.weight"][g * 16:(g + 1) * 16])
        assert torch.equal(qkv[g, 16:24], hf[p + "k_proj.weight"][g * 8:(g + 1) * 8])
        assert torch.equal(qkv[g, 24:], hf[p + "v_proj.weight"][g * 8:(g + 1) * 8])
    bias = t["decoder.layers.1.self_attention.linear_qkv.bias"]
    assert torch.equal(bias[1, 16:24], hf[p + "k_proj.bias"][8:16])
    fc1 = t["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[0], hf["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(fc1[1], hf["model.layers.1.mlp.up_proj.weight"])


# ------------------------------------------------------------------ sharded native checkpoints
def _full_native(src: Path) -> tuple[dict[str, torch.Tensor], object]:
    from megatron_diffu.convert.hf import read_hf_config, transformer_config_from_hf
    cfg = transformer_config_from_hf(read_hf_config(src))
    return H.hf_state_dict_to_native(read_hf(src), cfg), cfg


TP_DIMS = {"linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_proj.weight": 1, "linear_fc1.weight": 1,
           "linear_fc2.weight": 1, "word_embeddings.weight": 0, "output_layer.weight": 0}


def _tp_dim(name: str):
    return next((d for suffix, d in TP_DIMS.items() if name.endswith(suffix)), None)


def _save_sharded(rank: int, src: str, out: str, layout: str) -> None:
    """Rank-side stand-in for the trainer's save: TP=2 DTensors or PP=2 stage-local keys."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    full, cfg = _full_native(Path(src))
    state = {}
    if layout == "tp2":
        mesh = init_device_mesh("cpu", (2,))
        for n, t in full.items():
            d = _tp_dim(n)
            state["model." + n] = (t if d is None else
                                   DTensor.from_local(t.chunk(2, dim=d)[rank].contiguous(), mesh, [Shard(d)]))
    else:  # pp2: stage 0 = embedding + first half of the layers, stage 1 = the rest + head
        half = cfg.num_layers // 2
        for n, t in full.items():
            layer = int(n.split(".")[2]) if n.startswith("decoder.layers.") else None
            stage = (0 if n == H.EMBED else 1) if layer is None else int(layer >= half)
            if stage == rank:
                state["model." + n] = t.clone()
    state["optimizer.step"] = torch.tensor(7)  # other keys must be ignored by the converter
    dcp.save(state, checkpoint_id=out + "/iter_0000010")
    if rank == 0:
        import yaml
        Path(out, "iter_0000010", "run_config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
        Path(out, "latest_checkpointed_iteration.txt").write_text("10\n")


def _load_into_dtensors(rank: int, native: str) -> list[str]:
    """DCP reshards the converter's full tensors into TP=2 DTensor shards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    ck = NativeCheckpoint(Path(native))
    full = ck.load(list(ck.shapes))
    mesh = init_device_mesh("cpu", (2,))
    state = {}
    for n, t in full.items():
        d = _tp_dim(n)
        empty = torch.zeros_like(t)
        state["model." + n] = empty if d is None else DTensor.from_local(empty.chunk(2, dim=d)[rank].contiguous(),
                                                                        mesh, [Shard(d)])
    dcp.load(state, checkpoint_id=str(ck.dir))
    bad = []
    for n, t in full.items():
        d, got = _tp_dim(n), state["model." + n]
        want = t if d is None else t.chunk(2, dim=d)[rank]
        if not torch.equal(got.to_local() if d is not None else got, want):
            bad.append(n)
    return bad


def _rank_main(rank: int, src: str, tmp: str) -> list[str]:
    """One spawn for all multi-process checks (rank start-up dominates on a 2-core machine)."""
    _save_sharded(rank, src, tmp + "/trained_tp2", "tp2")
    _save_sharded(rank, src, tmp + "/trained_pp2", "pp2")
    return _load_into_dtensors(rank, tmp + "/native")


@pytest.mark.slow  # two spawned ranks: ~15 s idle, ~35 s on the shared 2-core machine
def test_sharded_layouts_tp2_pp2_export_reimport_and_dtensor_reshard(tmp_path):
    """Trainer-style TP=2 and PP=2 checkpoints -> HF -> native TP=1 are bit-identical, and the
    converter's full-tensor checkpoint loads into TP=2 DTensor shards through DCP (gloo, 2 ranks)."""
    src = make_tiny_qwen2(tmp_path / "hf")
    hf_to_native(src, tmp_path / "native", tp=2, progress=False)
    bad = run_distributed(_rank_main, world_size=2, args=(str(src), str(tmp_path)), timeout=240)
    assert bad == [[], []], "tensors that did not reshard into DTensor shards correctly"
    full, _ = _full_native(src)
    for layout in ("tp2", "pp2"):
        out = native_to_hf(tmp_path / f"trained_{layout}", tmp_path / f"hf_{layout}", progress=False)
        assert_bit_identical(read_hf(src), read_hf(out))
        hf_to_native(out, tmp_path / f"native_tp1_{layout}", tp=1, progress=False)
        ck = NativeCheckpoint(tmp_path / f"native_tp1_{layout}")
        assert sorted(ck.shapes) == sorted(full)
        assert_bit_identical(full, ck.load(list(full)))
