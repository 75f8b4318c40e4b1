"""Behaviour is unchanged by refactors: short tiny-config runs of pretraining, SFT and coupled-GRPO
reproduce the per-iteration curves recorded before the package was reshaped
(`tests/assets/golden_stages.json`, written by `stage_runs.py --record`).

Tolerance: the recording machine reproduces them bit for bit (checked when they were recorded and
after the reshaping). Another x86 CPU (AVX2 vs AVX-512 kernels) sums fp32 dot products in another
order: each op differs by a few ulp (~1e-7 relative), and six AdamW steps of a tiny model carry that
to ~1e-6 relative in the loss, so 2e-5 relative (plus 1e-7 absolute for values near zero such as
the GRPO loss) is an order of magnitude above the arithmetic and far below any behaviour change
(a different mask, sample, normaliser or update moves these numbers by > 1e-3). The GRPO run
samples its rollouts; its toy reward counts one token among 64 and the rollouts it records are
checked through reward_mean and completion_length, which change only if a sampled token does.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stage_runs import ASSET, run  # noqa: E402

GOLDEN = json.loads(ASSET.read_text())


def _assert_close(got, want, where):
    assert len(got) == len(want), f"{where}: {len(got)} values, golden has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=2e-5, abs=1e-7), f"{where}[{i}]: {g!r} != golden {w!r}"


@pytest.mark.parametrize("stage", sorted(GOLDEN))
def test_stage_reproduces_its_golden_curves(stage):
    got, want = run(stage), GOLDEN[stage]
    for key, values in want["curves"].items():
        _assert_close(got["curves"][key], values, f"{stage}.{key}")
    for (it_g, m_g), (it_w, m_w) in zip(got.get("validation", []), want.get("validation", [])):
        assert it_g == it_w
        _assert_close([m_g[k] for k in sorted(m_w)], [m_w[k] for k in sorted(m_w)], f"{stage}.validation@{it_w}")
    assert len(got.get("validation", [])) == len(want.get("validation", []))
