"""The reference policy of the KL term: a frozen copy of the policy, re-synced every
`ref_model_sync_steps` optimizer steps. The trainer's checkpointer saves and restores it like the
model (`Stage.checkpoint_states`, DCP keys `reference.*`, resharded to any layout)."""
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
    def sync_from(self, policy: torch.nn.Module) -> None:
        """ref <- policy (a hard copy)."""
        self.model.load_state_dict(policy.state_dict())
