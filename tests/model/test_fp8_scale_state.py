"""Issue 16 items 7 and 11 on CPU: FP8 scaling state in checkpoints (native and the TE stand-in),
which passes run FP8 (no-grad passes in the compute dtype unless model.fp8_no_grad; the sampler
never), and the amax reduction over TP x DP (2 gloo ranks)."""
import dataclasses

import pytest
import torch

import fake_te
from megatron_diffu.model import fp8, te_backend
from megatron_diffu.model.builder import build_model_shard
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.testing import ModelOnlyRunConfig, run_distributed
from megatron_diffu.training import checkpointing


def _cfg(**kw):
    return TransformerConfig.from_preset("tiny", **kw)


def _ids(seed=3, rows=2):
    return torch.randint(0, 256, (rows, 16), generator=torch.Generator().manual_seed(seed))


def _train_step(model, ids):
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1)).backward()


def _save(path, model, cfg):
    checkpointing.save_checkpoint(path, 1, model, None, ProcessGrid.single(), ModelOnlyRunConfig(cfg), {"iteration": 1})


def _load(path, model, cfg):
    return checkpointing.load_checkpoint(path, model, None, ProcessGrid.single(), cfg, load_rng=False)


def _native_states(model):
    return {n: m.fp8.state_dict() for n, m in fp8.fp8_modules(model).items()}


# ---------------------------------------------------------------------- 7: native state in checkpoints
def test_native_scaling_state_round_trips_and_follows_the_formula(tmp_path, one_thread, capsys):
    cfg = _cfg(fp8_format="hybrid")
    model = build_model_shard(cfg)
    for seed in (1, 2, 3):
        _train_step(model, _ids(seed))
    saved = _native_states(model)
    assert len(saved) == 8  # 4 linears x 2 layers, named by global layer id
    for roles in saved.values():  # the delayed-scaling rule written out: fp8_max / max(history)
        for role, fp8_max in (("input", 448.0), ("weight", 448.0), ("grad", 57344.0)):
            hist, scale = roles[role]
            assert (hist[:3] > 0).all() and (hist[3:] == 0).all()  # three steps recorded, newest first
            assert torch.equal(scale, fp8_max / hist.max())  # python float / fp32 tensor, as TE writes it
    _save(tmp_path, model, cfg)
    assert any(k.startswith("fp8.decoder.layers.1.mlp.linear_fc2")
               for k in checkpointing.read_checkpoint_metadata(checkpointing.resolve_checkpoint_dir(tmp_path))
               .state_dict_metadata)
    fresh = build_model_shard(cfg, init_weights=False)
    assert all(torch.equal(r[1], torch.tensor(1.0)) for s in _native_states(fresh).values() for r in s.values())
    _load(tmp_path, fresh, cfg)
    got = _native_states(fresh)
    assert got.keys() == saved.keys()
    for n in saved:
        for role in ("input", "weight", "grad"):
            assert all(torch.equal(a, b) for a, b in zip(got[n][role], saved[n][role])), (n, role)
    assert "note" not in capsys.readouterr().out


def test_history_of_another_length_keeps_the_newest_entries():
    st = fp8.Fp8LinearState(fp8.Fp8Recipe(amax_history_len=3))
    st.load_state_dict({"input": (torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.tensor(7.0))})
    assert st.input.history.tolist() == [5.0, 4.0, 3.0] and st.input.scale.item() == 7.0
    st.load_state_dict({"input": (torch.tensor([5.0]), torch.tensor(7.0))})
    assert st.input.history.tolist() == [5.0, 0.0, 0.0]


def test_missing_or_unused_fp8_state_is_a_note_not_an_error(tmp_path, one_thread, capsys):
    plain_cfg, fp8_cfg = _cfg(), _cfg(fp8_format="hybrid")
    plain = build_model_shard(plain_cfg)
    _save(tmp_path / "plain", plain, plain_cfg)
    model = build_model_shard(fp8_cfg, init_weights=False)
    _load(tmp_path / "plain", model, fp8_cfg)
    assert "holds no FP8 scaling state" in capsys.readouterr().out
    for roles in _native_states(model).values():  # fresh: scale 1, empty history
        assert all(torch.equal(s, torch.tensor(1.0)) and not h.any() for h, s in roles.values())
    with torch.no_grad():
        assert torch.equal(model(_ids()), plain(_ids()))  # the weights loaded (no-grad: bf16 path)

    _train_step(model, _ids())
    _save(tmp_path / "fp8", model, fp8_cfg)
    target = build_model_shard(plain_cfg, init_weights=False)
    _load(tmp_path / "fp8", target, plain_cfg)
    assert "but this run does not use FP8: ignored" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(target(_ids()), model(_ids()))


# ---------------------------------------------------------------------- 7: TE extra state
def test_te_extra_state_round_trips_through_the_checkpoint(tmp_path, monkeypatch, one_thread):
    fake_te.install(monkeypatch)
    cfg = _cfg(transformer_impl="transformer_engine", fp8_format="hybrid")
    model = build_model_shard(cfg)
    _train_step(model, _ids(1))
    _train_step(model, _ids(2))
    te_mods = fp8.fp8_modules(model)
    assert len(te_mods) == 8 and all(m.get_extra_state().numel() for m in te_mods.values())
    assert "_extra_state" in "".join(model.state_dict())  # TE's place for it, as in TE
    _save(tmp_path, model, cfg)
    fresh = build_model_shard(cfg, init_weights=False)
    assert all(m.get_extra_state().numel() == 0 for m in fp8.fp8_modules(fresh).values())
    _load(tmp_path, fresh, cfg)
    for name, mod in fp8.fp8_modules(fresh).items():
        want = te_mods[name].fp8_meta
        assert torch.equal(mod.fp8_meta["amax_history"], want["amax_history"]) and torch.equal(
            mod.fp8_meta["scale"], want["scale"]), name


# ---------------------------------------------------------------------- 7: which passes run FP8
def _fp8_flags(model):
    return [m.fp8_calls[-1] for m in fp8.fp8_modules(model).values()]


@pytest.mark.parametrize("fp8_no_grad", [False, True])
def test_te_no_grad_passes_run_outside_fp8_autocast_unless_asked(monkeypatch, fp8_no_grad):
    fake_te.install(monkeypatch)
    model = build_model_shard(_cfg(transformer_impl="transformer_engine", fp8_format="hybrid",
                                   fp8_no_grad=fp8_no_grad))
    model(_ids())
    assert all(_fp8_flags(model))  # training pass: FP8
    with torch.no_grad():  # evaluation, GRPO old/reference log-probs
        model(_ids())
    assert _fp8_flags(model) == [fp8_no_grad] * 8
    with torch.no_grad(), fp8.fp8_suspended():  # the sampler: never FP8
        model(_ids())
    assert not any(_fp8_flags(model))


def _emulated_linear(x, w):
    """fp32 emulation written out: current scaling (history 1), e4m3, x (w) / scale back."""
    sx, sw = 448.0 / x.abs().max(), 448.0 / w.abs().max()
    xq = (x * sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() / sx
    wq = (w * sw).clamp(-448, 448).to(torch.float8_e4m3fn).float() / sw
    return xq @ wq.t()


@pytest.mark.parametrize("no_grad_fp8", [False, True])
def test_native_no_grad_passes_use_the_compute_dtype_unless_asked(no_grad_fp8):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    st = fp8.Fp8LinearState(fp8.Fp8Recipe(amax_history_len=1, no_grad_fp8=no_grad_fp8))
    with torch.no_grad():
        y = st.linear(x, w)
    want = _emulated_linear(x, w) if no_grad_fp8 else x @ w.t()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-5)
    assert st.input.history.item() == (x.abs().max().item() if no_grad_fp8 else 0.0)  # recorded only in FP8
    with torch.no_grad(), fp8.fp8_suspended():
        torch.testing.assert_close(st.linear(x, w), x @ w.t(), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------- 11: amax over TP x DP
def _amax_worker(rank, tmp):
    import torch.distributed as dist

    import fake_te as fte
    grid = ProcessGrid.build()  # world 2: DP=2
    cfg = _cfg(fp8_format="hybrid")
    ids = _ids(seed=10 + rank)  # each DP rank its own data
    out = {"amax_ranks": list(grid.amax_ranks)}
    for name, group in (("tp_only", grid.tp_group), ("tp_dp", grid.amax_group)):
        model = build_model_shard(cfg, grid)
        for m in fp8.fp8_modules(model).values():  # the old group (TP) vs the grid's (TP x DP)
            m.fp8.recipe = dataclasses.replace(m.fp8.recipe, amax_group=group)
        _train_step(model, ids)
        out[name] = _native_states(model)
    checkpointing.save_checkpoint(tmp, 1, model, None, grid, ModelOnlyRunConfig(cfg), {"iteration": 1})  # DP=2 save
    fte.install()
    te_cfg = _cfg(transformer_impl="transformer_engine", fp8_format="hybrid", fp8_no_grad=True)
    groups = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), te_backend.fp8_context(te_cfg, grid):
            groups[grad] = dist.get_process_group_ranks(fte.AUTOCAST_CALLS[-1]["group"])
    out["te_groups"] = groups
    return out


@pytest.mark.slow
def test_amax_is_reduced_over_tp_and_dp(tmp_path):
    r0, r1 = run_distributed(_amax_worker, world_size=2, args=(str(tmp_path),), timeout=300)
    assert r0["amax_ranks"] == r1["amax_ranks"] == [0, 1]
    qkv0 = "decoder.layers.0.self_attention.linear_qkv"
    old0, old1 = r0["tp_only"][qkv0]["input"], r1["tp_only"][qkv0]["input"]
    assert old0[0][0] != old1[0][0] and not torch.equal(old0[1], old1[1])  # before: one scale per DP rank
    for name in r0["tp_dp"]:
        for role in ("input", "weight", "grad"):
            assert all(torch.equal(a, b) for a, b in zip(r0["tp_dp"][name][role], r1["tp_dp"][name][role])), name
    # the first linear sees the same activations in both runs: the reduced amax is the max of the ranks'
    new_hist, new_scale = r0["tp_dp"][qkv0]["input"]
    assert new_hist[0] == max(old0[0][0], old1[0][0]) and torch.equal(new_scale, 448.0 / new_hist.max())
    assert r0["te_groups"] == {True: [0, 1], False: [0]}  # TE: TP x DP for training, TP for no-grad passes
    one = build_model_shard(_cfg(fp8_format="hybrid"), init_weights=False)  # the DP=2 save loads at DP=1
    _load(tmp_path, one, _cfg(fp8_format="hybrid"))
    got = _native_states(one)
    assert all(torch.equal(a, b) for n in got for r in got[n] for a, b in zip(got[n][r], r0["tp_dp"][n][r]))
