"""Chat rows: rendering through a real (tiny, locally trained) BPE tokenizer with a Llama-3-style
template, the refusals, the stop set, and the padded-vocabulary rule of the teacher signal."""
import json
import math

import pytest
import torch

from cluster.chat import ChatError, ChatFormat, check_templates, end_at_stop, read_conversation
from cluster.data import DataError, load_prompts
from learner.losses import forward_kl
from learner.teacher_signal import TopKSignal, drop_ids_beyond

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
OTHER = LLAMA3.replace("\n\n", "\n")  # a template that renders the same turns differently


def _tokenizer(template=LLAMA3):
    """A byte-level BPE trained here, whose post-processor adds BOS as Llama 3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["Sort: b a", "a b c d", "user assistant system", "Be brief."], trainer)
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def fmt():
    tok = _tokenizer()
    return ChatFormat(tok, LLAMA3, None, (tok.convert_tokens_to_ids("<|eot_id|>"), 1))


CHAT = {"messages": [{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"}]}


def test_a_conversation_renders_one_bos_and_a_response_ending_with_end_of_turn(fmt):
    r = fmt.render(CHAT, "line 1")
    tok, eot = fmt.tokenizer, fmt.stop_ids[0]
    assert r.ids[0] == tok.bos_token_id and r.ids.count(tok.bos_token_id) == 1  # no second BOS
    assert r.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert r.reference == "a b" and r.reference_ids[-1] == eot and r.reference_ids.count(eot) == 1
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(r.ids + r.reference_ids) == full  # prompt + response is the whole conversation


def test_trl_conversational_and_plain_rows_render_as_the_same_conversation(fmt):
    trl = {"prompt": CHAT["messages"][:1], "completion": CHAT["messages"][1:]}
    plain = {"prompt": "Sort: b a", "response": "a b"}
    assert fmt.render(trl, "row 1") == fmt.render(CHAT, "row 1") == fmt.render(plain, "row 1")


def test_the_system_prompt_goes_before_conversations_that_have_none(fmt):
    with_system = ChatFormat(fmt.tokenizer, fmt.template, "Be brief.", fmt.stop_ids)
    assert "system<|end_header_id|>\n\nBe brief.<|eot_id|>" in with_system.render(CHAT, "l").text
    own = {"messages": [{"role": "system", "content": "Mine."}] + CHAT["messages"]}
    text = with_system.render(own, "l").text
    assert "Mine." in text and "Be brief." not in text


def test_a_conversation_ending_with_a_user_turn_is_all_prompt():
    conv = read_conversation({"messages": CHAT["messages"] + [{"role": "user", "content": "more"}]}, "l")
    assert conv.response is None and len(conv.prompt) == 3


@pytest.mark.parametrize("row, words", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] has the unknown role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "only an assistant turn"),
    ({"messages": []}, "not a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0] is not a turn with a 'content' string"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": "y"}, "'completion' that is not"),
])
def test_malformed_conversations_are_refused_naming_the_row(fmt, row, words):
    with pytest.raises(ChatError, match="line 7") as err:
        fmt.render(row, "line 7")
    assert words in str(err.value)


def test_conversations_without_a_template_are_refused(tmp_path):
    raw = ChatFormat(_tokenizer(None), None, None, (4,))
    (tmp_path / "d.jsonl").write_text(json.dumps(CHAT) + "\n")
    with pytest.raises(DataError, match="line 1 is a conversation, but the student's tokenizer has no chat template"):
        load_prompts(str(tmp_path / "d.jsonl"), raw, 64)


def test_templates_that_render_differently_are_refused_showing_both():
    with pytest.raises(ChatError, match="renders a conversation differently") as err:
        check_templates(_tokenizer(LLAMA3), _tokenizer(OTHER), "auto", None)
    assert "student '" in str(err.value) and "teacher '" in str(err.value)
    with pytest.raises(ChatError, match="the student's tokenizer has a chat template and the teacher's has none"):
        check_templates(_tokenizer(LLAMA3), _tokenizer(None), "auto", None)
    assert check_templates(_tokenizer(LLAMA3), _tokenizer(LLAMA3), "auto", None) == LLAMA3
    assert check_templates(_tokenizer(LLAMA3), _tokenizer(OTHER), "none", None) is None


def test_a_template_file_is_used_for_both_models(tmp_path):
    (tmp_path / "t.jinja").write_text(OTHER)
    assert check_templates(_tokenizer(LLAMA3), _tokenizer(None), str(tmp_path / "t.jinja"), None) == OTHER
    with pytest.raises(ChatError, match="data.chat_template=.* is not a file"):
        check_templates(_tokenizer(LLAMA3), _tokenizer(LLAMA3), str(tmp_path / "missing.jinja"), None)


@pytest.mark.parametrize("ids, expected", [([5, 6, 9, 7, 8], [5, 6, 9]), ([5, 6], [5, 6, 9]), ([7], [7])])
def test_a_response_ends_at_its_first_stop_token(ids, expected):
    assert end_at_stop(ids, (9, 7)) == expected


def test_ids_past_the_tokenizer_join_the_tail_and_the_loss_matches_a_float64_reference():
    """Teacher p over 12 output rows of which ids 9-11 are padding; its top-5 names two of them.
    Reference: the forward KL over the buckets {each kept top-k id} + {everything else}."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64) * 2, -1)
    p[9], p[11] = p.max() * 1.1, p.max() * 1.05  # padding ids in the top-k
    p = p / p.sum()
    top = torch.topk(p, 5)
    tail = torch.log1p(-top.values.sum())
    signal = TopKSignal(top.indices[None, None], top.values.log()[None, None], tail[None, None])
    dropped = drop_ids_beyond(signal, limit=9)
    kept = [int(i) for i in top.indices if i < 9]
    valid = dropped.logprobs[0, 0] > -1e3
    assert sorted(dropped.ids[0, 0][valid].tolist()) == sorted(kept)
    assert math.isclose(float(dropped.logprobs[0, 0][valid].exp().sum() + dropped.tail_logmass.exp()), 1.0, rel_tol=1e-12)
    s = torch.randn(1, 1, 12, generator=g, dtype=torch.float64)
    q = torch.softmax(s[0, 0], -1)
    p_b = torch.cat([p[kept], (1 - p[kept].sum())[None]])
    q_b = torch.cat([q[kept], (1 - q[kept].sum())[None]])
    reference = float((p_b * (p_b / q_b).log()).sum())
    got = float(forward_kl(s, dropped, torch.ones(1, 1, dtype=torch.bool)))
    assert math.isclose(got, reference, rel_tol=1e-9)
