"""Turning a data row into prompt and response token ids, through the student's chat template.

A row is one of three formats (JSONL, Parquet or a saved dataset alike):
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation. When its last turn is
  the assistant's, the prompt is every turn before it and the response is that turn; otherwise
  the whole conversation is the prompt and the row has no response;
- TRL's conversational ``{"prompt": [messages], "completion": [messages]}``: the same, read as
  the conversation ``prompt + completion``;
- ``{"prompt": str, "response": str}``: a plain prompt, one user turn when there is a template.

With a template, the prompt is rendered with ``add_generation_prompt=True`` and tokenised with
``add_special_tokens=False``: the template already wrote BOS where the model wants it, and a
second one (Llama 3's tokenizer adds one by default) puts the prompt off-distribution. The
response ids are what the template writes after the generation prompt for the assistant turn,
cut after its first stop token (the end-of-turn token), so an SFT or dataset row ends the way
the model ends a turn. Without a template (``data.chat_template: none``, or a tokenizer that has
none) a plain prompt is tokenised as it stands and its response gets the first stop token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster.errors import first_line

ROLES = ("system", "user", "assistant", "tool")
# Rendered by both templates to compare them: a turn of each kind the data can hold.
PROBE = [{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
         {"role": "user", "content": "Sort: d c"}]


class ChatError(ValueError):
    """A row or a template the chat format cannot render, phrased with the row and the fix."""


@dataclass(frozen=True)
class Rendered:
    """One row as the engines see it."""

    text: str                          # the prompt as rendered (shown on the status page)
    ids: list[int]                     # the prompt's token ids
    reference: Optional[str]           # the response's text (what evaluation scores against)
    reference_ids: Optional[list[int]]  # the response's ids, ending with a stop token


@dataclass(frozen=True)
class Conversation:
    """A row read as turns: the prompt's turns and the answer (None: the row has none)."""

    prompt: list[dict[str, str]]
    response: Optional[str]


def _turns(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """``value`` checked as a list of {"role", "content"} turns with known roles."""
    if not isinstance(value, list) or not value:
        raise ChatError(f"{where} has a '{field}' that is not a non-empty list of turns; give "
                        f"[{{\"role\": \"user\", \"content\": \"...\"}}, ...]")
    turns = []
    for n, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise ChatError(f"{where}: {field}[{n}] is not a turn with a 'content' string; give "
                            f"{{\"role\": \"user\", \"content\": \"...\"}}")
        role = turn.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}: {field}[{n}] has the unknown role {str(role)[:40]!r}; the "
                            f"roles are {', '.join(ROLES)}")
        turns.append({"role": role, "content": turn["content"]})
    return turns


def read_conversation(row: dict[str, Any], where: str) -> Optional[Conversation]:
    """The row as a conversation, or None when it is a plain ``prompt`` string row."""
    if "messages" in row:
        turns = _turns(row["messages"], "messages", where)
    elif isinstance(row.get("prompt"), list):
        turns = _turns(row["prompt"], "prompt", where)
        if row.get("completion") is not None:
            turns += _turns(row["completion"], "completion", where)
    else:
        return None
    if turns[-1]["role"] == "assistant":
        if len(turns) == 1:
            raise ChatError(f"{where} is only an assistant turn; a conversation needs a user turn "
                            f"before the answer")
        return Conversation(turns[:-1], turns[-1]["content"])
    return Conversation(turns, None)


def read_template(choice: str, tokenizer: Any) -> Optional[str]:
    """The Jinja template ``data.chat_template`` names: ``auto`` = the tokenizer's own (None
    when it has none), ``none`` = no template, anything else = the path of a Jinja file."""
    if choice == "none":
        return None
    if choice == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ChatError(f"data.chat_template={choice} is not a file; give auto, none or the path "
                        f"of a Jinja chat template")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatError(f"data.chat_template={choice} cannot be read ({first_line(err)}); give a "
                        f"UTF-8 Jinja file") from None


def render_probe(tokenizer: Any, template: str, system_prompt: Optional[str]) -> str:
    """``PROBE`` rendered with a generation prompt: what two templates are compared on."""
    turns = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + PROBE
    return tokenizer.apply_chat_template(turns, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


def check_templates(student: Any, teacher: Any, choice: str, system_prompt: Optional[str]) -> Optional[str]:
    """The template both models are prompted with (None: raw text); ChatError when the
    teacher's own template renders the probe conversation differently from the student's.

    A path given as ``data.chat_template`` is used for both, so there is nothing to compare.
    """
    if choice not in ("auto", "none"):
        return read_template(choice, student)
    mine, theirs = read_template(choice, student), read_template(choice, teacher)
    if mine is None and theirs is None:
        return None
    if mine is None or theirs is None:
        has, lacks = ("teacher", "student") if mine is None else ("student", "teacher")
        raise ChatError(f"the {has}'s tokenizer has a chat template and the {lacks}'s has none, so "
                        f"the two would see different prompts; set data.chat_template to the path of "
                        f"one Jinja template for both (or none for raw text)")
    try:
        a, b = render_probe(student, mine, system_prompt), render_probe(teacher, theirs, system_prompt)
    except Exception as err:  # jinja2's TemplateError and whatever a template raises itself
        raise ChatError(f"the chat template cannot render a plain conversation ({first_line(err)}); "
                        f"set data.chat_template to the path of a Jinja template that can") from None
    if a != b:
        raise ChatError(f"the teacher's chat template renders a conversation differently from the "
                        f"student's: student {a[:300]!r}, teacher {b[:300]!r}; the teacher would score "
                        f"prompts it was not trained on, so set data.chat_template to the path of one "
                        f"template for both")
    return mine


@dataclass(frozen=True)
class ChatFormat:
    """How rows become ids for one job: the tokenizer, the template (None = raw text), the
    system prompt added to conversations that have none, and the stop tokens."""

    tokenizer: Any
    template: Optional[str]
    system_prompt: Optional[str]
    stop_ids: tuple[int, ...]

    def render(self, row: dict[str, Any], where: str) -> Rendered:
        """The row's prompt (and response, if it has one) as text and ids; ChatError if the
        row cannot be rendered with this format."""
        conv = read_conversation(row, where)
        if self.template is None:
            if conv is not None:
                raise ChatError(f"{where} is a conversation, but the student's tokenizer has no chat "
                                f"template (or data.chat_template=none); set data.chat_template to a "
                                f"Jinja file, or give plain {{\"prompt\": \"...\"}} rows")
            return self._raw(row["prompt"], row.get("response"))
        if conv is None:
            conv = Conversation([{"role": "user", "content": row["prompt"]}], row.get("response"))
        turns = conv.prompt
        if self.system_prompt and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system_prompt}] + turns
        return self._templated(turns, conv.response if isinstance(conv.response, str) else None, where)

    def _raw(self, text: str, response: Any) -> Rendered:
        ids = list(self.tokenizer(text)["input_ids"])
        if not isinstance(response, str):
            return Rendered(text, ids, None, None)
        ref = list(self.tokenizer(response, add_special_tokens=False)["input_ids"]) + [self.stop_ids[0]]
        return Rendered(text, ids, response, ref)

    def _apply(self, turns: list[dict[str, str]], prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(turns, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=prompt)
        except Exception as err:  # a template raises what it likes (jinja2 TemplateError mostly)
            raise ChatError(f"{where}: the chat template cannot render this conversation "
                            f"({first_line(err)}); fix the row's turns") from None

    def _templated(self, turns: list[dict[str, str]], response: Optional[str], where: str) -> Rendered:
        text = self._apply(turns, True, where)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if response is None:
            return Rendered(text, ids, None, None)
        full = self._apply(turns + [{"role": "assistant", "content": response}], False, where)
        if not full.startswith(text):
            raise ChatError(f"{where}: the chat template renders the answered conversation with a "
                            f"different beginning than the prompt it renders for generation, so the "
                            f"answer cannot be cut out; use a template whose prompts are prefixes")
        ref = list(self.tokenizer(full[len(text):], add_special_tokens=False)["input_ids"])
        return Rendered(text, ids, response, end_at_stop(ref, self.stop_ids))


def end_at_stop(ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """``ids`` up to and including the first stop token, or with the first stop token appended
    when there is none: a response ends where generation would have stopped."""
    for n, tok in enumerate(ids):
        if tok in stop_ids:
            return ids[:n + 1]
    return ids + [stop_ids[0]]
