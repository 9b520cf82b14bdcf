"""The teacher signal a loss consumes: full logits, or a top-k slice plus the tail mass.

Shapes follow the response positions of a padded batch: ``B`` sequences, ``T`` positions.
Position ``t`` holds the teacher's distribution over the token at response index ``t``
(the state is the prompt plus the first ``t`` response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class TopKSignal:
    """Teacher top-k log-probabilities per position and the log of the mass outside them.

    ids:          [B, T, k] int64   token ids of the teacher's k most likely tokens
    logprobs:     [B, T, k] float   log pi*(id | s_t), normalised over the full vocabulary
    tail_logmass: [B, T]    float   log(1 - sum_k exp(logprobs)); -inf when k covers it all
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor

    def to(self, device: torch.device | str) -> "TopKSignal":
        return TopKSignal(self.ids.to(device), self.logprobs.to(device), self.tail_logmass.to(device))


# Full teacher logits [B, T, V] or a top-k signal.
TeacherSignal = Union[torch.Tensor, TopKSignal]


def tail_logmass_from_topk(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(logprobs)) over the last axis, computed stably (log1p(-exp(lse)))."""
    lse = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    # log(1 - e^x) = log(-expm1(x)); -inf when the top-k already holds all the mass.
    return torch.log(-torch.expm1(lse))


def drop_ids_beyond(signal: TopKSignal, limit: Optional[int], pad_logprob: float = -1e4) -> TopKSignal:
    """The signal with every top-k slot naming an id >= ``limit`` turned into a padded slot
    (id 0, log-prob ``pad_logprob``: the losses drop it) and its mass moved into the tail;
    the signal itself when ``limit`` is None or no slot names such an id.

    Ids at or past the tokenizer's size are padding rows of the teacher's output layer, not
    tokens: no loss may target them on their own, and a student with fewer rows has no logit
    for them. Their mass stays in the distribution, in the tail bucket the losses compare
    with the student's mass outside the top-k:
    tail' = log(exp(tail) + sum_{dropped} exp(logprob)).
    """
    if limit is None:
        return signal
    beyond = signal.ids >= limit
    if not bool(beyond.any()):
        return signal
    dropped = torch.where(beyond, signal.logprobs, torch.full_like(signal.logprobs, float("-inf")))
    tail = torch.logaddexp(signal.tail_logmass, torch.logsumexp(dropped, dim=-1))
    return TopKSignal(torch.where(beyond, torch.zeros_like(signal.ids), signal.ids),
                      torch.where(beyond, torch.full_like(signal.logprobs, pad_logprob), signal.logprobs),
                      tail)
