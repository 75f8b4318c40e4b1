"""Masked-diffusion pretraining and SFT: one stage (`stage.DiffusionStage`), parameterised by its
data (`data.py`), its masking policy and its loss normaliser (`objective.py`); `recipes.py` names
the two configurations (`pretraining_stage`, `sft_stage`). Formulas: docs/ALGORITHMS.md sec. 2-3."""
