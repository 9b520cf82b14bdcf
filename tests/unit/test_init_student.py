"""``ammd init-student``: the pruned student against a second implementation (the teacher with its
layer list cut in memory), tensor by tensor and forward by forward, and its refusals."""
import copy

import pytest
import torch

from cluster.cli import main
from cluster.init_student import InitStudentError, init_student, kept_layers
from tasks.chat_models import TEACHER, make_chat_model
from tasks.chat_tokenizer import build_chat_tokenizer

CORPUS = ["Sort: 3 1 2", "1 2 3", "user assistant system"]


@pytest.fixture(scope="module", params=["qwen3", "llama_tied", "gemma2"])
def teacher(request, tmp_path_factory):
    arch = request.param
    tok = build_chat_tokenizer({"qwen3": "qwen", "llama_tied": "llama3", "gemma2": "gemma"}[arch], CORPUS)
    from transformers import AutoModelForCausalLM
    model = make_chat_model(arch, tok, {**TEACHER, "layers": 5}, 320, seed=0)
    if arch == "qwen3":  # a per-layer list that must follow the kept layers
        model.config.layer_types = ["sliding_attention", "full_attention"] * 2 + ["full_attention"]
        model.config.sliding_window, model.config.use_sliding_window = 16, True
    path = tmp_path_factory.mktemp(arch) / "teacher"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), tok  # built with its layer types


@pytest.mark.parametrize("total, n, want", [(5, 2, [0, 4]), (5, 3, [0, 2, 4]), (24, 4, [0, 8, 15, 23]), (5, 1, [0])])
def test_kept_layers_are_evenly_spaced_with_both_ends(total, n, want):
    assert kept_layers(total, n) == want


def test_the_student_is_the_teacher_without_the_dropped_layers(teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, model, tok = teacher
    summary = init_student(str(path), 3, str(tmp_path / "s"))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    kept = summary["kept"]
    assert kept == [0, 2, 4] and student.config.num_hidden_layers == 3
    t_state, s_state = model.state_dict(), student.state_dict()
    for name, tensor in s_state.items():
        if name.startswith("model.layers."):
            new, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{kept[int(new)]}.{rest}"
        assert torch.equal(tensor, t_state[name]), name
    assert student.config.tie_word_embeddings == model.config.tie_word_embeddings
    if getattr(model.config, "layer_types", None) is not None:
        assert student.config.layer_types == [model.config.layer_types[i] for i in kept]
    cut = copy.deepcopy(model)  # the second implementation: the teacher's own modules, cut in memory
    cut.model.layers = torch.nn.ModuleList(cut.model.layers[i] for i in kept)
    cut.config.num_hidden_layers = 3
    if getattr(cut.config, "layer_types", None) is not None:
        cut.config.layer_types = student.config.layer_types
    ids = torch.tensor([tok("Sort: 3 1 2 user")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, cut(ids, use_cache=False).logits,
                                   rtol=0, atol=1e-6)
    again = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert again.chat_template == tok.chat_template and again.get_vocab() == tok.get_vocab()
    assert student.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_the_command_prints_both_parameter_counts(teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    path, model, _ = teacher
    assert main(["init-student", str(path), "--layers", "2", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    n = AutoModelForCausalLM.from_pretrained(tmp_path / "s").num_parameters()
    assert f"student: 2 of 5 layers (kept 0, 4)" in out and f"({n:,}; teacher" in out


@pytest.mark.parametrize("layers, words", [(0, "--layers 0: the teacher has 5 layers, so give 1 to 4"),
                                           (5, "--layers 5: the teacher has 5 layers")])
def test_nothing_to_prune_is_refused(teacher, tmp_path, layers, words):
    with pytest.raises(InitStudentError, match=words):
        init_student(str(teacher[0]), layers, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_an_existing_directory_is_never_overwritten(teacher, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mine.txt").write_text("keep me")
    assert main(["init-student", str(teacher[0]), "--layers", "2", "--out", str(tmp_path / "s")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "s" / "mine.txt").read_text() == "keep me"


def test_a_path_that_is_no_model_is_named(tmp_path, capsys):
    assert main(["init-student", str(tmp_path), "--layers", "2", "--out", str(tmp_path / "s")]) == 2
    assert "models.teacher=" in capsys.readouterr().err
