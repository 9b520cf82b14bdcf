"""The teacher signal a loss consumes: full logits, or a top-k slice plus the tail mass.

Shapes follow the response positions of a padded batch: ``B`` sequences, ``T`` positions.
Position ``t`` holds the teacher's distribution over the token at response index ``t``
(the state is the prompt plus the first ``t`` response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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
