"""Turning buffer rows into the tensors a learner step needs.

Layout: prompts are LEFT-padded to a common length P and responses RIGHT-padded to R, so
every row's response token j sits at column P + j and the logits that predict it are at
column P - 1 + j: the response logits are the slice ``logits[:, P-1 : P-1+R]`` for the
whole batch (a view, no gather). Position ids are counted from each row's first real token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from learner.teacher_signal import TopKSignal, drop_ids_beyond
from services.buffer_schema import SOURCES, batch_to_rows


@dataclass
class LearnerBatch:
    input_ids: torch.Tensor          # [B, P + R]
    attention_mask: torch.Tensor     # [B, P + R]
    position_ids: torch.Tensor       # [B, P + R]
    prompt_len: int                  # P
    response_ids: torch.Tensor       # [B, R] (pad where mask is false)
    mask: torch.Tensor               # [B, R] bool: a real response token
    behavior_logprobs: torch.Tensor  # [B, R]
    is_on_policy: torch.Tensor       # [B] bool: sampled by the student
    policy_version: torch.Tensor     # [B]
    teacher: TopKSignal              # [B, R, k], [B, R, k], [B, R]
    # (on-policy rows, off-policy rows, ranks) of the whole learner batch this one is a rank's
    # share of; None = this is the whole batch (learner.amm.row_counts)
    totals: Optional[tuple[int, int, int]] = None

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> "LearnerBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["teacher"] = self.teacher.to(device)
        return LearnerBatch(**moved)

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, R, V] logits predicting the response tokens."""
        r = self.response_ids.shape[1]
        return logits[:, self.prompt_len - 1: self.prompt_len - 1 + r]


def collate(table: pa.Table, pad_id: int, vocab_limit: Optional[int] = None) -> LearnerBatch:
    """The rows of ``table`` as one padded batch. Teacher top-k slots naming an id at or past
    ``vocab_limit`` (the tokenizer's size; None = no limit) become padding and their mass joins
    the tail (``drop_ids_beyond``): a padding row of the teacher's output layer is no target."""
    rows = batch_to_rows(table)
    if not rows:
        raise ValueError("cannot collate an empty batch")
    b = len(rows)
    p = max(len(r.prompt_ids) for r in rows)
    r_len = max(max(len(r.response_ids) for r in rows), 1)
    k = max((r.teacher_topk_ids.shape[1] for r in rows if r.teacher_topk_ids.size), default=1)

    ids = np.full((b, p + r_len), pad_id, np.int64)
    attn = np.zeros((b, p + r_len), np.int64)
    resp = np.full((b, r_len), pad_id, np.int64)
    mask = np.zeros((b, r_len), bool)
    blp = np.zeros((b, r_len), np.float32)
    t_ids = np.zeros((b, r_len, k), np.int64)
    t_lps = np.full((b, r_len, k), -1e4, np.float32)  # padded top-k slots carry no mass
    t_tail = np.zeros((b, r_len), np.float32)
    for i, row in enumerate(rows):
        n_p, n_r = len(row.prompt_ids), len(row.response_ids)
        ids[i, p - n_p: p] = row.prompt_ids
        ids[i, p: p + n_r] = row.response_ids
        attn[i, p - n_p: p + n_r] = 1
        resp[i, :n_r] = row.response_ids
        mask[i, :n_r] = True
        blp[i, :n_r] = row.behavior_logprobs
        if n_r:
            kk = row.teacher_topk_ids.shape[1]
            t_ids[i, :n_r, :kk] = row.teacher_topk_ids
            t_lps[i, :n_r, :kk] = row.teacher_topk_logprobs
            t_tail[i, :n_r] = row.teacher_tail_logmass
    position_ids = np.clip(np.cumsum(attn, axis=1) - 1, 0, None)
    student = SOURCES.index("student")
    return LearnerBatch(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
        position_ids=torch.from_numpy(position_ids), prompt_len=p,
        response_ids=torch.from_numpy(resp), mask=torch.from_numpy(mask),
        behavior_logprobs=torch.from_numpy(blp),
        is_on_policy=torch.tensor([SOURCES.index(r.source) == student for r in rows]),
        policy_version=torch.tensor([r.policy_version for r in rows]),
        teacher=drop_ids_beyond(TopKSignal(torch.from_numpy(t_ids), torch.from_numpy(t_lps),
                                           torch.from_numpy(t_tail)), vocab_limit),
    )
