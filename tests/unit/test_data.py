"""Prompt loading: formats, and one-line errors that name the row and the fix."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data import DataError, load_prompts, reference_rows


class WordTokenizer:
    """Stands in for a HF tokenizer (one id per word) so these tests need no model files."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [len(w) for w in text.split()]}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path):
    rows = [{"prompt": "a bb ccc", "response": "x"}, {"prompt": "dddd"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = load_prompts(str(tmp_path / "d.jsonl"), WordTokenizer(), 10)
    b = load_prompts(str(tmp_path / "d.parquet"), WordTokenizer(), 10)
    assert [(p.ids, p.reference) for p in a] == [(p.ids, p.reference) for p in b] == \
        [([1, 1, 2, 3], "x"), ([1, 4], None)]


def test_row_without_prompt_is_named(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"question": "where is it"}])
    with pytest.raises(DataError, match=r"row 2 has no 'prompt' string \(it has \['question'\]\)"):
        load_prompts(str(tmp_path / "d.jsonl"), WordTokenizer(), 10)


def test_overlong_prompt_is_named_with_the_fix(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a " * 20}])
    with pytest.raises(DataError, match=r"row 1 has a prompt of 21 tokens.*data.max_prompt_tokens=8"):
        load_prompts(str(tmp_path / "d.jsonl"), WordTokenizer(), 8)


def test_malformed_json_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_prompts(str(tmp_path / "d.jsonl"), WordTokenizer(), 8)


def test_reference_rows_end_with_the_stop_token_and_refuse_missing_or_long_responses(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a bb", "response": "ccc d"}, {"prompt": "e"}])
    prompts = load_prompts(str(tmp_path / "d.jsonl"), WordTokenizer(), 10)
    assert reference_rows(prompts[:1], WordTokenizer(), 2, 3, "d.jsonl") == [(0, [1, 1, 2], [3, 1, 2])]
    with pytest.raises(DataError, match=r"row 1 has a response of 3 tokens.*data.max_response_tokens=2"):
        reference_rows(prompts[:1], WordTokenizer(), 2, 2, "d.jsonl")
    with pytest.raises(DataError, match=r"row 2 has no 'response' string; rollout.off_policy=dataset"):
        reference_rows(prompts, WordTokenizer(), 2, 3, "d.jsonl")
