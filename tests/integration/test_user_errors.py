"""Bad input ends in one line on stderr that names the problem, and exit code 2.

The checks run in ``ammd check`` and at the start of ``ammd run`` (the same functions), before
any actor starts; one case goes through the installed console script end to end.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "local-cpu.yaml")


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what the test's own set-up printed
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    return rc, err


def models(world):
    return [f"models.teacher={world.teacher_dir}", f"models.student={world.student_dir}"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unknown_config_key(capsys):
    rc, err = run_cli(capsys, "check", CONFIG, "learner.stepz=5")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unknown config key 'learner.stepz'" in err


def test_row_without_prompt(capsys, toy_world, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"},
                                              {"question": "sort 3 1 =", "response": "1 3"}])
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "row 2 has no 'prompt' string" in err and "d.jsonl" in err


def test_prompt_longer_than_allowed(capsys, toy_world, tmp_path):
    long = "sort " + " ".join(["1"] * 30) + " ="
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 ="}, {"prompt": long}])
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "row 2 has a prompt of 33 tokens" in err and "data.max_prompt_tokens=24" in err


def test_lengths_beyond_the_models_context(capsys, toy_world):
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={toy_world.train_path}",
                      "data.max_prompt_tokens=60", "data.max_response_tokens=16")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "exceeds the teacher's context length 64" in err


def test_teacher_and_student_with_different_vocabularies(capsys, toy_world, tmp_path):
    from tasks.base import get_task
    from tasks.tokenizer import build_tokenizer
    from tasks.toy_models import STUDENT, make_llama
    tok = build_tokenizer(get_task("sort").words() + [f"w{i}" for i in range(20)])
    other = tmp_path / "other"
    make_llama(len(tok), STUDENT, seed=0).save_pretrained(other)
    tok.save_pretrained(other)
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={other}", f"data.train={toy_world.train_path}")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "vocabularies differ" in err and "vocab_size 48" in err and "has 64" in err


def test_same_size_but_different_tokenizer(capsys, toy_world, tmp_path):
    other = tmp_path / "student"
    shutil.copytree(toy_world.student_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "5", "7"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={other}", f"data.train={toy_world.train_path}")
    assert rc == 2 and "tokenizers differ (4 token/id pairs disagree)" in err


def test_console_script_reports_one_line_and_exit_2(toy_world):
    ammd = Path(sys.executable).with_name("ammd")
    proc = subprocess.run([str(ammd), "run", CONFIG, "loss.name=forward-kl"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ}, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ammd: error:") and "unknown loss 'forward-kl'" in lines[0]
