"""Parity of what a job's engines wrote with a float64 Hugging Face forward of the same models.

The rows are read back from the job's replay buffer on disk, and laid out by the learner's own
``collate`` (left-padded prompts, position ids counted from each row's first token), so a
misaligned label, a teacher scored at another temperature or a soft-cap left out by one side
shows up as a difference here, not as a slightly worse student.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.ipc as ipc
import torch


def buffer_rows(run_dir: Path) -> pa.Table:
    """Every row the job's buffer sealed on disk."""
    tables = [ipc.open_file(pa.memory_map(str(p))).read_all()
              for p in sorted((Path(run_dir) / "buffer").glob("segment-*.arrow"))]
    assert tables, f"no buffer segments under {run_dir}/buffer"
    return pa.concat_tables(tables)


def _logprobs64(model_dir: str, batch, width: Optional[int] = None) -> torch.Tensor:
    """[B, R, V] float64 log-probs of the response positions, the learner's layout, normalised
    over the first ``width`` ids (None: all)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    return torch.log_softmax(batch.response_logits(logits)[..., :width], dim=-1)


def teacher_topk_error(teacher_dir: str, table: pa.Table, pad_id: int) -> float:
    """max |teacher actor's top-k log-prob - float64 HF log-prob| over every real slot."""
    from learner.batch import collate
    batch = collate(table, pad_id)
    ref = _logprobs64(teacher_dir, batch).gather(-1, batch.teacher.ids)
    real = (batch.teacher.logprobs > -1e3) & batch.mask[..., None]
    return float((batch.teacher.logprobs.double() - ref).abs()[real].max())


def behaviour_error(student_dir: str, table: pa.Table, pad_id: int,
                    width: Optional[int] = None) -> tuple[float, int]:
    """(max |vLLM behaviour log-prob - float64 HF log-prob|, tokens compared) over the student's
    own rows sampled with its first weights (version 0, the model in ``student_dir``); ``width``:
    the rollouts sampled only ids below it, so the policy is normalised over those."""
    from learner.batch import collate
    first = table.filter(pa.compute.and_(pa.compute.equal(table["source"], "student"),
                                         pa.compute.equal(table["policy_version"], 0)))
    assert first.num_rows, "no student rows of policy version 0 in the buffer"
    batch = collate(first, pad_id)
    ref = _logprobs64(student_dir, batch, width).gather(-1, batch.response_ids[..., None])[..., 0]
    diff = (batch.behavior_logprobs.double() - ref).abs()[batch.mask]
    return float(diff.max()), int(batch.mask.sum())
