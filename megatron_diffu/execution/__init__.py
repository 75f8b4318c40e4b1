"""Running untrusted, model-written code: a LEAF package (standard library only; it imports nothing
else from megatron_diffu, and no torch), used by `eval/`, `rl/` and `data/`.

- `sandbox.py`: `run_python(code, timeout_s, memory_mb, ...) -> SandboxResult`, `run_many`,
  `sandbox_mode`, `set_max_concurrency` (the threat model is in its docstring); `launcher.py` is
  its inside half, run as a script (never imported).
- `problems.py`: `Problem`, the problem file format (`read_jsonl`, `problem_from_record`,
  `load_problems`, `humaneval_path`) and the programs that test a solution (`build_program` for an
  evaluation sample, `test_case_programs` for a graded pass rate).
- `verdicts.py` (+ `cases.py`, `replay.py`): verdicts decided outside the untrusted process: tests
  decomposed into data-only cases on the trusted side (`cases.py`), checks that do not decompose
  replayed there (`replay.py`), the programs the sandbox runs for them and `judge`.
- `protocol.py`: the instruct prompt (`instruct_prompt`, `instruct_messages`) and reading the code
  back from an answer (`extract_code` for evaluation, `single_python_block` for the RL format rule).
"""
