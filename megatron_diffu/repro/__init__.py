"""A reproducible mini DiffuCoder experiment on 2 CPU cores (issue 18): a seeded task family with
executable tests (tasks.py), the corpus / SFT / RL files built from it (files.py), evaluation in the
sandbox with bootstrap intervals (evaluate.py), the report (report.py) and the driver (mini.py:
`python -m megatron_diffu.repro.mini`, wrapped by examples/mini_repro.sh)."""
