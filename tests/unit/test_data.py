"""Prompt loading: formats, and one-line errors that name the row and the fix."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.chat import ChatFormat
from cluster.data import DataError, load_prompts, reference_rows


class WordTokenizer:
    """Stands in for a HF tokenizer (one id per word) so these tests need no model files."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [len(w) for w in text.split()]}


# Raw text (no chat template), stop token 2: the format a toy-world job uses.
RAW = ChatFormat(WordTokenizer(), None, None, (2,))


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    rows = [{"prompt": "a bb ccc", "response": "x"}, {"prompt": "dddd"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)
    b = load_prompts(str(tmp_path / "d.parquet"), RAW, 10)
    assert [(p.ids, p.reference) for p in a] == [(p.ids, p.reference) for p in b] == \
        [([1, 1, 2, 3], "x"), ([1, 4], None)]


def test_row_without_prompt_is_named(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"question": "where is it"}])
    with pytest.raises(DataError, match=r"line 2 has no 'prompt' string \(it has \['question'\]\)"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)


def test_overlong_prompt_is_named_with_the_fix(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a " * 20}])
    with pytest.raises(DataError, match=r"line 1 has a prompt of 21 tokens.*data.max_prompt_tokens=8"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 8)


def test_malformed_json_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 8)


def test_reference_rows_end_with_the_stop_token_and_refuse_missing_or_long_responses(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a bb", "response": "ccc d"}, {"prompt": "e"}])
    prompts = load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)
    assert reference_rows(prompts[:1], 3, "d.jsonl") == [(0, [1, 1, 2], [3, 1, 2])]
    with pytest.raises(DataError, match=r"line 1 has a response of 3 tokens.*data.max_response_tokens=2"):
        reference_rows(prompts[:1], 2, "d.jsonl")
    with pytest.raises(DataError, match=r"line 2 has no response .*rollout.off_policy=dataset"):
        reference_rows(prompts, 3, "d.jsonl")


# --- issue 21: words that say what is wrong, rows named by their file line ----------------------

def test_rows_are_named_by_their_file_line_blank_lines_counted(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n\n\n{"prompt": 5}\n')
    with pytest.raises(DataError, match=r"line 4 has a 'prompt' of type int, not a string"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)


def test_parquet_rows_are_named_by_their_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "a " * 20}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"row 2 has a prompt of 21 tokens"):
        load_prompts(str(tmp_path / "d.parquet"), RAW, 8)


def test_an_empty_prompt_is_called_empty(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"prompt": "  ", "response": "x"}])
    with pytest.raises(DataError, match=r"line 2 has an empty 'prompt'; give it text or remove the row"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)


def test_a_row_that_is_not_an_object(tmp_path):
    (tmp_path / "d.jsonl").write_text('["prompt", "a"]\n')
    with pytest.raises(DataError, match=r"line 1 is a JSON list, not an object"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)


def test_a_row_nested_past_the_recursion_limit_is_one_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"line 1 is nested too deeply"):
        load_prompts(str(tmp_path / "d.jsonl"), RAW, 10)


def test_a_plain_directory_is_not_called_a_missing_package(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"is a directory but not a saved HF dataset \(no dataset_info.json"):
        load_prompts(str(tmp_path / "data"), RAW, 10)


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    import os
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it for reading would block forever
    with pytest.raises(DataError, match=r"is not a regular file"):
        load_prompts(str(tmp_path / "pipe.jsonl"), RAW, 10)
