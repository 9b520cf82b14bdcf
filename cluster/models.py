"""Checking the teacher and student directories before any actor starts.

Distillation here compares distributions token by token, so the two models must share one
tokenizer (the same token/id pairs), and both must fit the configured prompt + response length.
Their output layers may be padded to different widths (Qwen pads its larger models' embeddings
to 152,064 rows, its smaller ones' to 151,936, over one tokenizer): the ids past the tokenizer's
``vocab_size`` are never real tokens, so they are never sampled nor a target (see
``learner.teacher_signal.drop_ids_beyond``). The stop set is every end id either model names.
Each failure is one line naming both sides and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster.chat import ChatError, ChatFormat, check_templates
from cluster.errors import first_line


class ModelError(ValueError):
    """The models cannot be used together as configured."""


@dataclass
class ModelPair:
    tokenizer: Any            # the student's tokenizer (same ids as the teacher's)
    vocab_size: int           # real tokens: len(tokenizer); ids at or past it are padding rows
    pad_id: int
    stop_token_ids: list[int]
    max_model_len: int        # prompt + response budget the engines are started with
    chat: Optional[ChatFormat] = None  # how data rows become prompt and response ids
    widths: tuple[int, int] = (0, 0)  # (teacher, student) config.vocab_size: output-layer rows

    @property
    def padded_apart(self) -> bool:
        """The two output layers differ in width, so one model could emit an id the other
        cannot read: both sample only the tokenizer's ids then."""
        return self.widths[0] != self.widths[1]

    def describe_stops(self) -> str:
        """The stop set as ``id 'token'`` pairs, for the start-up log."""
        return ", ".join(f"{i} {self.tokenizer.convert_ids_to_tokens(i)!r}" for i in self.stop_token_ids)


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


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(path: str, tokenizer: Any, cfg: Any) -> list[int]:
    """The tokenizer's EOS, then every id of ``generation_config.json``'s ``eos_token_id``
    (Llama 3.1 Instruct lists three, Qwen two), then the config's: each model stops on all."""
    from transformers import GenerationConfig
    try:
        generation = _ids(GenerationConfig.from_pretrained(path).eos_token_id)
    except (OSError, ValueError):  # no generation_config.json: nothing more to add
        generation = []
    found = _ids(tokenizer.eos_token_id) + generation + _ids(getattr(cfg, "eos_token_id", None))
    return list(dict.fromkeys(found))


def _vocabulary(teacher: str, student: str, tokenizers: tuple, configs: tuple) -> int:
    """len(tokenizer) once the two tokenizers are checked equal and within both output layers."""
    t_tok, s_tok = tokenizers
    if t_tok.get_vocab() != s_tok.get_vocab():
        diff = len(set(t_tok.get_vocab().items()) ^ set(s_tok.get_vocab().items()))
        raise ModelError(f"teacher and student tokenizers differ ({diff} token/id pairs disagree); "
                         f"token-level distillation needs the same tokenizer for both models (copy the teacher's "
                         f"tokenizer files into the student only if the student was trained with it, "
                         f"or make a student from the teacher with `ammd init-student`)")
    size = len(s_tok)
    for role, path, cfg in (("teacher", teacher, configs[0]), ("student", student, configs[1])):
        if cfg.vocab_size < size:
            raise ModelError(f"the tokenizer has {size} tokens but the {role} {path} has only "
                             f"vocab_size {cfg.vocab_size} output rows; ids past it would have no "
                             f"embedding, so give the {role} the tokenizer it was trained with")
    return size


def check_models(teacher: str, student: str, max_prompt_tokens: int, max_response_tokens: int,
                 chat_template: str = "auto", system_prompt: Optional[str] = None) -> ModelPair:
    """Both models checked and read: the shared tokenizer, the stop set and the chat format."""
    t_cfg, s_cfg = _config("teacher", teacher), _config("student", student)
    t_tok, s_tok = _tokenizer("teacher", teacher), _tokenizer("student", student)
    size = _vocabulary(teacher, student, (t_tok, s_tok), (t_cfg, s_cfg))
    need = max_prompt_tokens + max_response_tokens
    for role, path, cfg in (("teacher", teacher, t_cfg), ("student", student, s_cfg)):
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise ModelError(f"data.max_prompt_tokens + data.max_response_tokens = {need} exceeds "
                             f"the {role}'s context length {limit} ({path}); lower them")
    stops = list(dict.fromkeys(stop_ids(student, s_tok, s_cfg) + stop_ids(teacher, t_tok, t_cfg)))
    if not stops:
        raise ModelError(f"the student {student} defines no eos token; set eos_token_id in its config")
    pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else stops[0]
    try:
        template = check_templates(s_tok, t_tok, chat_template, system_prompt)
    except ChatError as err:
        raise ModelError(str(err)) from None
    if system_prompt and template is None:
        raise ModelError("data.system_prompt is set but prompts are raw text (no chat template, or "
                         "data.chat_template=none); remove it or give a chat template")
    chat = ChatFormat(s_tok, template, system_prompt, tuple(stops))
    return ModelPair(s_tok, size, pad, stops, need, chat, (t_cfg.vocab_size, s_cfg.vocab_size))
