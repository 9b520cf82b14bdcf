"""A word-level tokenizer saved as an ordinary Hugging Face fast tokenizer.

Ids 0-3 are ``<pad> <s> </s> <unk>``; the task's words follow in a fixed order, so the same
task always gives the same ids. Encoding prepends ``<s>``; decoding joins words with spaces.
"""
from __future__ import annotations

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def build_tokenizer(words: list[str]):
    """A ``PreTrainedTokenizerFast`` over ``SPECIALS + words`` (duplicates dropped, order kept)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in SPECIALS + words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")
