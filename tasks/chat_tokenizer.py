"""Small byte-level BPE tokenizers, trained here, with the special tokens and a chat template in
the style of three real model families (the templates are this project's own, written to match
the way each family lays out a turn).

| family | turn | end of turn | end of text | BOS added by the tokenizer |
|---|---|---|---|---|
| llama3 | `<|start_header_id|>role<|end_header_id|>\\n\\n...` | `<|eot_id|>` | `<|end_of_text|>` | `<|begin_of_text|>` |
| qwen | `<|im_start|>role\\n...` | `<|im_end|>` | `<|endoftext|>` | none |
| gemma | `<start_of_turn>user\\n...` (assistant is "model"; system folded into the first user turn) | `<end_of_turn>` | `<eos>` | `<bos>` |

As in the real ones, the llama3 and gemma templates write BOS themselves and the tokenizer also
adds one when asked to add special tokens: the double-BOS trap a job must avoid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]     # id order: these come first
    bos: Optional[str]
    eos: str                      # the tokenizer's eos_token (what Instruct tokenizers set)
    end_of_turn: str
    end_of_text: str
    pad: str
    template: str


LLAMA3 = Family(
    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "<|end_of_text|>", "<|end_of_text|>",
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

QWEN = Family(
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|im_end|>", "<|endoftext|>",
    "<|endoftext|>",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

GEMMA = Family(
    ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<end_of_turn>",
    "<eos>", "<pad>",
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (first if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

FAMILIES = {"llama3": LLAMA3, "qwen": QWEN, "gemma": GEMMA}


def build_chat_tokenizer(family: str, corpus: list[str], vocab_size: int = 320) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``corpus`` (deterministic for
    one corpus), the family's special tokens first, its chat template set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer)
    if fam.bos is not None:
        bos_id = fam.specials.index(fam.bos)
        core.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", special_tokens=[(fam.bos, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
                                  padding_side="left")
    tok.chat_template = fam.template
    return tok


def end_ids(family: str, tokenizer: Any) -> list[int]:
    """The ids a model of this family lists as ``eos_token_id`` in generation_config.json:
    end of turn first, then end of text (as Llama 3.1 Instruct and Qwen2.5 Instruct do)."""
    fam = FAMILIES[family]
    return list(dict.fromkeys(tokenizer.convert_tokens_to_ids([fam.end_of_turn, fam.end_of_text])))
