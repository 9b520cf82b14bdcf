"""Tiny Llama-architecture models: construction, supervised training and greedy decoding.

These are ordinary ``LlamaForCausalLM`` models saved with ``save_pretrained``, so the job
loads them through exactly the code path it uses for a user's real models. Head size is 32
(vLLM's CPU attention supports it); the output layer is untied so a weight push touches it.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from tasks.base import Example
from tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    mlp: int


TEACHER = ModelShape(hidden=128, layers=2, heads=4, mlp=256)
STUDENT = ModelShape(hidden=64, layers=1, heads=2, mlp=128)


def make_llama(vocab_size: int, shape: ModelShape, seed: int, max_positions: int = 64):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    padded = 16 * math.ceil(vocab_size / 16)  # a round vocab, as real models have
    cfg = LlamaConfig(vocab_size=padded, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                      intermediate_size=shape.mlp, max_position_embeddings=max_positions,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID, do_sample=False)
    return model


def _encode(tokenizer: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> prompt response </s>`` ids and labels (-100 outside the response)."""
    seqs, labels = [], []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [EOS_ID]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), PAD_ID)
    lab = torch.full((len(seqs), n), -100)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


def train_sft(model: Any, tokenizer: Any, examples: list[Example], steps: int, batch: int,
              lr: float, seed: int) -> float:
    """Cross-entropy on response tokens with AdamW and cosine decay; returns the last loss."""
    rng = random.Random(seed)
    batches = (_encode(tokenizer, rng.sample(examples, batch)) for _ in range(steps))
    return fit(model, batches, steps, lr, warmup=50, pad_id=PAD_ID)


def fit(model: Any, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
        warmup: int, pad_id: int) -> float:
    """``steps`` AdamW steps on (ids, labels) batches (-100 = no loss), the rate warmed up
    linearly over ``warmup`` steps and then cosine-decayed, gradients clipped at 1; returns the
    last loss. The one training loop of the locally built models (toy and chat)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for ids, lab in batches:
        loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def greedy_decode(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                  batch: int = 256) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without specials."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
