"""The reference policy of the KL term: a frozen copy of the policy, re-synced every
`ref_model_sync_steps` optimizer steps. The trainer's checkpointer saves and restores it like the
model (`Stage.checkpoint_states`, DCP keys `reference.*`, resharded to any layout).

Sync rule (docs/ALGORITHMS.md sec. 5.6): TRL's `SyncRefModelCallback` (TR-DPO mixup), which the
DiffuCoder recipe turns on (`sync_ref_model: True`, `ref_model_sync_steps: 64`, alpha left at TRL's
default `ref_model_mixup_alpha = 0.6`):

    ref <- alpha * policy + (1 - alpha) * ref        (per parameter, in the parameters' dtype)

alpha = 1 is a hard copy (the whole state dict, buffers included).
"""
from __future__ import annotations

import torch


class ReferencePolicy:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    def sharded_state_dict(self):
        return self.model.sharded_state_dict()

    @torch.no_grad()
    def sync_from(self, policy: torch.nn.Module, alpha: float = 1.0) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref; alpha = 1: ref <- policy (a hard copy)."""
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"reference sync: alpha={alpha} must be in (0, 1]")
        if alpha == 1.0:
            self.model.load_state_dict(policy.state_dict())
            return
        ref_params = dict(self.model.named_parameters())
        pol_params = dict(policy.named_parameters())
        if ref_params.keys() != pol_params.keys():
            raise ValueError("reference sync: the reference and the policy have different parameters")
        for name, ref in ref_params.items():
            ref.mul_(1.0 - alpha).add_(pol_params[name].detach().to(ref.dtype), alpha=alpha)
