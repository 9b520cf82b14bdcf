"""The toy world: task generation, tokenizer, metrics and the cached build."""
import json
import random

import pytest

from tasks.base import get_task, task_names
from tasks.scoring import score
from tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer


def test_sort_examples_are_sorted_and_splits_are_deterministic_and_disjoint():
    task = get_task("sort")
    ex = task.sample(random.Random(3))
    values = [int(w) for w in ex.prompt.split()[1:-1]]
    assert ex.prompt.startswith("sort ") and ex.prompt.endswith(" =")
    assert ex.response == " ".join(map(str, sorted(values)))
    a, b = task.splits(7, 500, 20, 30), task.splits(7, 500, 20, 30)
    assert a == b
    held = {e.prompt for e in a["eval"] + a["test"]}
    assert len(held) == 50 and not held & {e.prompt for e in a["train"]}
    assert task.splits(8, 500, 20, 30) != a


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match=r"models.toy_task must be one of"):
        get_task("sorting")
    assert "sort" in task_names()


def test_tokenizer_round_trip_and_special_ids():
    tok = build_tokenizer(get_task("sort").words())
    ids = tok("sort 3 12 =")["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "sort 3 12 ="
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert tok("sort banana =", add_special_tokens=False)["input_ids"][1] == UNK_ID
    assert build_tokenizer(get_task("sort").words()).get_vocab() == tok.get_vocab()  # deterministic


def test_metrics():
    assert score("exact_match", ["1 2  3", "1 3"], ["1 2 3", "1 2"]) == 0.5  # whitespace-normalised
    assert score("rouge_l", ["a b c"], ["a b c"]) == pytest.approx(1.0)
    assert score("rouge_l", ["x y"], ["a b"]) == 0.0
    partial = score("rouge_l", ["a b x"], ["a b c"])
    assert 0 < partial < 1
    assert score("bleu", ["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eval.metric must be one of"):
        score("accuracy", ["a"], ["a"])


def test_toy_world_is_cached_and_the_teacher_beats_the_student(toy_world):
    from pathlib import Path

    from tasks.build import build_toy_world
    again = build_toy_world(toy_world.root.parent, task="sort", seed=0)
    assert again.root == toy_world.root  # found, not rebuilt
    info = json.loads((toy_world.root / "world.json").read_text())
    assert info["scores"]["teacher"] >= 0.9 and info["scores"]["student"] <= 0.5
    rows = [json.loads(line) for line in Path(toy_world.test_path).read_text().splitlines()]
    assert len(rows) == 300 and all({"prompt", "response"} <= set(r) for r in rows)


def test_toy_models_load_as_ordinary_hf_dirs_and_teacher_sorts(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.toy_models import greedy_decode
    tok = AutoTokenizer.from_pretrained(toy_world.teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir)
    # Every test prompt, not the first 20: the build is deterministic on one machine but its
    # float results differ across CPUs, and 20 rows put 0.85 and 0.95 one answer apart (this
    # machine's build scores 17/20 there, 0.95 on the 300). Reloaded from disk, the teacher must
    # score exactly what the build recorded for it, and sort.
    rows = [json.loads(line) for line in toy_world.test_path.read_text().splitlines()]
    out = greedy_decode(teacher, tok, [r["prompt"] for r in rows], 14)
    got = score("exact_match", out, [r["response"] for r in rows])
    assert got == json.loads((toy_world.root / "world.json").read_text())["scores"]["teacher"] and got >= 0.9
    assert teacher.config.vocab_size % 16 == 0 and teacher.config.head_dim == 32


def test_summarize_keeps_repeated_content_words_in_order():
    task = get_task("summarize")
    doc = "c3 f1 c7 c3 f0 c2 c7 f4 c7".split()
    assert task.summary(doc) == ["c3", "c7"]
    assert task.summary(doc, by_frequency=True) == ["c7", "c3"]  # the training-only variant
    for ex in task.splits(0, 200, 10, 10)["test"]:
        doc = ex.prompt.split()[1:-1]
        assert ex.response.split() == task.summary(doc) and not any(w.startswith("f") for w in ex.response.split())


def test_translate_reorders_and_maps_words():
    task = get_task("translate")
    splits = task.splits(0, 400, 10, 40)

    def clause(words):  # d [a] n v d [a] n -> D N [A] D N [A] V
        v = next(i for i, w in enumerate(words) if w.startswith("v"))
        def phrase(p):
            return [p[0].upper(), p[-1].upper()] + ([p[1].upper()] if len(p) == 3 else [])
        return phrase(words[:v]) + phrase(words[v + 1:]) + [words[v].upper()]
    for ex in splits["test"]:
        clauses = " ".join(ex.prompt.split()[1:-1]).split(" and ")
        want = [" ".join(clause(c.split())) for c in reversed(clauses)]
        assert ex.response == " AND ".join(want)
    # Synonyms appear only in training references.
    assert any(w.startswith("B") for ex in splits["train"] for w in ex.response.split())
    assert not any(w.startswith("B") for ex in splits["test"] for w in ex.response.split())


def test_arith_steps_are_correct_and_final_answer_scores_only_the_answer():
    task = get_task("arith")
    for ex in task.splits(0, 300, 10, 50)["train"]:
        expr = ex.prompt.split()[1:-1]
        assert int(ex.response.rsplit(";", 1)[1]) == eval(" ".join(expr))  # noqa: S307 (digits and + *)
        for step in ex.response.split(";")[0].split(","):
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307
    assert score("final_answer", ["8 + 7 = 15 , 8 + 15 = 23 ; 23"], ["8 + 8 = 16 , 16 + 7 = 23 ; 23"]) == 1.0
    assert score("final_answer", ["2 + 5 = 7 ; 8"], ["2 + 5 = 7 ; 7"]) == 0.0


@pytest.mark.parametrize("name", ["sort", "summarize", "translate", "arith"])
def test_every_task_fits_the_demo_lengths_and_its_tokenizer(name):
    task = get_task(name)
    tok = build_tokenizer(task.words())
    for ex in task.splits(1, 300, 10, 10)["train"]:
        p, r = tok(ex.prompt)["input_ids"], tok(ex.response, add_special_tokens=False)["input_ids"]
        assert UNK_ID not in p + r
        assert len(p) <= 24 and len(r) + 1 <= 16


def test_the_cache_key_follows_the_code_that_shapes_a_world(monkeypatch):
    from tasks import build
    key = build._recipe("sort", 0)
    assert key == build._recipe("sort", 0) and key != build._recipe("sort", 1)
    assert key["code"] != build._recipe("arith", 0)["code"]  # another task module
    monkeypatch.setattr(build, "_code_digest", lambda task: "edited")
    assert build._recipe("sort", 0) != key
