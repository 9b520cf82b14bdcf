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

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from learner.amm import ADVERSARIES, AMMSettings, GameInputs, StudentInputs, student_loss, true_distances
from learner.amm_heads import QHead
from learner.batch import LearnerBatch
from learner.collectives import average_over_ranks
from learner.loss_params import parse_loss_params
from learner.losses import forward_kl, get_loss
from learner.schedule import make_lr_scheduler


class DistributionObjective:
    """A per-position divergence between teacher and student (or SFT) from ``learner.losses``."""

    needs_hidden = False

    def __init__(self, name: str, params: Any = None):
        self.spec = get_loss(name)
        self.params = parse_loss_params(name, params).model_dump()  # the loss function's keywords

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


class AMMObjective:
    """Adversarial moment matching (``learner.amm``): two Q-head adversaries and their optimiser.

    Per learner step: ``adv_steps`` ascent steps of the adversaries on the batch (student
    detached; ``adv_warmup_steps`` more on the first), then the student's surrogate with the
    updated adversaries held fixed, plus ``anchor_fkl`` times forward KL. Every rank keeps a copy
    of the heads; their gradients are averaged over the learner group so the copies stay
    identical, as DeepSpeed keeps the student's. The variants (class, head, return estimator,
    learned or oracle adversary) are objects built here once from the typed ``loss.params``.
    """

    needs_hidden = True

    def __init__(self, params: Any, *, hidden_size: int, vocab_size: int, device="cpu",
                 steps: int = 1, temperature: float = 1.0):
        """``params``: AMMParams, or a mapping validated as ``loss.params`` of loss 'amm';
        ``temperature``: the rollouts' sampling temperature (``AMMSettings``)."""
        p = self.params = parse_loss_params("amm", params)
        self.settings = AMMSettings.from_params(p, temperature)
        self.cls = self.settings.cls
        # The heads exist for the oracle too, so a checkpoint's layout does not depend on it.
        self.heads = tuple(QHead(hidden_size, vocab_size, p.head, cls=self.cls, rank=p.head_rank).to(device)
                           for _ in range(2))
        self.optimizer = torch.optim.Adam([w for h in self.heads for w in h.parameters()], lr=p.adv_lr)
        # One scheduler step per student step, over the job's learner steps.
        self.scheduler = make_lr_scheduler(self.optimizer, p.adv_lr_schedule, steps)
        self.steps = steps
        self.adversary = ADVERSARIES[p.adversary](self.heads, self.optimizer, average_over_ranks)

    @property
    def step(self) -> int:
        """Student steps taken so far (the adversaries' scheduler counts them, and is saved)."""
        return self.scheduler.last_epoch

    def beta(self) -> float:
        """The off-policy weight at this step: constant, or linear from beta_start to beta."""
        p = self.params
        if p.beta_schedule == "constant":
            return p.beta
        frac = min(1.0, self.step / max(self.steps - 1, 1))
        return p.beta_start + (p.beta - p.beta_start) * frac

    def loss(self, out: Any, batch: LearnerBatch) -> tuple[torch.Tensor, dict[str, float]]:
        p, settings = self.params, replace(self.settings, beta=self.beta())
        logits = batch.response_logits(out.logits)
        hidden = batch.response_logits(out.hidden_states[-1]).detach()
        game = GameInputs(logits, batch.teacher, batch.mask, batch.is_on_policy, hidden, batch.totals)
        ascents = p.adv_steps + (p.adv_warmup_steps if self.step == 0 else 0)
        adv_losses = [self.adversary.ascend(game, settings) for _ in range(ascents)]
        inputs = StudentInputs(batch.response_ids, batch.mask, batch.is_on_policy, batch.behavior_logprobs,
                               batch.totals)
        # The updated adversaries' (or the oracle's) values, a chunk at a time.
        value, metrics = student_loss(logits, batch.teacher, partial(self.adversary.values, game), inputs,
                                      settings)
        if adv_losses and adv_losses[-1] is not None:
            metrics["adversary_loss"] = adv_losses[-1]
        if p.beta_schedule != "constant":
            metrics["beta"] = settings.beta
        if p.anchor_fkl > 0:  # reported apart, so the AMM-only loss stays visible
            anchor = forward_kl(logits, batch.teacher, batch.mask, chunk_size=p.chunk_size)
            metrics["anchor_fkl"] = float(anchor.detach())
            value = value + p.anchor_fkl * anchor
        # What a perfect adversary of the class would measure, beside the learned distances.
        metrics.update(true_distances(game, settings))
        return value, metrics

    def after_student_step(self, out: Any, batch: LearnerBatch) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"heads": [h.state_dict() for h in self.heads], "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for head, sd in zip(self.heads, state["heads"]):
            head.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


def make_objective(loss: Any, *, hidden_size: int, vocab_size: int, device: Any = "cpu", steps: int = 1,
                   temperature: float = 1.0):
    """Build the objective for a ``loss`` config section: a mapping (``name``, ``params`` as a
    mapping or a LossParams model) or an object with those attributes; ``steps``: the job's
    learner steps; ``temperature``: the rollouts' sampling temperature."""
    name, params = _loss_section(loss)
    params = parse_loss_params(name, params)
    if name == "amm":
        return AMMObjective(params, hidden_size=hidden_size, vocab_size=vocab_size, device=device,
                            steps=steps, temperature=temperature)
    return DistributionObjective(name, params)


def _loss_section(loss: Any) -> tuple[str, Any]:
    """(name, params) of a loss section given as a mapping or as a config object."""
    if isinstance(loss, Mapping):
        return loss["name"], loss.get("params")
    return loss.name, loss.params
