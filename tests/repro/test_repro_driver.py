"""The mini driver fails closed when the RL prompts are not the prompts SFT trained on (a system
message SFT never saw made the first full run's GRPO arms roll out 4-13-token answers, pass rate 0)."""
import json
import shlex

import pytest

from megatron_diffu.data.rl import chat_prompt_ids
from megatron_diffu.repro import mini, tasks
from megatron_diffu.repro.evaluate import load_problem_records


class CharTokenizer:
    """One id per character of role + content: enough to tell two chat wrappings apart."""

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return [ord(c) for m in messages for c in m["role"] + ":" + m["content"]] + ([1] if add_generation_prompt else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 1)


def _write_rl(run, recs, probs, system_prompt):
    with open(run.path("data", "rl.jsonl"), "w") as f:
        for r in recs:
            ids = chat_prompt_ids(CharTokenizer(), probs[r["task_id"]], False, system_prompt)
            f.write(json.dumps({"task_id": r["task_id"], "prompt_ids": ids}) + "\n")


def test_rl_prompts_must_equal_the_sft_and_evaluation_prompts(tmp_path):
    run = mini.Run(str(tmp_path), "tiny", mini.SETTINGS["tiny"])
    run._tok = CharTokenizer()
    recs = [t.to_record() for t in tasks.generate("train", 3, seed=0)]
    probs = load_problem_records(recs)
    _write_rl(run, recs, probs, None)
    run._check_rl_prompts(probs)  # the SFT wrapping: user turn only
    _write_rl(run, recs, probs, "You are a helpful assistant.")
    with pytest.raises(RuntimeError, match=r"rl\.jsonl:1: prompt_ids of .* differ from the SFT/evaluation prompt"):
        run._check_rl_prompts(probs)


def test_eta_scale_comes_from_the_stages_big_enough_to_time_the_machine():
    """measured / planned seconds over finished stages of >= 5% of the plan; the 10-second data stage
    (planned 2% of 2700 s = 54 s) must not make the ETA 5x too short."""
    budget = mini.BUDGET_S["full"]
    assert mini.plan_scale({}, budget) == 1.0
    assert mini.plan_scale({"data": 10.0}, budget) == 1.0
    stage_s = {"data": 10.0, "pretrain": 200.0, "sft": 855.0}
    want = (200.0 + 855.0) / ((mini.PLAN["pretrain"] + mini.PLAN["sft"]) * budget)
    assert mini.plan_scale(stage_s, budget) == pytest.approx(want)


def test_set_overrides_accumulate_and_parse_each_fields_type():
    """`--set a=1 b=2` and `--set a=1 --set b=2` both keep both (argparse's plain nargs would keep
    only the last --set); values take the field's type."""
    for argv in (["--set", "seed=3", "sft_iters=7"], ["--set", "seed=3", "--set", "sft_iters=7"]):
        s = mini.apply_overrides(mini.SETTINGS["quick"], mini.parse_args(argv).set)
        assert (s.seed, s.sft_iters, s.rl_iters) == (3, 7, mini.SETTINGS["quick"].rl_iters)
    assert mini.apply_overrides(mini.SETTINGS["full"], ["contexts=op_map"]).contexts == "op_map"


@pytest.mark.parametrize("pair, message", [("seed", "expected KEY=VALUE"), ("sed=1", "sed: not a setting"),
                                            ("seed=one", "seed takes a int")])
def test_set_rejects_a_malformed_pair_an_unknown_key_and_a_wrong_type(pair, message):
    with pytest.raises(SystemExit, match=message):
        mini.apply_overrides(mini.SETTINGS["full"], [pair])


@pytest.mark.parametrize("mode, argv", [("quick", []), ("quick", ["--set", "seed=3", "sft_flags=--weight-decay 3.0 --lr 1e-3"]),
                                        ("full", ["--set", "contexts=", "bf16=off"]), ("tiny", ["--set", "rl_iters=5"])])
def test_the_recorded_command_makes_the_same_settings(mode, argv):
    """report.md's command, run again, must make the run it describes: every override survives, values
    with spaces or empty values included, and a plain run's command carries no --set."""
    flags = {"quick": ["--quick"], "tiny": ["--mode", "tiny"]}.get(mode, [])
    a = mini.parse_args(flags + argv)
    s = mini.apply_overrides(mini.SETTINGS[mode], a.set)
    command = mini.reproducing_command(mode, s)
    words = shlex.split(command)
    assert words[:2] == ["bash", "examples/mini_repro.sh"] and ("--set" in words) == bool(argv)
    again = mini.parse_args(words[2:])
    assert (again.mode or ("quick" if again.quick else "full")) == mode
    assert mini.apply_overrides(mini.SETTINGS[mode], again.set) == s
