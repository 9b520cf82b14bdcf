"""Bad chat input, as a user meets it: ``ammd check`` on a locally built Qwen3-style chat pair
(tasks.chat_models) refuses each case in one line naming the row or field and the fix."""
import json
import shutil
from pathlib import Path

import pytest

from tasks.chat_models import build_chat_world
from tests.integration.test_user_errors import CONFIG, assert_one_error, run_cli, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
USER = {"role": "user", "content": "Sort: 3 1"}
ANSWER = {"role": "assistant", "content": "1 3"}


@pytest.fixture(scope="module")
def chat_world():
    return build_chat_world(ROOT / "artifacts" / "chat", "qwen3")


def chat(world, train, *more):
    return ["check", CONFIG, f"models.teacher={world.teacher_dir}", f"models.student={world.student_dir}",
            f"data.train={train}", f"data.eval={world.eval_path}", "data.max_prompt_tokens=48", *more]


def test_a_turn_with_an_unknown_role(capsys, chat_world, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": [USER, ANSWER]},
                                               {"messages": [{"role": "human", "content": "hi"}, ANSWER]}])
    rc, err = run_cli(capsys, *chat(chat_world, train))
    assert_one_error(rc, err, "line 2: messages[0] has the unknown role 'human'", "the roles are system, user")


def test_conversations_for_a_tokenizer_without_a_template(capsys, toy_world, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": [USER, ANSWER]}])
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={toy_world.student_dir}", f"data.train={train}",
                      f"data.eval={toy_world.test_path}")
    assert_one_error(rc, err, "line 1 is a conversation, but the student's tokenizer has no chat template",
                     "data.chat_template")


def test_a_teacher_whose_template_renders_differently(capsys, chat_world, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(chat_world.teacher_dir, teacher)
    path = teacher / "chat_template.jinja"
    path.write_text(path.read_text().replace("<|im_start|>{{ m['role'] }}\n", "<|im_start|>{{ m['role'] }}: "))
    rc, err = run_cli(capsys, *chat(chat_world, chat_world.train_path), f"models.teacher={teacher}")
    assert_one_error(rc, err, "the teacher's chat template renders a conversation differently from the "
                     "student's: student '", "teacher '", "set data.chat_template to the path of one template")


def test_an_evaluation_conversation_without_an_assistant_turn(capsys, chat_world, tmp_path):
    evals = write_jsonl(tmp_path / "e.jsonl", [{"messages": [USER, ANSWER]}, {"messages": [USER]}])
    rc, err = run_cli(capsys, *chat(chat_world, chat_world.train_path), f"data.eval={evals}")
    assert_one_error(rc, err, "line 2 has no 'response' (or last assistant turn)", "evaluation prompts need one")


def test_a_system_prompt_without_a_template(capsys, toy_world):
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={toy_world.teacher_dir}",
                      f"models.student={toy_world.student_dir}", f"data.train={toy_world.train_path}",
                      "data.system_prompt=Be brief.")
    assert_one_error(rc, err, "data.system_prompt is set but prompts are raw text")


def test_a_pair_padded_to_different_widths_is_accepted(capsys, chat_world, tmp_path):
    """Not an error: one tokenizer, output layers of 384 and 336 rows (Qwen's 14B/0.5B case)."""
    narrow = build_chat_world(ROOT / "artifacts" / "chat", "qwen2", student_width=336)
    rc, err = run_cli(capsys, "check", CONFIG, f"models.teacher={narrow.teacher_dir}",
                      f"models.student={narrow.student_dir}", f"data.train={narrow.train_path}",
                      f"data.eval={narrow.eval_path}", "data.max_prompt_tokens=48")
    assert rc == 0, err
    assert json.loads((narrow.teacher_dir / "config.json").read_text())["vocab_size"] == 384


def test_a_lora_target_the_student_lacks(capsys, chat_world):
    rc, err = run_cli(capsys, *chat(chat_world, chat_world.train_path), "learner.lora={target_modules: [qkv]}")
    assert_one_error(rc, err, "learner.lora.target_modules=['qkv']: Target modules {'qkv'} not found",
                     "Name modules the student")


def test_a_lora_target_that_is_not_a_linear_layer(capsys, chat_world):
    rc, err = run_cli(capsys, *chat(chat_world, chat_world.train_path),
                      "learner.lora={target_modules: [embed_tokens]}")
    assert_one_error(rc, err, "learner.lora.target_modules: model.embed_tokens is a Embedding",
                     "only linear layers can be merged")


def test_the_cpu_chat_example_config_is_accepted(capsys):
    """configs/local-cpu-chat.yaml (models.toy_chat: qwen3) builds or finds the chat pair and
    renders its messages rows with the chat template."""
    from cluster.config import load_config
    from cluster.preflight import check_inputs
    path = ROOT / "configs" / "local-cpu-chat.yaml"
    rc, err = run_cli(capsys, "check", str(path))
    assert rc == 0, err
    inputs = check_inputs(load_config(path))
    assert inputs.pair.chat.template is not None and "qwen3-" in inputs.cfg.models.teacher
    assert inputs.train[0].text.startswith("<|im_start|>user\n") and inputs.evals[0].reference_ids[-1] == 2  # <|im_end|>


def test_toy_chat_names_a_built_architecture(capsys):
    rc, err = run_cli(capsys, "check", CONFIG, "models.toy_chat=mistral")
    assert_one_error(rc, err, "config field 'models.toy_chat': Input should be 'llama'", "(got 'mistral')")
