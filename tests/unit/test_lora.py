"""LoRA students (learner/lora.py): the merged view against PEFT's own merge, the names, the config.

The second implementation of every merged weight is PEFT's ``merge_and_unload()`` on a copy of
the same wrapped model, in float64 so that the comparison is of the maths, not of rounding.
"""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.config import ConfigError, build_config
from learner.lora import (LoraSettings, Piece, adapter_skeleton, hf_name, is_adapter, merged_named_tensors,
                          save_adapter, student_pieces, trainable_parameters, wrap_student)

SOME = ("q_proj", "v_proj", "down_proj")  # a subset: the other linear layers stay as they are


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(torch.float64)


def wrapped(targets="all-linear", tied=False, r=4, alpha=12.0) -> torch.nn.Module:
    """A wrapped float64 tiny Llama whose B matrices are random (PEFT starts them at zero, where
    every merge is the identity and proves nothing)."""
    model = wrap_student(tiny_llama(tied), LoraSettings(r, alpha, 0.0, targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("targets,tied", [("all-linear", False), (SOME, False), ("all-linear", True)])
def test_the_merged_tensors_are_peft_merge_and_unload_in_float64(targets, tied):
    model = wrapped(targets, tied)
    lora = LoraSettings(4, 12.0, 0.0, targets)
    named = dict(model.named_parameters())
    got = {n: t.detach() for n, t in merged_named_tensors(named, lora.scale)}
    reference = copy.deepcopy(model).merge_and_unload()
    want = dict(reference.named_parameters())
    assert set(got) == set(want)  # the plain model's names: no prefix, no base_layer, no lora_A/B
    plain = dict(tiny_llama(tied).named_parameters())
    assert set(got) == set(plain)
    changed = 0
    for name, tensor in want.items():
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], tensor.detach(), rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(tensor, plain[name])
    n_targets = 7 if targets == "all-linear" else len(targets)
    assert changed == 2 * n_targets  # every targeted weight of both layers moved, nothing else


def test_a_plain_model_is_its_own_view():
    model = tiny_llama()
    named = dict(model.named_parameters())
    assert student_pieces(named) == [Piece(n, (n,)) for n in named]
    assert all(t is named[n] for n, t in merged_named_tensors(named, scale=0.0))


def test_names_map_to_the_plain_models():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.bias") == "model.layers.0.mlp.up_proj.bias"
    assert hf_name("base_model.model.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.norm.weight") == "model.norm.weight"  # the identity on plain names
    assert is_adapter("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert is_adapter("x.lora_B.default.weight") and not is_adapter("model.layers.0.self_attn.q_proj.weight")


def test_a_base_layer_without_its_adapters_is_refused():
    with pytest.raises(ValueError, match="one lora_A and one lora_B"):
        student_pieces(["base_model.model.model.q_proj.base_layer.weight",
                        "base_model.model.model.q_proj.lora_A.default.weight"])


def test_only_the_adapters_train_and_the_wrapped_model_starts_as_the_base():
    base = tiny_llama()
    ids = torch.randint(0, 48, (2, 6))
    want = base(input_ids=ids).logits
    model = wrap_student(base, LoraSettings(4, 8.0, 0.1, SOME))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * 2 * len(SOME)  # A and B of each target in both layers
    assert len(trainable_parameters(model)) == len(trainable)
    plain = tiny_llama()
    assert len(trainable_parameters(plain)) == len(list(plain.parameters()))
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)  # B = 0 at the start
    assert wrap_student(plain, None) is plain


def test_layers_that_cannot_be_merged_are_refused():
    with pytest.raises(ValueError, match="output head, tied"):
        wrap_student(tiny_llama(tied=True), LoraSettings(4, 8.0, 0.0, ("q_proj", "lm_head")))
    with pytest.raises(ValueError, match="only linear layers"):
        wrap_student(tiny_llama(), LoraSettings(4, 8.0, 0.0, ("embed_tokens",)))


def test_the_adapter_saved_from_gathered_tensors_loads_onto_the_base(tmp_path):
    """save_adapter writes given tensors through a meta-device skeleton (what ``ammd export``
    does); PeftModel.from_pretrained on the base then computes what the merged model does."""
    from peft import PeftModel

    base = tiny_llama(seed=5)
    base.save_pretrained(tmp_path / "base")
    lora = LoraSettings(4, 12.0, 0.0, "all-linear")
    model = wrap_student(tiny_llama(seed=5), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn_like(p) * 0.1)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter(n)}
    save_adapter(adapter_skeleton(tmp_path / "base", lora), state, tmp_path / "adapter", tmp_path / "base")
    from transformers import AutoModelForCausalLM
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64),
                                       tmp_path / "adapter").eval()
    merged = tiny_llama(seed=5)
    merged.load_state_dict(dict(merged_named_tensors(dict(model.named_parameters()), lora.scale)))
    ids = torch.randint(0, 48, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, merged.eval()(input_ids=ids).logits,
                               rtol=1e-9, atol=1e-9)


def test_the_gathered_buckets_are_the_merged_view_under_their_size():
    """gathered_buckets (the push and the export) without ZeRO-3: the merged tensors in the
    export dtype, a bucket at a time, each bucket within its size unless one tensor is larger."""
    from learner.student_dir import gathered_buckets

    model = wrapped(SOME)
    want = dict(merged_named_tensors(dict(model.named_parameters()), 3.0))
    buckets = list(gathered_buckets(model, 0, 64 * 64 * 4 * 3, torch.float32, is_rank0=True, scale=3.0))
    assert len(buckets) > 1
    got = {n: t for bucket in buckets for n, t in bucket}
    assert list(got) == list(want)
    for name, t in got.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, want[name].to(torch.float32), rtol=0, atol=0)
    assert all(sum(t.numel() * 4 for _, t in b) <= 64 * 64 * 4 * 3 or len(b) == 1 for b in buckets)
    assert list(gathered_buckets(model, 0, 2**20, torch.float32, is_rank0=False, scale=3.0)) == \
        [[] for _ in gathered_buckets(model, 0, 2**20, torch.float32, is_rank0=True, scale=3.0)]


def test_the_lora_config_is_typed_and_checked():
    assert build_config({}).learner.lora is None  # full fine-tuning by default
    lora = build_config({}, ["learner.lora={r: 16, target_modules: [q_proj, v_proj]}"]).learner.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 16.0, 0.0, ["q_proj", "v_proj"])
    assert build_config({}, ["learner.lora={}"]).learner.lora.target_modules == "all-linear"
    settings = LoraSettings.of(lora)
    assert settings == LoraSettings(16, 16.0, 0.0, ("q_proj", "v_proj")) and settings.scale == 1.0
    assert LoraSettings.of(lora.model_dump()) == settings and LoraSettings.of(None) is None
    for bad, says in [("{r: 0}", "learner.lora.r"), ("{alpha: 0}", "learner.lora.alpha"),
                      ("{alpha: -1}", "learner.lora.alpha"), ("{dropout: 1.0}", "learner.lora.dropout"),
                      ("{dropout: -0.1}", "learner.lora.dropout"), ("{target_modules: []}", "at least one"),
                      ("{target_modules: ['']}", "at least one"), ("{rank: 4}", "learner.lora.rank")]:
        with pytest.raises(ConfigError, match=says):
            build_config({}, [f"learner.lora={bad}"])
