"""Bad input ends in one line on stderr that names the problem and the fix, and exit code 2.

The checks run in ``ammd check`` and at the start of ``ammd run`` and ``ammd export`` (the same
functions), before any actor starts: every ``run`` case here fails before Ray would start (a
fixture makes starting Ray or actors fail the test). One case goes through the installed
console script end to end; the status API's cases use FastAPI's test client. The checkpoint
and resume cases are in test_user_errors_checkpoints.py. docs/errors.md lists every case of
both files, one row per test id (tests/unit/test_docs.py checks it).
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
    try:
        rc = main(list(args))
    except SystemExit as exit_:  # argparse's usage errors
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_error(rc, err, *words, code=2):
    """Exit ``code``, exactly one stderr line ``ammd: error: ...`` holding every one of ``words``."""
    assert rc == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ammd: error: "), err
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"


def models(world):
    return [f"models.teacher={world.teacher_dir}", f"models.student={world.student_dir}"]


def own(world, *more):
    """The toy models and data named explicitly, as a user's own would be."""
    return [*models(world), f"data.train={world.train_path}", *more]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- config --------------------------------------------------------------------------------------

CONFIG_CASES = {
    "unknown-key": (["learner.stepz=5"], ["unknown config key 'learner.stepz'", "check its spelling"]),
    "wrong-type": (["learner.steps=abc"], ["'learner.steps'", "valid integer", "got 'abc'"]),
    "lr-zero": (["learner.lr=0"], ["'learner.lr'", "greater than 0", "got 0"]),
    "lr-negative": (["learner.lr=-1"], ["'learner.lr'", "greater than 0", "got -1"]),
    "min-lr-above-lr": (["learner.min_lr=0.1"], ["learner.min_lr=0.1 is above learner.lr=0.001",
                                                 "set min_lr <= lr"]),
    "warmup-not-below-steps": (["learner.warmup_steps=300"], ["learner.warmup_steps=300", "lower it"]),
    "unknown-loss": (["loss.name=forward-kl"], ["unknown loss 'forward-kl'", "loss.name must be one of",
                                                "forward_kl"]),
    "unknown-loss-param": (["loss.params={betta: 0.5}"], ["loss.params", "unknown parameter 'betta'",
                                                          "allowed: ['chunk_size']"]),
    "bad-loss-param-value": (["loss.name=skew_forward_kl", "loss.params={alpha: 2}"],
                             ["loss.params", "alpha", "got 2"]),
    "override-without-equals": (["learner.steps"], ["override 'learner.steps'", "key.path=value"]),
    "override-into-a-value": (["learner.steps.max=1"], ["learner.steps is a value, not a section",
                                                        "learner.steps=VALUE"]),
    "only-teacher-set": (["models.teacher=/models/big"], ["models.teacher and models.student must both "
                                                          "be set", "both left empty"]),
    "own-models-without-data": (["models.teacher=/m/a", "models.student=/m/b"],
                                ["data.train must name the prompt file"]),
    # issue 21: values that were accepted, then crashed, hung or wrote outside output_dir
    "lr-inf": (["learner.lr=.inf"], ["'learner.lr'", "finite number"]),
    "temperature-inf": (["rollout.temperature=inf"], ["'rollout.temperature'", "finite number"]),
    "grad-clip-inf": (["learner.grad_clip=.inf"], ["'learner.grad_clip'", "finite number"]),
    "weight-decay-inf": (["learner.weight_decay=.inf"], ["'learner.weight_decay'", "finite number"]),
    "gpus-inf": (["rollout.student.gpus=.inf"], ["'rollout.student.gpus'", "finite number"]),
    "resource-nan": (["learner.resources={node: .nan}"], ["'learner.resources.node'", "finite number"]),
    "seed-negative": (["seed=-1"], ["'seed'", "greater than or equal to 0", "got -1"]),
    "name-a-path": (["name=../.."], ["name='../..' must be a plain name", "no '/'"]),
    "name-absolute": (["name=/etc/x"], ["name='/etc/x' must be a plain name"]),
    "capacity-below-batch": (["buffer.capacity_rows=31"], [
        "buffer.capacity_rows=31 is below one learner batch", "= 32 rows", "at least 32"]),
    "batch-above-capacity": (["buffer.capacity_rows=64", "learner.micro_batch=40"], [
        "buffer.capacity_rows=64 is below one learner batch", "= 80 rows"]),
    "override-not-yaml": (["learner.steps=[1,"], ["override 'learner.steps=[1,'", "is not valid YAML"]),
}


@pytest.mark.parametrize("overrides,words", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_value(capsys, overrides, words):
    assert_one_error(*run_cli(capsys, "check", CONFIG, *overrides), *words)


CONFIG_FILES = {
    "config-file-missing": (None, ["does not exist", "give the path of a YAML config"]),
    "config-not-yaml": ("learner: [1, 2\n", ["is not valid YAML", "line 2, column 1"]),
    "config-not-a-mapping": ("- learner\n- data\n", ["must hold a mapping at the top level", "not a list"]),
    "duplicate-section": ("learner:\n  lr: 0.1\ndata: {}\nlearner:\n  micro_batch: 2\n",
                          ["holds the key 'learner' twice", "lines 1 and 4", "merge them"]),
    "duplicate-key": ("learner:\n  lr: 0.1\n  lr: 0.2\n", ["holds the key 'lr' twice", "lines 2 and 3"]),
    "alias-bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
                   + "loss: {name: amm, params: {beta: *i}}\n",
                   ["expands to more than 20000 values", "fewer aliases"]),
}


@pytest.mark.parametrize("text,words", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_bad_config_file(capsys, tmp_path, text, words):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    assert_one_error(*run_cli(capsys, "check", str(path)), str(path), *words)


def test_config_file_not_utf8(capsys, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert_one_error(*run_cli(capsys, "check", str(path)), str(path), "is not UTF-8 text", "byte 9")


def test_config_path_that_is_a_directory(capsys, tmp_path):
    assert_one_error(*run_cli(capsys, "check", str(tmp_path)), f"config file {tmp_path} is a directory")


def test_an_error_quotes_a_bounded_part_of_a_huge_value(capsys):
    rc, err = run_cli(capsys, "check", CONFIG, "loss.params={beta: [" + ",".join(["1"] * 5000) + "]}")
    assert_one_error(rc, err, "beta")
    assert len(err) < 1000


USER_DIR_CASES = {"user-files": {"thesis.tex": "years of work"},
                  "user-files-beside-a-manifest": {"manifest.json": '{"run_name": "b"}', "notes.md": "mine"}}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("files", USER_DIR_CASES.values(), ids=USER_DIR_CASES.keys())
def test_spill_dir_holding_a_users_files_is_refused_and_untouched(capsys, toy_world, tmp_path, no_ray,
                                                                 command, files):
    """Issue 21: such a directory was deleted recursively, even when the job was then refused."""
    spill = tmp_path / "home"
    spill.mkdir()
    for name, text in files.items():
        (spill / name).write_text(text)
    rc, err = run_cli(capsys, command, CONFIG, *own(toy_world, f"output_dir={tmp_path / 'runs'}", "name=b",
                                                    f"buffer.spill_dir={spill}"))
    assert_one_error(rc, err, f"buffer.spill_dir {spill} already holds files that are not a replay buffer's",
                     "left untouched")
    assert {p.name: p.read_text() for p in spill.iterdir()} == files


def test_output_dir_that_is_a_file(capsys, toy_world, tmp_path, no_ray):
    (tmp_path / "f").write_text("x")
    rc, err = run_cli(capsys, "run", CONFIG, *own(toy_world, f"output_dir={tmp_path / 'f' / 'runs'}"))
    assert_one_error(rc, err, "output_dir=", "cannot be written", "is not a directory")


def test_topk_larger_than_the_vocabulary(capsys, toy_world):
    rc, err = run_cli(capsys, "check", CONFIG, *own(toy_world, "rollout.topk=100"))
    assert_one_error(rc, err, "rollout.topk=100 is larger than the vocabulary (36 tokens)", "at most 36")


def test_check_refuses_what_run_refuses(capsys, toy_world, tmp_path):
    """Issue 21: check skipped data.eval, the dataset rows' responses and W&B."""
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"},
                                                  {"prompt": "sort 3 1 ="}])
    rc, err = run_cli(capsys, "check", CONFIG, *own(toy_world, f"data.eval={evals}"))
    assert_one_error(rc, err, f"{evals}: line 2 has no 'response'")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"}, {"prompt": "sort 3 1 ="}])
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}",
                      f"data.eval={toy_world.test_path}", "rollout.off_policy=dataset")
    assert_one_error(rc, err, "line 2 has no response", "rollout.off_policy=dataset")
    try:  # W&B asked for but not installed (wandb is no dependency of ammd)
        import wandb  # noqa: F401
    except ImportError:
        rc, err = run_cli(capsys, "check", CONFIG, *own(toy_world, "tracking.wandb_project=p"))
        assert_one_error(rc, err, "tracking.wandb_project asks for W&B (project 'p')", "pip install wandb")


def test_status_port_in_use_and_bad_host_are_refused_before_ray(capsys, toy_world, tmp_path, no_ray):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("check", "run"):
            rc, err = run_cli(capsys, command, CONFIG, *own(toy_world, f"status.port={port}",
                                                            f"output_dir={tmp_path}"))
            assert_one_error(rc, err, f"status.port: 127.0.0.1:{port} cannot be listened on (in use)",
                             "status.port=0")
    rc, err = run_cli(capsys, "check", CONFIG, *own(toy_world, "status.host=no-such-host.invalid"))
    assert_one_error(rc, err, "status.host='no-such-host.invalid' is not an address")


def test_spill_dir_holding_another_runs_buffer(capsys, toy_world, tmp_path, no_ray):
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "manifest.json").write_text(json.dumps({"run_name": "a"}))
    rc, err = run_cli(capsys, "run", CONFIG, *own(toy_world, f"output_dir={tmp_path / 'runs'}", "name=b",
                                                  f"buffer.spill_dir={spill}"))
    assert_one_error(rc, err, "buffer.spill_dir", "holds the replay buffer of run 'a', not 'b'",
                     "point buffer.spill_dir elsewhere")
    assert json.loads((spill / "manifest.json").read_text()) == {"run_name": "a"}  # left alone


# --- data ----------------------------------------------------------------------------------------

def test_data_file_missing(capsys, toy_world, tmp_path):
    missing = tmp_path / "nope.jsonl"
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={missing}")
    assert_one_error(rc, err, f"data file {missing} does not exist", "data.train")


def test_malformed_json_line(capsys, toy_world, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "sort 1 2 ="}\n{"prompt": "sort 2 1 =",\n')
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, f"{data}: line 2 is not valid JSON", "one object such as")


def test_empty_data_file(capsys, toy_world, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n")
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, f"{data} holds no rows", "one {\"prompt\": ...} or {\"messages\": [...]} per row")


def test_data_file_not_text(capsys, toy_world, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, f"{data} is not UTF-8 text", "JSONL")


def test_parquet_file_that_is_not_parquet(capsys, toy_world, tmp_path):
    data = tmp_path / "d.parquet"
    data.write_text('{"prompt": "sort 1 2 ="}\n')
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, f"{data} is not a readable Parquet file", "give Parquet, JSONL")


def test_row_without_prompt(capsys, toy_world, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"},
                                              {"question": "sort 3 1 =", "response": "1 3"}])
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, "line 2 has no 'prompt' string", "d.jsonl", "every row needs")


def test_prompt_longer_than_allowed(capsys, toy_world, tmp_path):
    long = "sort " + " ".join(["1"] * 30) + " ="
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 ="}, {"prompt": long}])
    rc, err = run_cli(capsys, "check", CONFIG, *models(toy_world), f"data.train={data}")
    assert_one_error(rc, err, "line 2 has a prompt of 33 tokens", "data.max_prompt_tokens=24",
                     "shorten it or raise data.max_prompt_tokens")


def test_eval_rows_without_response(capsys, toy_world, tmp_path, no_ray):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"},
                                                  {"prompt": "sort 3 1 ="}])
    rc, err = run_cli(capsys, "run", CONFIG, *own(toy_world, f"data.eval={evals}",
                                                  f"output_dir={tmp_path / 'runs'}"))
    assert_one_error(rc, err, f"{evals}: line 2 has no 'response'", "evaluation prompts need one each")


def test_dataset_off_policy_rows_without_response(capsys, toy_world, tmp_path, no_ray):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort 1 2 =", "response": "1 2"},
                                              {"prompt": "sort 3 1 ="}])
    rc, err = run_cli(capsys, "run", CONFIG, *models(toy_world), f"data.train={data}",
                      f"data.eval={toy_world.test_path}", "rollout.off_policy=dataset",
                      f"output_dir={tmp_path / 'runs'}")
    assert_one_error(rc, err, "line 2 has no response", "rollout.off_policy=dataset",
                     "or set rollout.off_policy=teacher")


# --- models --------------------------------------------------------------------------------------

def test_model_dir_without_config_json(capsys, toy_world, tmp_path):
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={tmp_path}", f"data.train={toy_world.train_path}")
    assert_one_error(rc, err, f"models.student={tmp_path} has no config.json",
                     "point models.student at a Hugging Face model directory")


def test_model_dir_that_does_not_exist(capsys, toy_world, tmp_path):
    missing = tmp_path / "big"
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={missing}",
                      f"models.student={toy_world.student_dir}", f"data.train={toy_world.train_path}")
    assert_one_error(rc, err, f"models.teacher={missing} does not exist",
                     "point models.teacher at a Hugging Face model directory")


def test_model_dir_without_tokenizer(capsys, toy_world, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(toy_world.student_dir, student)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (student / name).unlink()
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={student}", f"data.train={toy_world.train_path}")
    assert_one_error(rc, err, f"models.student={student} has no tokenizer files",
                     "tokenizer.save_pretrained")


def test_lengths_beyond_the_models_context(capsys, toy_world):
    rc, err = run_cli(capsys, "check", CONFIG, *own(toy_world, "data.max_prompt_tokens=60",
                                                    "data.max_response_tokens=16"))
    assert_one_error(rc, err, "data.max_prompt_tokens + data.max_response_tokens = 76",
                     "exceeds the teacher's context length 64", "lower them")


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
    assert_one_error(rc, err, "tokenizers differ", "token/id pairs disagree",
                     "needs the same tokenizer for both models")


def test_tokenizer_larger_than_the_output_layer(capsys, toy_world, tmp_path):
    small = tmp_path / "student"
    shutil.copytree(toy_world.student_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 8  # fewer output rows than the tokenizer has tokens
    (small / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={small}", f"data.train={toy_world.train_path}")
    assert_one_error(rc, err, "the tokenizer has", "but the student", "has only vocab_size 8 output rows",
                     "the tokenizer it was trained with")


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
    assert_one_error(rc, err, "tokenizers differ (4 token/id pairs disagree)",
                     "needs the same tokenizer for both models")


# --- the command line ----------------------------------------------------------------------------

USAGE_CASES = {
    "run-without-config": (["run"], ["the following arguments are required: config", "ammd run --help"]),
    "unknown-command": (["train", CONFIG], ["invalid choice: 'train'", "ammd --help"]),
}


@pytest.mark.parametrize("argv,words", USAGE_CASES.values(), ids=USAGE_CASES.keys())
def test_bad_command_line(capsys, argv, words):
    assert_one_error(*run_cli(capsys, *argv), *words)


def test_console_script_reports_one_line_and_exit_2(toy_world):
    ammd = Path(sys.executable).with_name("ammd")
    proc = subprocess.run([str(ammd), "run", CONFIG, "loss.name=forward-kl"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ}, timeout=300)
    assert_one_error(proc.returncode, proc.stderr.strip(), "unknown loss 'forward-kl'")


# --- the status API ------------------------------------------------------------------------------

@pytest.fixture
def api():
    from fastapi.testclient import TestClient

    from services.status import JobStatus, make_app
    return TestClient(make_app(JobStatus("t", 10)))


def test_api_unknown_path(api):
    answer = api.get("/x")
    assert answer.status_code == 404
    assert answer.json() == {"error": "no such endpoint /x", "endpoints": [
        "/", "/healthz", "/status", "/metrics", "/static/chart.min.js", "/static/page.js", "/static/page.css",
        "/static/chart.js-LICENSE.txt"]}


def test_api_wrong_method(api):
    answer = api.post("/status")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET"
    assert answer.json() == {"error": "method POST is not allowed on /status; use GET", "allowed": ["GET"]}
