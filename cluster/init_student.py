"""``ammd init-student``: a student made from the teacher by depth pruning.

The student keeps ``n`` evenly spaced decoder layers of the teacher (``kept_layers``), with the
teacher's embeddings, output head, final norm, tokenizer files (chat template included) and
generation config, so it shares the teacher's tokenizer by construction. Depth pruning before
distilling is what NVIDIA's Minitron does; the pruned model starts worse than the teacher and
distillation recovers what it can.

How: the teacher's config is cut to ``n`` layers (``pruned_config``: per-layer lists such as
``layer_types`` keep the kept layers' entries), a fresh model is built from it and the kept
layers' tensors are loaded under their new indices (``model.layers.{old}.`` ->
``model.layers.{new}.``). Building fresh rather than deleting modules from the teacher means no
layer keeps a stale ``layer_idx`` (which caches index by). The tokenizer and generation-config
files are copied byte for byte, not re-serialised, so they are the teacher's files whatever the
installed transformers would write. Any decoder-only model whose layers are ``model.model.layers``
works (Llama, Mistral, Qwen2/3, Gemma 2/3, ...); a model whose layer kind follows from its index
by a rule the config states as a number (an MoE layer every k-th layer) cannot be renumbered, and
is refused when the kept weights do not fit the new layers.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.errors import first_line
from cluster.models import TOKENIZER_FILES


class InitStudentError(ValueError):
    """The teacher or the arguments cannot make a student; one line naming the argument and the fix."""


@dataclass(frozen=True)
class Summary:
    kept: list[int]        # the teacher's indices of the student's layers, in order
    total: int             # the teacher's layer count
    params: int            # the student's parameters (tied embeddings counted once)
    teacher_params: int
    out: str


# Copied verbatim when the teacher has them: every file a tokenizer or a chat template is read
# from, and the generation config (its stop ids are the job's stop set, cluster/models.py).
COPIED_FILES = tuple(dict.fromkeys((*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json",
                                    "added_tokens.json", "chat_template.jinja", "chat_template.json",
                                    "generation_config.json")))
# Config lists that hold layer indices rather than one entry per layer (Qwen2/3-MoE, Llama 4):
# they keep the kept layers' indices, renumbered.
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
# Lists that can be as long as the layer count by chance (Llama 3.1 names three EOS ids).
_NOT_PER_LAYER = re.compile(r"^architectures$|token_ids?$|suppress_tokens$")


def kept_layers(total: int, n: int) -> list[int]:
    """The ``n`` teacher layers a student keeps, out of ``total``: index ``i`` of the student is
    teacher layer ``round(i * (total - 1) / (n - 1))``, a half rounded up, so the first and the
    last layer are always kept (n >= 2), the indices rise strictly and neighbouring gaps differ by
    at most one. ``n = 1`` keeps the first layer. Raises ValueError unless 1 <= n <= total."""
    if not 1 <= n <= total:
        raise ValueError(f"kept_layers: n={n} must be between 1 and total={total}")
    if n == 1:
        return [0]
    # Integer arithmetic: floor(x + 1/2) exactly, not Python's round (a half to even).
    return [(2 * i * (total - 1) + n - 1) // (2 * (n - 1)) for i in range(n)]


def pruned_config(config: Any, kept: list[int]) -> Any:
    """A copy of ``config`` with ``len(kept)`` layers. Every list with one entry per teacher layer
    (``layer_types`` of Qwen, Gemma and Mistral-family sliding/full attention, ``no_rope_layers``,
    any other list as long as the layer count but token ids) keeps the kept layers' entries in
    order; lists of layer indices (``LAYER_INDEX_LISTS``) keep the kept ones, renumbered."""
    total = config.num_hidden_layers
    new_index = {old: new for new, old in enumerate(kept)}
    fields = config.to_dict()
    for key, value in fields.items():
        if not isinstance(value, list) or _NOT_PER_LAYER.search(key):
            continue
        if key in LAYER_INDEX_LISTS:
            fields[key] = [new_index[i] for i in value if i in new_index]
        elif len(value) == total:
            fields[key] = [value[i] for i in kept]
    fields["num_hidden_layers"] = len(kept)
    return type(config).from_dict(fields)


def renamed_state(state: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    """The teacher's tensors with ``model.layers.{old}.`` renamed ``model.layers.{new}.``, new
    being old's position in ``kept``; the dropped layers' tensors left out, the rest unchanged."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            old, rest = name[len("model.layers."):].split(".", 1)
            if int(old) not in new_index:
                continue
            name = f"model.layers.{new_index[int(old)]}.{rest}"
        out[name] = tensor
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InitStudentError(f"--out {out} already exists and is not an empty directory: give a new "
                               f"directory (init-student never overwrites or deletes one)")


def _check_layers(layers: int, total: int) -> None:
    if total < 2:
        raise InitStudentError(f"the teacher has {total} decoder layer(s): there is nothing to prune")
    if layers < 1:
        raise InitStudentError(f"--layers {layers}: a student needs at least one decoder layer; give "
                               f"1 to {total - 1} (the teacher has {total})")
    if layers >= total:
        raise InitStudentError(f"--layers {layers}: the teacher has {total} layers, so a student of "
                               f"{layers} would prune nothing; give 1 to {total - 1}")


def _open_teacher(teacher_dir: str) -> tuple[Any, Any]:
    """The teacher's config and tokenizer, or one line saying why ``teacher_dir`` is not a model."""
    from transformers import AutoConfig, AutoTokenizer
    path = Path(teacher_dir).expanduser()
    fix = ("give the local directory a Hugging Face model was saved to (`hf download ORG/NAME "
           "--local-dir DIR` fetches one)")
    if not path.is_dir():
        raise InitStudentError(f"TEACHER {teacher_dir} is not a directory: {fix}")
    if not (path / "config.json").is_file():
        raise InitStudentError(f"TEACHER {teacher_dir} has no config.json: {fix}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InitStudentError(f"TEACHER {teacher_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                               f"...): the student takes the teacher's, so save them into it "
                               f"(tokenizer.save_pretrained)")
    try:
        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise InitStudentError(f"cannot read TEACHER {teacher_dir} as a Hugging Face model: "
                               f"{first_line(err)}") from None


def _load_teacher(teacher_dir: str) -> Any:
    from transformers import AutoModelForCausalLM
    try:  # dtype "auto": the dtype config.json names, which the student is saved in too
        teacher = AutoModelForCausalLM.from_pretrained(Path(teacher_dir).expanduser(), dtype="auto")
    except (OSError, ValueError) as err:
        raise InitStudentError(f"cannot load TEACHER {teacher_dir} as a causal LM: {first_line(err)}") from None
    if not hasattr(getattr(teacher, "model", None), "layers"):
        raise InitStudentError(f"TEACHER {teacher_dir} ({type(teacher).__name__}) has no model.layers: "
                               f"init-student prunes decoder-only models such as Llama, Mistral, Qwen and Gemma")
    return teacher


def _build_student(teacher: Any, config: Any, kept: list[int]) -> Any:
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_config(pruned_config(config, kept), dtype=teacher.dtype)
    try:  # strict: every student tensor comes from the teacher, and every kept one is used
        student.load_state_dict(renamed_state(teacher.state_dict(), kept), strict=True)
    except RuntimeError as err:
        raise InitStudentError(f"the teacher's kept layers do not fit the pruned {type(student).__name__} "
                               f"({first_line(err, 200)}): its layers differ by index in a way its config "
                               f"does not list per layer (e.g. MoE every k-th layer), which init-student "
                               f"cannot renumber") from None
    return student


def _write_atomically(out: Path, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` into a fresh hidden sibling of ``out``, then rename it to ``out``: a reader
    never sees half a model, and a failure leaves nothing behind. Unlike tasks.build's
    build_atomically, a directory that appears at ``out`` meanwhile is an error, not a cache hit."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.init-student-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not mkdtemp: its mode 0700 would make the student unreadable to others
    except OSError as err:
        raise InitStudentError(f"--out {out}: cannot write there ({first_line(err)}); "
                               f"give a writable path") from None
    try:
        build(tmp)
        try:
            os.rename(tmp, out)  # replaces at most an empty directory, never a user's files
        except OSError:
            raise InitStudentError(f"--out {out} was filled by someone else while the student was "
                                   f"written; give a new directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_teacher_files(teacher_dir: Path, tmp: Path, tok: Any) -> None:
    """The teacher's tokenizer and generation-config files, byte for byte, over what
    save_pretrained wrote. Should a tokenizer stand in files not named here, the copy would not
    load as the teacher's does; the tokenizer is then saved by transformers instead."""
    from transformers import AutoTokenizer
    for name in COPIED_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, tmp / name)
    again = AutoTokenizer.from_pretrained(tmp)
    if again.get_vocab() != tok.get_vocab() or again.chat_template != tok.chat_template:
        tok.save_pretrained(tmp)


def init_student(teacher_dir: str, layers: int, out_dir: str) -> Summary:
    """Write the teacher pruned to ``layers`` decoder layers (``kept_layers``) to ``out_dir`` as a
    Hugging Face model directory: config.json with num_hidden_layers = ``layers``, safetensors in
    the teacher's dtype (tied embeddings stay tied), the teacher's tokenizer files and
    generation_config.json. ``out_dir`` must not exist or be empty; it appears complete or not at
    all. Raises InitStudentError (one line naming the argument and the fix) on bad input; checks
    that need no weights run before the teacher is loaded."""
    out = Path(out_dir).expanduser().absolute()
    _check_out(out)
    config, tok = _open_teacher(teacher_dir)
    if getattr(config, "num_hidden_layers", None) is not None:
        _check_layers(layers, config.num_hidden_layers)
    teacher = _load_teacher(teacher_dir)
    total = len(teacher.model.layers)
    _check_layers(layers, total)
    kept = kept_layers(total, layers)
    student = _build_student(teacher, config, kept)

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        _copy_teacher_files(Path(teacher_dir).expanduser(), tmp, tok)
    _write_atomically(out, write)
    return Summary(kept=kept, total=total, params=student.num_parameters(),
                   teacher_params=teacher.num_parameters(), out=str(out))


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def describe(summary: Summary) -> str:
    """The line ``ammd init-student`` prints: layers kept, both parameter counts, where."""
    return (f"student: {len(summary.kept)} of {summary.total} layers (kept {', '.join(map(str, summary.kept))}), "
            f"{_size(summary.params)} parameters ({summary.params:,}; teacher {_size(summary.teacher_params)}, "
            f"{summary.teacher_params:,}) -> {summary.out}")
