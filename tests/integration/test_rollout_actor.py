"""A real Ray rollout actor running vLLM (CPU), checked against plain transformers forwards."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.weight_sync import ObjectStoreTransport
from cluster.actors import HEALTH_GROUP
from rollout.worker import RolloutSpec, RolloutWorker
from rollout.engine import EngineOptions

pytestmark = pytest.mark.slow
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]]


def hf_logprobs(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)


def hf_greedy(model, prompt, max_new, stop):
    seq = list(prompt)
    for _ in range(max_new):
        tok = int(hf_logprobs(model, seq)[-1].argmax())
        seq.append(tok)
        if tok in stop:
            break
    return seq[len(prompt):]


def start(ray, role, model_dir, **kw):
    opts = EngineOptions(seed=0, dtype="float32", kv_cache_mib=32, max_model_len=128, max_logprobs=20,
                         logprobs_mode="raw_logprobs" if role == "teacher" else "processed_logprobs")
    spec = RolloutSpec(role, "vllm", model_dir, max_response_tokens=8, temperature=1.0, topk=kw.get("topk", 5),
                       stop_token_ids=(2,), options=opts)
    actor = ray.remote(concurrency_groups=HEALTH_GROUP)(RolloutWorker).options(num_cpus=1).remote(spec)
    ray.get(actor.health.remote())
    return actor


def test_vllm_teacher_signal_matches_transformers(ray_cluster, tiny_models):
    from services.buffer_schema import batch_to_rows
    teacher_dir, _ = tiny_models
    actor = start(ray_cluster, "teacher", teacher_dir, topk=5)
    hf = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    # Off-policy rows: the teacher's own samples, its top-k from the same pass.
    rows = batch_to_rows(ray_cluster.get(actor.sample_rows.remote(list(enumerate(PROMPTS)))))
    for row in rows:
        seq = list(row.prompt_ids) + list(row.response_ids)
        lp = hf_logprobs(hf, seq)[len(row.prompt_ids) - 1: len(seq) - 1]
        ref_vals, ref_ids = lp.topk(5, dim=-1)
        np.testing.assert_allclose(row.teacher_topk_logprobs, ref_vals.numpy(), atol=1e-4)
        np.testing.assert_array_equal(row.teacher_topk_ids, ref_ids.numpy())
        sampled = lp.gather(1, torch.tensor(row.response_ids, dtype=torch.long)[:, None])[:, 0]
        np.testing.assert_allclose(row.behavior_logprobs, sampled.numpy(), atol=1e-4)
        tail = np.log1p(-np.exp(ref_vals.numpy()).sum(-1))
        np.testing.assert_allclose(row.teacher_tail_logmass, tail, atol=1e-4)
        assert row.source == "teacher" and row.policy_version == -1
    ray_cluster.kill(actor)


def test_weight_push_then_greedy_equals_transformers(ray_cluster, tiny_models):
    a_dir, b_dir = tiny_models
    actor = start(ray_cluster, "student", a_dir)
    hf_a = AutoModelForCausalLM.from_pretrained(a_dir).eval()
    hf_b = AutoModelForCausalLM.from_pretrained(b_dir).eval()
    before = ray_cluster.get(actor.greedy.remote(PROMPTS))
    assert before == [hf_greedy(hf_a, p, 8, {2}) for p in PROMPTS]

    payload = ray_cluster.put(ObjectStoreTransport(bucket_mib=1).send(list(hf_b.named_parameters()), 1))
    assert ray_cluster.get(actor.load_weights.remote(payload, 7)) == 7
    after = ray_cluster.get(actor.greedy.remote(PROMPTS))
    assert after == [hf_greedy(hf_b, p, 8, {2}) for p in PROMPTS]
    assert after != before  # the push changed what the engine computes
    samples = ray_cluster.get(actor.sample.remote(list(enumerate(PROMPTS))))
    assert samples.policy_version == 7
    for gen in samples.generations:
        seq = list(gen.prompt_ids) + list(gen.response_ids)
        lp = hf_logprobs(hf_b, seq)[len(gen.prompt_ids) - 1: len(seq) - 1]
        ref = lp.gather(1, torch.tensor(gen.response_ids, dtype=torch.long)[:, None])[:, 0]
        np.testing.assert_allclose(gen.logprobs, ref.numpy(), atol=1e-4)
    ray_cluster.kill(actor)


def test_weight_push_to_a_tied_student(ray_cluster, tied_model, tmp_path):
    """A tied student's parameters have no lm_head.weight, and vLLM's in-place reload does not
    re-tie its head to a pushed embedding: the push names the head (learner.student_dir.tied_head),
    and then the engine decodes what transformers decodes with the new weights."""
    from learner.student_dir import tied_head, with_tied_head
    from tests.integration.conftest import save_tiny_llama
    other = save_tiny_llama(tmp_path / "other", seed=4, tied=True)
    actor = start(ray_cluster, "student", tied_model)
    hf_old = AutoModelForCausalLM.from_pretrained(tied_model).eval()
    hf_new = AutoModelForCausalLM.from_pretrained(other).eval()
    assert tied_head(hf_new) == ("lm_head.weight", "model.embed_tokens.weight")
    before = ray_cluster.get(actor.greedy.remote(PROMPTS))
    assert before == [hf_greedy(hf_old, p, 8, {2}) for p in PROMPTS]
    named = with_tied_head(list(hf_new.named_parameters()), tied_head(hf_new))
    payload = ray_cluster.put(ObjectStoreTransport(bucket_mib=1).send(named, 1))
    ray_cluster.get(actor.load_weights.remote(payload, 1))
    after = ray_cluster.get(actor.greedy.remote(PROMPTS))
    assert after == [hf_greedy(hf_new, p, 8, {2}) for p in PROMPTS] and after != before
    ray_cluster.kill(actor)
