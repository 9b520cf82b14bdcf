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
from typing import Any

import torch

from learner.amm import (StudentInputs, adversary_step, adversary_values, oracle_values, true_distances,
                         student_loss)
from learner.amm_heads import AdversaryClass, QHead
from learner.batch import LearnerBatch
from learner.collectives import average_over_ranks
from learner.loss_params import AMMParams, LossParams, parse_loss_params
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
    detached), then the student's surrogate with the updated adversaries held fixed. Every rank
    keeps a copy of the heads; their gradients are averaged over the learner group so the copies
    stay identical, as DeepSpeed keeps the student's.
    """

    needs_hidden = True

    def __init__(self, params: Any, *, hidden_size: int, vocab_size: int, device="cpu",
                 steps: int = 1, temperature: float = 1.0):
        """``params``: AMMParams, or a mapping validated as ``loss.params`` of loss 'amm'."""
        self.params: AMMParams = parse_loss_params("amm", params)
        self.temperature = temperature  # the rollouts' sampling temperature (student_loss)
        self.cls = AdversaryClass(self.params.adversary_class, self.params.chi2_lambda)
        self.oracle = self.params.adversary == "oracle"
        self.heads = tuple(QHead(hidden_size, vocab_size, self.params.head, cls=self.cls,
                                 rank=self.params.head_rank).to(device) for _ in range(2))
        self.optimizer = torch.optim.Adam([p for h in self.heads for p in h.parameters()],
                                          lr=self.params.adv_lr)
        # One scheduler step per student step, over the job's learner steps.
        self.scheduler = make_lr_scheduler(self.optimizer, self.params.adv_lr_schedule, steps)
        self.steps = steps

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
        p, beta = self.params, self.beta()
        logits = batch.response_logits(out.logits)
        hidden = batch.response_logits(out.hidden_states[-1]).detach()
        totals = batch.totals
        ascents = p.adv_steps + (p.adv_warmup_steps if self.step == 0 else 0)
        adv_losses = [] if self.oracle else [
            adversary_step(self.heads, self.optimizer, hidden, logits, batch.teacher, batch.mask,
                           batch.is_on_policy, beta, p.tail, average_over_ranks,
                           p.chunk_size, totals)
            for _ in range(ascents)]

        def values_at(index):  # the updated adversaries (or the oracle), a chunk at a time
            if self.oracle:
                return oracle_values(self.cls, logits, batch.teacher, index)
            return adversary_values(self.heads, hidden, logits, batch.teacher, batch.is_on_policy, index)
        inputs = StudentInputs(batch.response_ids, batch.mask, batch.is_on_policy, batch.behavior_logprobs)
        value, metrics = student_loss(logits, batch.teacher, values_at, inputs, beta, tail=p.tail,
                                      baseline_kind=p.baseline, ratio_clip=p.ratio_clip,
                                      returns=p.returns, pg_coef=p.pg_coef, cls=self.cls,
                                      penalty_grad=p.penalty_grad, temperature=self.temperature,
                                      totals=totals, pg_normalize=p.pg_normalize,
                                      chunk_size=p.chunk_size)
        if adv_losses:
            metrics["adversary_loss"] = adv_losses[-1]
        if p.beta_schedule != "constant":
            metrics["beta"] = beta
        if p.anchor_fkl > 0:  # reported apart, so the AMM-only loss stays visible
            anchor = forward_kl(logits, batch.teacher, batch.mask, chunk_size=p.chunk_size)
            metrics["anchor_fkl"] = float(anchor.detach())
            value = value + p.anchor_fkl * anchor
        # What a perfect adversary of the class would measure, beside the learned distances.
        metrics.update(true_distances(logits, batch.teacher, batch.mask, batch.is_on_policy, self.cls,
                                      p.tail, totals, p.chunk_size))
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
