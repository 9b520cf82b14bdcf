"""Checking the teacher and student directories before any actor starts.

Distillation here compares distributions token by token, so the two models must share one
vocabulary (same tokenizer ids and the same output size), and both must fit the configured
prompt + response length. Each failure is one line naming both sides and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ModelError(ValueError):
    """The models cannot be used together as configured."""


@dataclass
class ModelPair:
    tokenizer: Any            # the student's tokenizer (same ids as the teacher's)
    vocab_size: int
    pad_id: int
    stop_token_ids: list[int]
    max_model_len: int        # prompt + response budget the engines are started with


def _config(path: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read a Hugging Face model config from {path}: {err}") from None


def check_models(teacher: str, student: str, max_prompt_tokens: int, max_response_tokens: int) -> ModelPair:
    from transformers import AutoTokenizer

    t_cfg, s_cfg = _config(teacher), _config(student)
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise ModelError(f"teacher and student vocabularies differ: teacher {teacher} has "
                         f"vocab_size {t_cfg.vocab_size}, student {student} has {s_cfg.vocab_size}; "
                         f"token-level distillation needs one shared vocabulary")
    if t_tok.get_vocab() != s_tok.get_vocab():
        diff = len(set(t_tok.get_vocab().items()) ^ set(s_tok.get_vocab().items()))
        raise ModelError(f"teacher and student tokenizers differ ({diff} token/id pairs disagree); "
                         f"token-level distillation needs the same tokenizer for both models")
    need = max_prompt_tokens + max_response_tokens
    for role, path, cfg in (("teacher", teacher, t_cfg), ("student", student, s_cfg)):
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise ModelError(f"data.max_prompt_tokens + data.max_response_tokens = {need} exceeds "
                             f"the {role}'s context length {limit} ({path}); lower them")
    eos = s_tok.eos_token_id if s_tok.eos_token_id is not None else s_cfg.eos_token_id
    if eos is None:
        raise ModelError(f"the student {student} defines no eos token; set eos_token_id in its config")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else eos_ids[0]
    return ModelPair(s_tok, s_cfg.vocab_size, pad, eos_ids, need)
