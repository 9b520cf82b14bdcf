"""Prompt data: reading JSONL, Parquet or a saved HF dataset directory, and tokenising it.

Every row needs a ``prompt`` string; ``response`` is optional (references for evaluation, and
the off-policy rows when ``rollout.off_policy`` is ``dataset``). Problems are reported as one
line naming the file, the row and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


class DataError(ValueError):
    """A problem with the user's data, phrased with the file, the row and the fix."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


@dataclass
class Prompt:
    prompt_id: int
    text: str
    ids: list[int]
    reference: Optional[str]


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a Parquet file or a ``datasets.save_to_disk`` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path} does not exist; check data.train and data.eval")
    if p.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataError(f"{path} is a directory; reading saved HF datasets needs "
                            f"`pip install datasets`") from None
        try:
            ds = load_from_disk(str(p))
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is a directory but not a saved HF dataset ({_first_line(err)}); "
                            f"give a JSONL or Parquet file, or a datasets.save_to_disk directory") from None
        return [dict(r) for r in (ds["train"] if hasattr(ds, "keys") else ds)]
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"{path} is not a readable Parquet file ({_first_line(err)}); give Parquet, "
                            f"JSONL (one {{\"prompt\": ...}} per line) or a saved HF dataset dir") from None
    rows = []
    with p.open(encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {n} is not valid JSON ({err.msg} at column "
                                    f"{err.colno}); every line needs one object such as "
                                    f"{{\"prompt\": \"...\"}}") from None
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; data files are JSONL (UTF-8), Parquet "
                            f"(.parquet) or a saved HF dataset directory") from None
    return rows


def load_prompts(path: str, tokenizer: Any, max_prompt_tokens: int, limit: Optional[int] = None) -> list[Prompt]:
    """Read and tokenise prompts, refusing rows without a prompt or longer than allowed."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows; give a file with one {{\"prompt\": ...}} per row")
    prompts = []
    for n, row in enumerate(rows[:limit] if limit else rows, 1):
        text = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: row {n} has no 'prompt' string (it has {keys}); every row "
                            f"needs {{\"prompt\": \"...\"}}, \"response\" is optional")
        ids = tokenizer(text)["input_ids"]
        if len(ids) > max_prompt_tokens:
            raise DataError(f"{path}: row {n} has a prompt of {len(ids)} tokens, longer than "
                            f"data.max_prompt_tokens={max_prompt_tokens}; shorten it or raise "
                            f"data.max_prompt_tokens (within the model's context length)")
        ref = row.get("response")
        prompts.append(Prompt(n - 1, text, list(ids), ref if isinstance(ref, str) else None))
    return prompts


def reference_rows(prompts: list[Prompt], tokenizer: Any, stop_id: int, max_response_tokens: int,
                   path: str) -> list[tuple[int, list[int], list[int]]]:
    """(prompt_id, prompt ids, response ids + stop token) for every training row.

    Used when the off-policy rows are the file's own responses, so every row needs one that
    fits the response budget.
    """
    rows = []
    for p in prompts:
        if p.reference is None:
            raise DataError(f"{path}: row {p.prompt_id + 1} has no 'response' string; "
                            f"rollout.off_policy=dataset trains on the file's responses, so every "
                            f"row needs one (or set rollout.off_policy=teacher)")
        ids = tokenizer(p.reference, add_special_tokens=False)["input_ids"] + [stop_id]
        if len(ids) > max_response_tokens:
            raise DataError(f"{path}: row {p.prompt_id + 1} has a response of {len(ids)} tokens "
                            f"(with the stop token), longer than data.max_response_tokens="
                            f"{max_response_tokens}; shorten it or raise data.max_response_tokens")
        rows.append((p.prompt_id, p.ids, ids))
    return rows
