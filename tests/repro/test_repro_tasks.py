"""The mini reproduction's task family (megatron_diffu.repro.tasks): seeded, correct tests, disjoint splits."""
from __future__ import annotations

import pytest

from megatron_diffu.execution.problems import problem_from_record
from megatron_diffu.repro import tasks


def test_generator_is_seeded_and_deterministic():
    a = [t.to_record() for t in tasks.generate("train", 40, seed=3)]
    b = [t.to_record() for t in tasks.generate("train", 40, seed=3)]
    c = [t.to_record() for t in tasks.generate("train", 40, seed=4)]
    assert a == b
    assert a != c


def test_splits_are_disjoint_in_parameters_and_templates():
    train = tasks.generate("train", 1500, seed=0)
    hc = tasks.generate("heldout_constants", 200, seed=0)
    ht = tasks.generate("heldout_templates", 100, seed=0)
    train_keys = {(t.template, t.constants) for t in train}
    assert not train_keys & {(t.template, t.constants) for t in hc}  # new constants for a seen template
    primary = {(t.template, t.constants[0]) for t in train if t.constants}
    assert not primary & {(t.template, t.constants[0]) for t in hc}  # even the primary constant is new
    assert all(t.template in set(tasks.train_templates()) for t in hc)
    assert {t.template for t in hc} <= {t.template for t in train}  # the template itself was trained on
    seen = {t.template for t in train}
    assert all(t.template in tasks.HELDOUT_TEMPLATES and t.template not in seen for t in ht)
    assert len({t.template for t in ht}) == len(tasks.heldout_templates())  # every unseen template used
    assert not set(tasks.train_templates()) & set(tasks.heldout_templates())
    # each operator word of an unseen composition appears in other training contexts
    for t in tasks.heldout_templates():
        for unit in t.split(":")[1].split("|"):
            contexts = {x.split(":")[0] for x in tasks.train_templates() if unit in x.split(":")[1].split("|")}
            need = 3 if unit in tasks.INT_OPS or unit in tasks.INT_PREDS else 1  # string words: 2 contexts in all
            assert len(contexts) >= need, (t, unit, contexts)


def test_rl_split_is_unseen_in_training_and_disjoint_from_the_heldout_constants():
    """rl_constants: trained templates whose primary constant is of a second seeded quarter of its
    domain, never a training or held-out value; the domains are small enough to check exhaustively."""
    train = tasks.generate("train", 3000, seed=0)
    hc = tasks.generate("heldout_constants", 200, seed=0)
    rl = tasks.generate("rl_constants", 200, seed=0)
    primary = lambda ts: {(t.template, t.constants[0]) for t in ts if t.constants}  # noqa: E731
    assert not primary(rl) & primary(train) and not primary(rl) & primary(hc)
    assert {t.template for t in rl} <= {t.template for t in train}
    assert all(t.split == "rl_constants" for t in rl)
    for template in {t.template for t in rl}:
        key = next(t.constants[0][0] for t in rl if t.template == template)
        dom = set(tasks._primary_domain(template, key))
        held, rlv = tasks.heldout_values(template, key), tasks.rl_values(template, key)
        quarter = max(1, len(dom) // 4)
        assert len(held) == len(rlv) == quarter and not held & rlv and len(dom - held - rlv) >= 1
        assert {v for (tp, (k, v)) in primary(train) if tp == template} <= dom - held - rlv


# sha256 (16 hex) of problems generated with the full mode's contexts, recorded with the generator
# before the RL split existed: reserving RL values must not change a single evaluation problem, and
# reserve_rl=False must give back that generator's training problems
SHA_BEFORE_RL_SPLIT = {"heldout_constants": "47e9ca8b013cbaec", "heldout_templates": "dda9448c4f10f60b",
                       "train": "933aaed4ec329d60"}


def _mini_problems(split: str, n: int, **kw) -> list:
    from megatron_diffu.repro.mini import MINI_CONTEXTS

    return tasks.generate(split, n, 0, contexts=MINI_CONTEXTS.split(","), **kw)


def _sha(problems: list) -> str:
    import hashlib
    import json

    recs = [t.to_record() for t in problems]
    return hashlib.sha256(json.dumps(recs, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("split,n", [("heldout_constants", 120), ("heldout_templates", 80)])
def test_heldout_problems_are_those_of_the_runs_before_the_rl_split(split, n):
    assert _sha(_mini_problems(split, n)) == SHA_BEFORE_RL_SPLIT[split]


def test_without_the_rl_reservation_the_train_split_is_that_of_the_runs_before():
    """reserve_rl=False (rl_split=train, --quick) reproduces the training problems of the generator
    before the RL split, problem for problem; the default reserves every RL value."""
    unreserved = _mini_problems("train", 1000, reserve_rl=False)
    assert _sha(unreserved) == SHA_BEFORE_RL_SPLIT["train"]
    assert any(tasks.is_rl_constants(t.template, t.constants) for t in unreserved)
    assert not any(tasks.is_rl_constants(t.template, t.constants) for t in _mini_problems("train", 1000))


def _programs(task: tasks.Task, code: str):
    from megatron_diffu.execution.problems import build_program

    return build_program(problem_from_record(task.to_record(), task.task_id), "\n" + code)


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_reference_solutions_pass_and_wrong_ones_fail_in_the_sandbox(split):
    from megatron_diffu.eval.humaneval import evaluate_samples

    sample = tasks.generate(split, 150 if split == "train" else 60, seed=1)
    probs = {t.task_id: problem_from_record(t.to_record(), t.task_id) for t in sample}
    good = [{"task_id": t.task_id, "completion": "\n" + t.solution} for t in sample]
    # a wrong solution: the right function returning a different value of the same type
    bad = [{"task_id": t.task_id, "completion": "\n" + _wrong(t)} for t in sample]
    res = evaluate_samples(good + bad, probs, n_workers=2, progress=False, no_site=True)
    n = len(sample)
    assert all(r["passed"] for r in res[:n]), [r["result"] for r in res[:n] if not r["passed"]][:3]
    assert not any(r["passed"] for r in res[n:]), [r["task_id"] for r in res[n:] if r["passed"]][:3]


def _wrong(t: tasks.Task) -> str:
    """The reference with every test's expected value off: wrap the function to perturb its result."""
    return (t.solution + f"\n_ref = {t.entry_point}\n"
            f"def {t.entry_point}(*a):\n"
            "    r = _ref(*a)\n"
            "    if isinstance(r, bool): return not r\n"
            "    if isinstance(r, (int, float)): return r + 1\n"
            "    if isinstance(r, str): return r + '#'\n"
            "    return list(r) + [None]\n")


def test_prompt_and_response_follow_the_protocol():
    from megatron_diffu.execution.protocol import WHOLE_FUNCTION_INSTRUCTION, single_python_block

    t = tasks.generate("heldout_templates", 1, seed=0)[0]
    assert t.prompt.startswith(WHOLE_FUNCTION_INSTRUCTION)
    assert f"def {t.signature}:" in t.prompt and t.docstring in t.prompt
    assert single_python_block(t.response).strip() == t.solution
    assert len(t.tests) == tasks.NUM_TESTS and all(s.startswith(f"assert {t.entry_point}(") for s in t.tests)


def test_a_context_subset_is_a_smaller_family_with_its_own_heldout_compositions():
    ctx = ["op_scalar", "op_map", "pred_filter", "sop_scalar"]
    train = tasks.generate("train", 200, seed=0, contexts=ctx)
    held = tasks.generate("heldout_templates", 40, seed=0, contexts=ctx)
    assert {t.template.split(":")[0] for t in train} == set(ctx)
    # pred_filter:div and sop_scalar:replace are dropped: no other context of the subset trains
    # `div` or `replace`, so they would test an unseen word rather than a composition
    assert {t.template for t in held} == {"op_map:mul", "op_scalar:fdiv"}
    assert not {t.template for t in train} & {t.template for t in held}
    # every operator of a held-out composition is trained in another context of the subset
    for t in {t.template for t in held}:
        unit = t.split(":")[1]
        assert any(x.split(":")[1] == unit for x in tasks.train_templates(ctx) if not x.startswith(t.split(":")[0]))
    with pytest.raises(ValueError, match="unknown task contexts"):
        tasks.train_templates(["op_scalar", "nope"])
    with pytest.raises(ValueError, match="no heldout_templates templates"):
        tasks.generate("heldout_templates", 1, contexts=["pred_scalar"])
