"""Collation: the response-logit slice of a padded batch equals each row's unpadded forward."""
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import collate
from services.buffer_schema import batch_to_rows, rows_to_batch
from tests.unit.test_replay_buffer import make_row


def tiny_llama(vocab: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_response_logits_match_unpadded_forward():
    model = tiny_llama()
    rows = [make_row(i, "student" if i % 2 else "teacher", version=2) for i in range(6)]
    table = rows_to_batch(rows)
    batch = collate(table, pad_id=0)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids)
        sliced = batch.response_logits(out.logits)
        for i, row in enumerate(batch_to_rows(table)):
            seq = torch.tensor([list(row.prompt_ids) + list(row.response_ids)])
            ref = model(seq).logits[0, len(row.prompt_ids) - 1: -1]
            n = len(row.response_ids)
            torch.testing.assert_close(sliced[i, :n], ref, atol=1e-5, rtol=1e-5)
            assert batch.mask[i, :n].all() and not batch.mask[i, n:].any()
            assert batch.response_ids[i, :n].tolist() == list(row.response_ids)
            np.testing.assert_array_equal(batch.teacher.ids[i, :n].numpy(), row.teacher_topk_ids)
    assert batch.is_on_policy.tolist() == [r.source == "student" for r in rows]
