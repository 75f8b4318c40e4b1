"""The training stages, each a short composition of the parts around the one trainer loop:

- `diffusion/`: masked-diffusion pretraining and SFT: ONE stage parameterised by its data (packed
  token windows / conversations), its masking policy and its loss normaliser.
- `grpo/`: coupled-GRPO, split by role (prompts, rollout, rewards, log-prob passes, loss,
  reference policy).
- `main.py`: `run_stage(argv, make_stage, config_cls)`, the one entry point behind
  `python -m megatron_diffu.pretrain | sft | grpo`.
"""
