"""``ammd init-student``: a student made from the teacher by depth pruning.

The student keeps ``n`` evenly spaced decoder layers of the teacher, with the teacher's
embeddings, output head, final norm, tokenizer (chat template included) and generation config,
so it shares the teacher's tokenizer by construction. Depth pruning before distilling is what
NVIDIA's Minitron does; the pruned model starts worse than the teacher and distillation recovers
what it can. The student is built fresh from the pruned config and the kept layers' weights are
loaded under their new indices, so no layer keeps a stale ``layer_idx``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.models import _config, _tokenizer


class InitStudentError(ValueError):
    """The teacher or the arguments cannot make a student; one line naming the fix."""


def kept_layers(total: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of ``total`` layers: round(i (total - 1) / (n - 1)), so the
    first and the last layer are always kept (n >= 2); n = 1 keeps the first."""
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def pruned_config(config: Any, kept: list[int]) -> Any:
    """A copy of ``config`` with ``len(kept)`` layers; per-layer lists (``layer_types`` of
    Qwen3 and Gemma, any list as long as the layer count) keep the entries of the kept layers."""
    total = config.num_hidden_layers
    fields = config.to_dict()
    for key, value in fields.items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            fields[key] = [value[i] for i in kept]
    fields["num_hidden_layers"] = len(kept)
    return type(config).from_dict(fields)


def _renamed(state: dict, kept: list[int]) -> dict:
    """The teacher's tensors with ``model.layers.{old}.`` renamed ``model.layers.{new}.``;
    the dropped layers' tensors left out."""
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


def _check(teacher: Any, layers: int, out: Path) -> int:
    if not hasattr(getattr(teacher, "model", None), "layers"):
        raise InitStudentError(f"the teacher ({type(teacher).__name__}) has no model.layers: init-student "
                               f"prunes decoder-only models such as Llama, Qwen, Gemma and Mistral")
    total = len(teacher.model.layers)
    if layers < 1 or layers >= total:
        raise InitStudentError(f"--layers {layers}: the teacher has {total} layers, so give 1 to "
                               f"{total - 1} (fewer than the teacher's, or nothing is pruned)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InitStudentError(f"--out {out} already exists and is not an empty directory; give a new "
                               f"directory (ammd never overwrites one)")
    return total


def init_student(teacher_dir: str, layers: int, out_dir: str) -> dict[str, Any]:
    """Write the pruned student to ``out_dir`` (atomically) and return what was done:
    ``kept`` (teacher layer indices), ``params``, ``teacher_params``, ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tasks.build import build_atomically
    cfg = _config("teacher", teacher_dir)  # one-line errors for a path that is no model
    tok = _tokenizer("teacher", teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    out = Path(out_dir).expanduser()
    total = _check(teacher, layers, out)
    kept = kept_layers(total, layers)
    student = AutoModelForCausalLM.from_config(pruned_config(cfg, kept), dtype=teacher.dtype)
    student.load_state_dict(_renamed(teacher.state_dict(), kept), strict=True)
    try:
        student.generation_config = GenerationConfig.from_pretrained(teacher_dir)
    except OSError:  # the teacher has no generation_config.json: the student has none either
        pass

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    build_atomically(out, write)
    return {"kept": kept, "total": total, "params": student.num_parameters(),
            "teacher_params": teacher.num_parameters(), "out": str(out)}


def describe(summary: dict[str, Any]) -> str:
    """The line ``ammd init-student`` prints."""
    def size(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return (f"student: {len(summary['kept'])} of {summary['total']} layers (kept "
            f"{', '.join(map(str, summary['kept']))}), {size(summary['params'])} parameters "
            f"({summary['params']:,}; teacher {size(summary['teacher_params'])}) -> {summary['out']}")
