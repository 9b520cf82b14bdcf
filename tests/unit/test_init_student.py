"""``ammd init-student``: the pruned student against a second implementation (the teacher with its
layer list cut in memory), tensor by tensor and forward by forward, for untied, tied, bfloat16 and
sliding/full-attention teachers; its files against the teacher's, byte for byte; its refusals."""
import copy
import json

import pytest
import torch

from cluster.cli import main
from cluster.init_student import (COPIED_FILES, InitStudentError, init_student, kept_layers,
                                  pruned_config)
from tasks.chat_models import TEACHER, make_chat_model
from tasks.chat_tokenizer import build_chat_tokenizer

CORPUS = ["Sort: 3 1 2", "1 2 3", "user assistant system"]
WINDOW = 4  # a sliding window far shorter than the probe, so sliding and full attention differ
PROBE = [{"role": "user", "content": "Sort: 3 1 2 1 2 3 3 1 2"}, {"role": "assistant", "content": "1 2 3 user"}]
FAMILY = {"qwen3": "qwen", "llama": "llama3", "llama_tied": "llama3", "gemma2": "gemma", "gemma3": "gemma"}


def _gemma3(tok, layers: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def _make_teacher(arch: str, path):
    """A saved random teacher of ``arch`` (6 layers, 4 for llama) with its tokenizer and template."""
    tok = build_chat_tokenizer(FAMILY[arch], CORPUS)
    layers = 4 if arch == "llama" else 6
    model = _gemma3(tok, layers) if arch == "gemma3" else make_chat_model(arch, tok, {**TEACHER, "layers": layers}, 320, seed=0)
    if arch == "qwen3":  # a per-layer list that must follow the kept layers
        model.config.layer_types = ["sliding_attention", "full_attention", "full_attention"] * 2
        model.config.sliding_window, model.config.use_sliding_window = WINDOW, True
    if arch == "gemma2":  # its default layer_types alternate sliding and full
        model.config.sliding_window = WINDOW
    if arch == "llama":  # a half-precision teacher: the student keeps its dtype
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for name in ("tokenizer_config.json", "generation_config.json"):  # bytes a re-save would not write
        (path / name).write_text(json.dumps(json.loads((path / name).read_text()), indent=1, sort_keys=True))


@pytest.fixture(scope="module", params=["qwen3", "llama", "llama_tied", "gemma2", "gemma3"])
def teacher(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tmp_path_factory.mktemp(request.param) / "teacher"
    _make_teacher(request.param, path)
    # Read back as a user's teacher is: its layers built with the saved layer types and dtype.
    return path, AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("total, n, want", [(5, 2, [0, 4]), (5, 3, [0, 2, 4]), (24, 4, [0, 8, 15, 23]),
                                            (6, 3, [0, 3, 5]), (5, 1, [0]), (4, 4, [0, 1, 2, 3])])
def test_kept_layers_examples(total, n, want):
    assert kept_layers(total, n) == want


def test_kept_layers_are_evenly_spaced_with_both_ends():
    for total in range(1, 41):
        for n in range(1, total + 1):
            kept = kept_layers(total, n)
            gaps = [b - a for a, b in zip(kept, kept[1:])]
            assert len(kept) == n and kept[0] == 0 and all(g >= 1 for g in gaps), (total, n, kept)
            assert n == 1 or kept[-1] == total - 1, (total, n, kept)
            assert not gaps or max(gaps) - min(gaps) <= 1, (total, n, kept)
    for n in (0, 7):
        with pytest.raises(ValueError, match=f"n={n}"):
            kept_layers(6, n)


def test_per_layer_config_lists_follow_the_kept_layers():
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(num_hidden_layers=3, mlp_only_layers=[0, 1], eos_token_id=[5, 6, 7],
                         layer_types=["full_attention", "sliding_attention", "full_attention"])
    cut = pruned_config(cfg, [0, 2])
    assert cut.num_hidden_layers == 2 and cut.layer_types == ["full_attention", "full_attention"]
    assert cut.mlp_only_layers == [0]  # layer 0 stays dense, layer 1 was dropped
    assert cut.eos_token_id == [5, 6, 7]  # as long as the layer count by chance: not per layer
    assert cfg.num_hidden_layers == 3 and len(cfg.layer_types) == 3  # the teacher's is left alone


def _cut_in_memory(model, kept: list[int], layer_types=None):
    """The second implementation: the teacher's own modules, dropped layers removed from its list."""
    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList(cut.model.layers[i] for i in kept)
    cut.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:  # the model's loop reads it by position
        cut.config.layer_types = layer_types or [model.config.layer_types[i] for i in kept]
    return cut


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_the_student_is_the_teacher_without_the_dropped_layers(teacher, tmp_path):
    from transformers import AutoModelForCausalLM
    path, model, tok = teacher
    total = model.config.num_hidden_layers
    summary = init_student(str(path), 3, str(tmp_path / "s"))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype="auto").eval()
    kept = summary.kept
    assert kept == kept_layers(total, 3) and student.config.num_hidden_layers == len(student.model.layers) == 3
    t_state, s_state = model.state_dict(), student.state_dict()
    want = {n for n in t_state if not n.startswith("model.layers.") or int(n.split(".")[2]) in kept}
    seen = set()
    for name, tensor in s_state.items():
        if name.startswith("model.layers."):
            new, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{kept[int(new)]}.{rest}"
        assert tensor.dtype == t_state[name].dtype and torch.equal(tensor, t_state[name]), name
        seen.add(name)
    assert seen == want  # every kept tensor, nothing else
    for part in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[part], t_state[part]), part
    tied = model.config.tie_word_embeddings
    assert student.config.tie_word_embeddings == tied
    assert (student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()) == tied
    assert student.dtype == model.dtype and student.config.dtype == model.config.dtype
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]  # renumbered
    if getattr(model.config, "layer_types", None) is not None:
        assert student.config.layer_types == [model.config.layer_types[i] for i in kept]
    ids = torch.tensor([tok(tok.apply_chat_template(PROBE, tokenize=False), add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 3 * WINDOW
    torch.testing.assert_close(_logits(student, ids), _logits(_cut_in_memory(model, kept), ids), rtol=0, atol=0)
    if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        # The probe is long enough that the layer types matter: all-full attention scores differently.
        wrong = _cut_in_memory(model, kept, ["full_attention"] * 3)
        assert not torch.equal(_logits(wrong, ids), _logits(student, ids))


def test_the_teacher_files_are_copied_byte_for_byte(teacher, tmp_path):
    from transformers import AutoTokenizer

    from cluster.models import check_models
    path, _, tok = teacher
    init_student(str(path), 2, str(tmp_path / "s"))
    copied = [n for n in COPIED_FILES if (path / n).is_file()]
    assert "generation_config.json" in copied and "tokenizer.json" in copied
    for name in copied:
        assert (tmp_path / "s" / name).read_bytes() == (path / name).read_bytes(), name
    again = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert again.chat_template == tok.chat_template and again.chat_template and again.get_vocab() == tok.get_vocab()
    # What a job checks first: the pair shares one tokenizer, stop set and chat format.
    pair = check_models(str(path), str(tmp_path / "s"), 16, 16)
    assert pair.vocab_size == len(tok) and not pair.padded_apart
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["architectures"] == json.loads(
        (path / "config.json").read_text())["architectures"]


def test_the_command_prints_both_parameter_counts(teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    path, model, _ = teacher
    total = model.config.num_hidden_layers
    assert main(["init-student", str(path), "--layers", "2", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    n, t = (sum(p.numel() for p in m.parameters()) for m in (student, model))  # tied weights once
    assert out.startswith(f"student: 2 of {total} layers (kept 0, {total - 1}), ")
    assert f"({n:,}; teacher " in out and f", {t:,}) -> {tmp_path / 's'}" in out and n < t


# --- refusals: one line naming the argument, nothing written --------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "teacher"
    _make_teacher("llama", path)
    return path


def _refused(argv, capsys, words: str) -> str:
    capsys.readouterr()  # what building the test's models printed
    assert main(["init-student", *argv]) == 2
    err = capsys.readouterr().err  # transformers' progress bars may come first
    line = err.strip().splitlines()[-1]
    assert line.startswith("ammd: error: ") and err.count("ammd:") == 1 and words in line, err
    return line


@pytest.mark.parametrize("layers, words", [
    (0, "--layers 0: a student needs at least one decoder layer; give 1 to 3"),
    (-2, "--layers -2: a student needs at least one decoder layer"),
    (4, "--layers 4: the teacher has 4 layers, so a student of 4 would prune nothing; give 1 to 3"),
    (9, "--layers 9: the teacher has 4 layers")])
def test_a_layer_count_that_prunes_nothing_is_refused(llama, tmp_path, capsys, layers, words):
    _refused([str(llama), "--layers", str(layers), "--out", str(tmp_path / "s")], capsys, words)
    assert list(tmp_path.iterdir()) == []  # neither the student nor a temporary directory


def test_an_existing_out_is_never_overwritten(llama, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mine.txt").write_text("keep me")
    (tmp_path / "f").write_text("a file")
    for out in ("s", "f"):
        _refused([str(llama), "--layers", "2", "--out", str(tmp_path / out)], capsys,
                 f"--out {tmp_path / out} already exists and is not an empty directory")
    assert (tmp_path / "s" / "mine.txt").read_text() == "keep me" and (tmp_path / "f").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "s"]
    (tmp_path / "empty").mkdir()  # an empty directory is taken
    assert main(["init-student", str(llama), "--layers", "2", "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_teacher_that_is_no_model_is_named(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = build_chat_tokenizer("qwen", CORPUS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_tok").mkdir()
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=320, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=320, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "no_tok")
    out = str(tmp_path / "out")
    for teacher, words in (("missing", "is not a directory"), ("empty", "has no config.json"),
                           ("no_tok", "has no tokenizer files"), ("gpt2", "(GPT2LMHeadModel) has no model.layers")):
        _refused([str(tmp_path / teacher), "--layers", "2", "--out", out], capsys, f"TEACHER {tmp_path / teacher} {words}")
    assert not (tmp_path / "out").exists()


def test_layers_whose_kind_follows_from_the_index_are_refused(tmp_path, capsys):
    """Qwen3-MoE with an MoE block every 2nd layer: renumbering would move the experts, so the
    kept weights do not fit; listed dense layers (mlp_only_layers) are renumbered and fit."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    tok = build_chat_tokenizer("qwen", CORPUS)
    shape = dict(vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                 num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    for name, extra in (("step", {"decoder_sparse_step": 2}), ("listed", {"mlp_only_layers": [2]})):
        Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, **extra)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    _refused([str(tmp_path / "step"), "--layers", "3", "--out", str(tmp_path / "s")], capsys,
             "the teacher's kept layers do not fit the pruned Qwen3MoeForCausalLM")
    assert not (tmp_path / "s").exists()
    summary = init_student(str(tmp_path / "listed"), 3, str(tmp_path / "s"))  # keeps 0, 2, 3
    assert summary.kept == [0, 2, 3]
    assert json.loads((tmp_path / "s" / "config.json").read_text())["mlp_only_layers"] == [1]


def test_a_failed_write_leaves_nothing(llama, tmp_path, monkeypatch):
    import cluster.init_student as module

    def broken(*_):
        raise OSError("disk full")
    monkeypatch.setattr(module, "_copy_teacher_files", broken)
    with pytest.raises(OSError, match="disk full"):
        init_student(str(llama), 2, str(tmp_path / "s"))
    assert list(tmp_path.iterdir()) == []


def test_a_bfloat16_teacher_gives_a_bfloat16_student(llama, tmp_path):
    from safetensors import safe_open
    assert json.loads((llama / "config.json").read_text())["dtype"] == "bfloat16"
    init_student(str(llama), 2, str(tmp_path / "s"))
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
