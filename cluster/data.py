"""Prompt data: reading JSONL, Parquet or a saved HF dataset directory, and tokenising it.

Every row is a conversation (``messages``, or TRL's ``prompt``/``completion`` turns) or a plain
``prompt`` string with an optional ``response``; ``cluster.chat`` renders either through the
student's chat template. Responses are the references for evaluation and the off-policy rows
when ``rollout.off_policy`` is ``dataset``. Problems are reported as one line naming the file,
the row and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster.chat import ChatError, ChatFormat
from cluster.errors import first_line


class DataError(ValueError):
    """A problem with the user's data, phrased with the file, the row and the fix."""


@dataclass
class Prompt:
    prompt_id: int
    text: str
    ids: list[int]
    reference: Optional[str]
    where: str = ""  # "line 7" of a JSONL file, "row 7" of a table: what an error names
    reference_ids: Optional[list[int]] = None  # the reference's ids, ending with a stop token


def numbered_rows(path: str) -> list[tuple[str, Any]]:
    """(where, row) of a JSONL file, a Parquet file or a ``datasets.save_to_disk`` directory;
    ``where`` is "line N" (JSONL: the file's own line, blank lines counted) or "row N"."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path} does not exist; check data.train and data.eval")
    if p.is_dir():
        return [(f"row {n}", r) for n, r in enumerate(_read_dataset_dir(p), 1)]
    if not p.is_file():  # a FIFO or a device would block or never end
        raise DataError(f"data file {path} is not a regular file; give a JSONL or Parquet file, or a "
                        f"saved HF dataset directory")
    if p.suffix == ".parquet":
        return [(f"row {n}", r) for n, r in enumerate(_read_parquet(p), 1)]
    return _read_jsonl(p)


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a Parquet file or a ``datasets.save_to_disk`` directory."""
    return [row for _, row in numbered_rows(path)]


def _read_dataset_dir(p: Path) -> list[dict[str, Any]]:
    if not any((p / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{p} is a directory but not a saved HF dataset (no dataset_info.json, "
                        f"state.json or dataset_dict.json); give a JSONL or Parquet file, or a "
                        f"datasets.save_to_disk directory")
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{p} is a saved HF dataset; reading it needs `pip install datasets`") from None
    try:
        ds = load_from_disk(str(p))
    except (OSError, ValueError) as err:
        raise DataError(f"{p} is a directory but not a saved HF dataset ({first_line(err)}); "
                        f"give a JSONL or Parquet file, or a datasets.save_to_disk directory") from None
    return [dict(r) for r in (ds["train"] if hasattr(ds, "keys") else ds)]


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{p} is not a readable Parquet file ({first_line(err)}); give Parquet, "
                        f"JSONL (one {{\"prompt\": ...}} per line) or a saved HF dataset dir") from None


def _read_jsonl(p: Path) -> list[tuple[str, Any]]:
    rows = []
    try:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append((f"line {n}", _json_line(p, n, line)))
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text; data files are JSONL (UTF-8), Parquet "
                        f"(.parquet) or a saved HF dataset directory") from None
    except OSError as err:
        raise DataError(f"{p} cannot be read ({err.strerror or type(err).__name__})") from None
    return rows


def _json_line(p: Path, n: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{p}: line {n} is not valid JSON ({err.msg} at column {err.colno}); every "
                        f"line needs one object such as {{\"prompt\": \"...\"}}") from None
    except RecursionError:
        raise DataError(f"{p}: line {n} is nested too deeply to be a data row; every line needs "
                        f"one flat object such as {{\"prompt\": \"...\"}}") from None


def load_prompts(path: str, fmt: ChatFormat, max_prompt_tokens: int, limit: Optional[int] = None) -> list[Prompt]:
    """Read and render prompts with ``fmt``, refusing rows without a prompt, rows the chat
    format cannot render, and prompts longer than allowed."""
    rows = numbered_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows; give a file with one {{\"prompt\": ...}} or "
                        f"{{\"messages\": [...]}} per row")
    prompts = []
    for n, (where, row) in enumerate(rows[:limit] if limit else rows):
        _check_row(path, where, row)
        try:
            r = fmt.render(row, f"{path}: {where}")
        except ChatError as err:
            raise DataError(str(err)) from None
        if len(r.ids) > max_prompt_tokens:
            raise DataError(f"{path}: {where} has a prompt of {len(r.ids)} tokens, longer than "
                            f"data.max_prompt_tokens={max_prompt_tokens}; shorten it or raise "
                            f"data.max_prompt_tokens (within the model's context length)")
        prompts.append(Prompt(n, r.text, r.ids, r.reference, where, r.reference_ids))
    return prompts


def _check_row(path: str, where: str, row: Any) -> None:
    """DataError unless ``row`` is an object holding a conversation or a prompt string."""
    if isinstance(row, dict) and ("messages" in row or isinstance(row.get("prompt"), list)):
        return  # a conversation: cluster.chat checks its turns
    _prompt_text(path, where, row)


def _prompt_text(path: str, where: str, row: Any) -> str:
    """The row's prompt string; DataError saying what is wrong with it otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where} is a JSON {type(row).__name__}, not an object; every row "
                        f"needs {{\"prompt\": \"...\"}} (\"response\" is optional) or {{\"messages\": [...]}}")
    text = row.get("prompt")
    if isinstance(text, str) and not text.strip():
        raise DataError(f"{path}: {where} has an empty 'prompt'; give it text or remove the row")
    if not isinstance(text, str):
        keys = [str(k)[:40] for k in sorted(row, key=str)[:10]]
        got = (f"no 'prompt' string (it has {keys})" if "prompt" not in row
               else f"a 'prompt' of type {type(text).__name__}, not a string")
        raise DataError(f"{path}: {where} has {got}; every row needs {{\"prompt\": \"...\"}} "
                        f"(\"response\" is optional) or {{\"messages\": [...]}}")
    return text


def reference_rows(prompts: list[Prompt], max_response_tokens: int,
                   path: str) -> list[tuple[int, list[int], list[int]]]:
    """(prompt_id, prompt ids, response ids ending with a stop token) for every training row.

    Used when the off-policy rows are the file's own responses, so every row needs one that
    fits the response budget.
    """
    rows = []
    for p in prompts:
        if p.reference_ids is None:
            raise DataError(f"{path}: {p.where} has no response (a 'response' string, or a last "
                            f"turn by the assistant); rollout.off_policy=dataset trains on the file's "
                            f"responses, so every row needs one (or set rollout.off_policy=teacher)")
        if len(p.reference_ids) > max_response_tokens:
            raise DataError(f"{path}: {p.where} has a response of {len(p.reference_ids)} tokens "
                            f"(with the stop token), longer than data.max_response_tokens="
                            f"{max_response_tokens}; shorten it or raise data.max_response_tokens")
        rows.append((p.prompt_id, p.ids, p.reference_ids))
    return rows
