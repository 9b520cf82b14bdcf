"""Checking the teacher and student directories before any actor starts.

Distillation here compares distributions token by token, so the two models must share one
vocabulary (same tokenizer ids and the same output size), and both must fit the configured
prompt + response length. Each failure is one line naming both sides and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import first_line


class ModelError(ValueError):
    """The models cannot be used together as configured."""


@dataclass
class ModelPair:
    tokenizer: Any            # the student's tokenizer (same ids as the teacher's)
    vocab_size: int
    pad_id: int
    stop_token_ids: list[int]
    max_model_len: int        # prompt + response budget the engines are started with


# Any one of these next to config.json is a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


def _looks_local(path: str) -> bool:
    """A path the user meant as a directory, not a hub id (``name`` or ``org/name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _config(role: str, path: str):
    from transformers import AutoConfig
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(f"models.{role}={path} has no config.json: point models.{role} at a Hugging "
                         f"Face model directory (config.json, weights and tokenizer files)")
    if not local.exists() and _looks_local(path):
        raise ModelError(f"models.{role}={path} does not exist: point models.{role} at a Hugging Face "
                         f"model directory (or a hub id such as org/name where the hub can be reached)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "" if local.is_dir() else " (not a local directory, so read as a hub id)"
        raise ModelError(f"cannot read models.{role}={path} as a Hugging Face model{where}: "
                         f"{first_line(err)}") from None


def _tokenizer(role: str, path: str):
    from transformers import AutoTokenizer
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"models.{role}={path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                         f"...): save the model's tokenizer into it (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"cannot load the tokenizer of models.{role}={path}: {first_line(err)}; "
                         f"save the model's tokenizer into it (tokenizer.save_pretrained)") from None


def check_models(teacher: str, student: str, max_prompt_tokens: int, max_response_tokens: int) -> ModelPair:
    t_cfg, s_cfg = _config("teacher", teacher), _config("student", student)
    t_tok, s_tok = _tokenizer("teacher", teacher), _tokenizer("student", student)
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise ModelError(f"teacher and student vocabularies differ: teacher {teacher} has "
                         f"vocab_size {t_cfg.vocab_size}, student {student} has {s_cfg.vocab_size}; "
                         f"token-level distillation needs one shared vocabulary (a student with the teacher's tokenizer)")
    if t_tok.get_vocab() != s_tok.get_vocab():
        diff = len(set(t_tok.get_vocab().items()) ^ set(s_tok.get_vocab().items()))
        raise ModelError(f"teacher and student tokenizers differ ({diff} token/id pairs disagree); "
                         f"token-level distillation needs the same tokenizer for both models (copy the teacher's "
                         f"tokenizer files into the student only if the student was trained with it)")
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
