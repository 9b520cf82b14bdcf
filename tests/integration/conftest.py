"""Integration fixtures: a real embedded Ray cluster per test session, tiny random models."""
from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import os

    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray (PLATFORM.md)
    # A fresh temp dir per session: a stale ray_current_cluster file breaks ray.init (PLATFORM.md).
    tmp = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ray.init(num_cpus=6, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield ray
    ray.shutdown()


def save_tiny_llama(path, seed: int, vocab: int = 48, layers: int = 2, tied: bool = False) -> str:
    """A random Llama-architecture HF model dir (head_dim 32, as vLLM's CPU attention needs).

    ``tied``: input and output embeddings shared, as in Qwen and Llama 3.2 (no lm_head.weight
    among the parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    # Sharper logits than the default init, so greedy choices are far from ties.
    with torch.no_grad():
        if not tied:
            model.lm_head.weight.mul_(20.0)
        else:
            # A random tied model copies its last input token (the residual is mostly that
            # token's embedding, and the head is the same matrix): louder layers make its
            # output depend on all the weights, and the final norm sharpens the logits.
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(10.0)
                layer.self_attn.o_proj.weight.mul_(10.0)
            model.model.norm.weight.mul_(20.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_llama(root / "a", seed=1), save_tiny_llama(root / "b", seed=2)


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tied") / "t", seed=3, tied=True)


@pytest.fixture
def no_ray(monkeypatch):
    """``ammd run`` in these tests must be refused before Ray or any actor starts."""
    import cluster.driver as driver

    def refuse(*_, **__):
        raise AssertionError("the bad input was not refused before Ray started")
    monkeypatch.setattr(driver, "init_ray", refuse)
    monkeypatch.setattr(driver, "start_actors", refuse)
