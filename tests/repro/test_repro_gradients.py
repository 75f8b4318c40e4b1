"""The estimator gradient probe (megatron_diffu.repro.gradients): its statistics against the formulas
written out here, its gradients against a plainly written GRPO first-step loss, and coupled-GRPO's
gradient as the sum of its two halves."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages" / "grpo"))
from grpo_stage_helpers import MASK, make_trainer, toy_config, write_toy_problems  # noqa: E402

from megatron_diffu.repro import gradients  # noqa: E402


def test_statistics_follow_their_formulas():
    g = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0]), torch.tensor([2.0, 2.0, 1.0])]
    ref = torch.tensor([0.0, 1.0, 1.0])
    st = gradients.gradient_stats(g, {"r": ref})
    norms = [math.sqrt(sum(x * x for x in v.tolist())) for v in g]
    mean = [sum(v[i].item() for v in g) / 3 for i in range(3)]
    mean_sq = sum(x * x for x in mean)
    noise = sum(sum((v[i].item() - mean[i]) ** 2 for i in range(3)) for v in g) / 3 / mean_sq

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pairs = [cos(g[i].tolist(), g[j].tolist()) for i in range(3) for j in range(3) if i != j]
    assert math.isclose(st["norm"], sum(norms) / 3, rel_tol=1e-12)
    assert math.isclose(st["mean_norm"], math.sqrt(mean_sq), rel_tol=1e-12)
    assert math.isclose(st["mask_noise"], noise, rel_tol=1e-12)
    assert math.isclose(st["cos_seed"], sum(pairs) / len(pairs), rel_tol=1e-12)
    assert math.isclose(st["cos_r"], cos(mean, ref.tolist()), rel_tol=1e-12)
    same = gradients.gradient_stats([g[0], g[0]])
    assert same["mask_noise"] == 0.0 and math.isclose(same["cos_seed"], 1.0)


def _trainer_with_rollout(tmp_path):
    cfg = toy_config(write_toy_problems(tmp_path / "p.jsonl"), {"optimizer": {"lr": 0.0, "min_lr": 0.0}})
    tr = make_trainer(cfg)
    buf, _ = tr.stage.rollout(0)
    buf.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 2.0, -1.0, 0.5, -1.5])  # toy rewards may tie
    return tr, buf


def test_d1_gradient_is_the_plain_first_step_loss_and_coupled_is_the_sum_of_its_halves(tmp_path):
    tr, buf = _trainer_with_rollout(tmp_path)
    got = gradients.policy_gradient(tr, buf, 0, MASK, gradients.VARIANT_SPECS["d1_no_prompt_mask"])
    # the first GRPO step's loss written out: every completion position masked, logits at every
    # position, -sum_r A_r sum_n m_rn log p(o_rn | x) / sum m
    x = torch.where(buf.maskable, torch.full_like(buf.tokens, MASK), buf.tokens)
    attn = None if bool(buf.real.all()) else buf.real
    logits = tr.model(x, attention_mask=attn).float()
    lp = torch.log_softmax(logits, -1).gather(-1, buf.tokens[..., None])[..., 0]
    m = buf.completion_mask.float()
    loss = -(buf.advantages[:, None] * lp * m).sum() / m.sum()
    want = gradients.flat_gradient(tr, loss)
    # fp32 forward/backward of the same arithmetic in another grouping of rows (the head runs on
    # the gathered rows): agreement to a few hundred ulps of the largest entries
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), (got - want).abs().max()
    assert float(want.norm()) > 0
    spec = gradients.VARIANT_SPECS
    whole = gradients.policy_gradient(tr, buf, 1, MASK, spec["coupled"])
    halves = sum(gradients.policy_gradient(tr, buf, 1, MASK, spec[v]) for v in ("coupled_full_half", "coupled_pair_half"))
    assert torch.allclose(whole, halves, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
    # other mask seeds give another coupled gradient (the masks are the noise the probe measures)
    assert not torch.allclose(whole, gradients.policy_gradient(tr, buf, 0, MASK, spec["coupled"]))
    # coupled with prompt masking: the stage's option reaches the copies; at 0 it is DiffuCoder's coupled,
    # and the recipe's setting is restored after every variant
    no_prompt_mask = gradients.Variant("coupled", spec["coupled"].logp, (("coupled_p_mask_prompt", 0.0),))
    assert torch.equal(gradients.policy_gradient(tr, buf, 1, MASK, no_prompt_mask), whole)
    assert not torch.allclose(gradients.policy_gradient(tr, buf, 1, MASK, spec["coupled_prompt_mask"]), whole)
    assert (tr.cfg.grpo.estimator, tr.cfg.grpo.coupled_p_mask_prompt) == ("coupled", 0.0)
    # its probability is the recipe's d1 prompt masking, read when the probe runs
    tr.cfg.grpo.p_mask_prompt = 0.3
    explicit = gradients.Variant("coupled", spec["coupled"].logp, (("coupled_p_mask_prompt", 0.3),))
    assert torch.equal(gradients.policy_gradient(tr, buf, 1, MASK, spec["coupled_prompt_mask"]),
                       gradients.policy_gradient(tr, buf, 1, MASK, explicit))


def test_probe_reports_every_variant_against_d1(tmp_path):
    tr, _ = _trainer_with_rollout(tmp_path)
    lines = []
    res = gradients.probe(tr, tr.stage, rollouts=1, mask_seeds=2, progress=lines.append)
    assert set(res["mean"]) == set(gradients.VARIANTS) and len(lines) == 1
    assert math.isclose(res["mean"]["d1"]["cos_d1"], 1.0, rel_tol=1e-9)
    # coupled's x_full half is half of d1's gradient without prompt masking: the same direction
    assert math.isclose(res["mean"]["coupled_full_half"]["cos_d1_no_prompt_mask"], 1.0, rel_tol=1e-5)
    assert math.isclose(2 * res["mean"]["coupled_full_half"]["norm"], res["mean"]["d1_no_prompt_mask"]["norm"], rel_tol=1e-4)
    # d1 without prompt masking has no mask noise: every completion token is masked, nothing else
    assert res["mean"]["d1_no_prompt_mask"]["mask_noise"] < 1e-10
    assert "| coupled |" in gradients.format_table(res)


def test_probe_builds_the_runs_grpo_trainer_from_its_sft_checkpoint(tmp_path):
    """`--run DIR`: the GRPO arms' configuration and the run's SFT weights (a tiny run's data, pretraining, SFT and RL set)."""
    import json
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(repo))
    r = subprocess.run([sys.executable, "-m", "megatron_diffu.repro.mini", "--mode", "tiny", "--out", str(tmp_path),
                        "--only", "data", "pretrain", "sft", "select_rl"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "g.json"
    assert gradients.main(["--run", str(tmp_path), "--rollouts", "1", "--mask-seeds", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["mean"]) == set(gradients.VARIANTS) and res["rollouts"] == 1
    tr, _ = gradients.build_trainer(str(tmp_path), [])
    assert tr.cfg.grpo.estimator == "coupled" and tr.cfg.checkpoint.finetune and tr.cfg.checkpoint.save is None
    from megatron_diffu.convert.loading import load_model_for_inference

    sft, _ = load_model_for_inference(str(tmp_path / "checkpoints" / "sft"), device=torch.device("cpu"))
    want = dict(sft.named_parameters())
    for name, p in tr.model.named_parameters():  # the probe's model holds the SFT weights
        assert torch.equal(p.detach().float(), want[name].detach().float()), name
