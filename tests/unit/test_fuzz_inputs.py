"""Property: whatever a user feeds ``ammd check`` and the data readers, the answer is either
acceptance or exactly one ``ammd: error:`` line with exit code 2 (issue 21). Never a traceback,
never a hang (hypothesis' deadline), never an error line that quotes a whole huge value.

Configs and overrides go through the real command (``cluster.cli.main``, ``--config-only``:
opening models per example would cost a second each and test the same readers the data
property covers). Data rows go through the real readers (``cluster.data``) with the toy
world's real tokenizer. The number of examples is bounded so that ``make test`` stays short.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.cli import main
from cluster.config import JobConfig
from cluster.data import DataError, load_prompts, reference_rows

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=120, deadline=5000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _keys(model: type, prefix: str = "") -> list[str]:
    """Every dotted config key, sections included (``learner``, ``learner.lr``, ...)."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out += _keys(sub, f"{prefix}{name}.")
    return out


KEYS = _keys(JobConfig) + ["loss.params.beta", "loss.params.alpha", "loss.params.head", "learner.stepz"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["cpu", "amm", "forward_kl", "../..", "", "inf", "-1", "0.5"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def one_error_or_ok(capsys, argv: list[str]) -> None:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    if rc == 0:
        return
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ammd: error: "), (rc, err[-3000:])
    assert len(lines[0]) < 2000, lines[0][:300]


@SETTINGS
@given(tree=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
       overrides=st.lists(st.tuples(st.sampled_from(KEYS), st.text(string.printable, max_size=20)), max_size=3))
def test_random_configs_and_overrides_end_in_one_error_line(capsys, tmp_path_factory, tree, overrides):
    nested: dict = {}
    for dotted, value in tree.items():  # dotted keys become sections, as a user would write them
        node = nested
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(yaml.safe_dump(nested, allow_unicode=True))
    one_error_or_ok(capsys, ["check", str(path), "--config-only", *[f"{k}={v}" for k, v in overrides]])


@SETTINGS
@given(data=st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=200))
def test_random_config_text_ends_in_one_error_line(capsys, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_bytes(data)
    one_error_or_ok(capsys, ["check", str(path), "--config-only"])


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=40)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                           max_leaves=8)
ROWS = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=60)}, optional={"response": JSON_VALUES}),
    st.dictionaries(st.sampled_from(["prompt", "response", "messages", "x"]), JSON_VALUES, max_size=3),
    JSON_VALUES)
LINES = st.one_of(ROWS.map(json.dumps), st.text(max_size=40), st.just(""), st.just("[" * 3000))


@pytest.fixture(scope="module")
def tokenizer(toy_world):
    """The toy world's rows as a job reads them: its real tokenizer, raw text, stop token 2."""
    from transformers import AutoTokenizer

    from cluster.chat import ChatFormat
    return ChatFormat(AutoTokenizer.from_pretrained(toy_world.student_dir), None, None, (2,))


@SETTINGS
@given(lines=st.lists(LINES, max_size=6), parquet=st.booleans())
def test_random_data_rows_are_read_or_refused_with_one_line(tmp_path_factory, tokenizer, lines, parquet):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    if parquet:  # the same rows as a table, where they make one
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = [json.loads(line) for line in lines if _is_object(line)]
        path = path.with_suffix(".parquet")
        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return  # not a table: nothing a user could have written as Parquet
    try:
        prompts = load_prompts(str(path), tokenizer, max_prompt_tokens=24)
        reference_rows(prompts, 16, str(path))
    except DataError as err:
        text = str(err)
        assert 0 < len(text) < 2000, text[:300]  # the CLI prints it as one line


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False
