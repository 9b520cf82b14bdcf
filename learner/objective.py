"""What the learner optimises, chosen once by ``loss.name``.

An objective turns a forward pass and a batch into the student's loss, and may keep state of
its own (AMM's adversaries). The learner calls only these members, so a new objective plugs
in here without touching the learner:
- ``needs_hidden``: whether the forward must return hidden states;
- ``loss(out, batch) -> (loss, metrics)``;
- ``after_student_step(out, batch)``: hook after the optimiser step;
- ``state_dict()`` / ``load_state_dict()`` for checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch

from learner.batch import LearnerBatch
from learner.losses import get_loss


class DistributionObjective:
    """A per-position divergence between teacher and student (or SFT) from ``learner.losses``."""

    needs_hidden = False

    def __init__(self, name: str, params: dict[str, Any]):
        self.spec = get_loss(name)
        self.params = self.spec.resolve_params(params)

    def loss(self, out: Any, batch: LearnerBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = batch.response_logits(out.logits)
        extra = {"labels": batch.response_ids} if self.spec.needs_labels else {}
        value = self.spec.fn(logits, batch.teacher, batch.mask, **extra, **self.params)
        return value, {}

    def after_student_step(self, out: Any, batch: LearnerBatch) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_loss(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate ``loss.name`` and ``loss.params``; returns the params with defaults filled in."""
    return get_loss(name).resolve_params(params)


def make_objective(loss: dict, *, hidden_size: int, vocab_size: int):
    """Build the objective for a ``loss`` config section (a dict)."""
    return DistributionObjective(loss["name"], loss.get("params") or {})
