"""Coupled-GRPO, split by role (docs/ALGORITHMS.md sec. 5); `stage.GRPOStage` composes them:

- `prompts.py`   which problems a rollout batch takes (seeded permutation per epoch)
- `rollout.py`   completions from the diffusion sampler, the rollout buffer, completion masks
- `scoring.py`   sandboxed rewards over all ranks, group advantages, reward statistics
- `logprobs.py`  coupled micro-batches and the forward-only old/reference log-prob passes
- `loss.py`      the training forward step: current estimate -> clipped + beta * k3 loss
- `reference.py` the reference policy, saved and restored by the trainer's checkpointer
- `config.py`    the `grpo:` section and the run config
"""
