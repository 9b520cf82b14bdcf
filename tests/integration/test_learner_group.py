"""Two real DeepSpeed learner ranks (Ray actors, one gloo group) against a plain torch step.

Data-parallel ZeRO must not change the maths: one step on two ranks, each with half the
batch, equals one AdamW step of a single model on the mean of the two halves' losses.
"""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.config import JobConfig
from learner.batch import collate
from learner.losses import forward_kl
from services.buffer_schema import rows_to_batch
from tests.unit.test_replay_buffer import make_row

pytestmark = pytest.mark.slow
VOCAB = 48


def rows(n: int):
    out = []
    for i in range(n):
        r = make_row(i, "student" if i % 2 else "teacher", version=0, k=4)
        r.prompt_ids = (r.prompt_ids % VOCAB).astype(np.int32)
        r.response_ids = (r.response_ids % VOCAB).astype(np.int32)
        # Distinct top-k ids per position, as a real teacher gives.
        r.teacher_topk_ids = np.stack([np.random.default_rng(i * 31 + t).permutation(VOCAB)[:4]
                                       for t in range(len(r.response_ids))]).astype(np.int32)
        out.append(r)
    return out


def reference_step(model_dir: str, table, lr: float | list[float], world: int, teacher_dir=None):
    """Weights after one AdamW step per rate in ``lr``, with the last step's gradients, pre-clip
    norm and per-rank losses."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval() if teacher_dir else None
    rates = lr if isinstance(lr, list) else [lr]
    opt = torch.optim.AdamW(model.parameters(), lr=rates[0], weight_decay=0.0)
    for rate in rates:
        for group in opt.param_groups:  # the rate each step should use, set by hand
            group["lr"] = rate
        opt.zero_grad()
        losses = []
        for rank in range(world):
            b = collate(table.take(list(range(rank, table.num_rows, world))), pad_id=0)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids).logits
            signal = b.teacher
            if teacher is not None:
                with torch.no_grad():
                    signal = b.response_logits(teacher(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                       position_ids=b.position_ids).logits)
            losses.append(forward_kl(b.response_logits(logits), signal, b.mask))
        torch.stack(losses).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, grads, norm, [float(l) for l in losses]


@pytest.mark.parametrize("zero_stage,signal", [(2, "topk"), (3, "topk"), (2, "full")])
def test_two_rank_deepspeed_step_equals_single_process_step(ray_cluster, tiny_models, zero_stage, signal):
    from cluster.actors import _learners
    from cluster.models import ModelPair
    from learner.weight_sync import unpack_bucket

    student_dir, teacher_dir = tiny_models
    cfg = JobConfig.model_validate({"learner": {"actors": 2, "zero_stage": zero_stage, "lr": 1e-2,
                                                "micro_batch": 4},
                                    "loss": {"name": "forward_kl", "teacher_signal": signal}})
    pair = ModelPair(tokenizer=None, vocab_size=VOCAB, pad_id=0, stop_token_ids=[2], max_model_len=64)
    learners, pg = _learners(cfg, student_dir, pair, teacher_dir if signal == "full" else None)
    try:
        info = ray_cluster.get([l.ready.remote() for l in learners])
        assert [i["rank"] for i in info] == [0, 1] and {i["world_size"] for i in info} == {2}
        assert {i["backend"] for i in info} == {"gloo"}
        table = rows_to_batch(rows(8))
        ref = ray_cluster.put(table)
        results = ray_cluster.get([l.train_step.remote(ref) for l in learners])
        assert all(r["skipped_nonfinite"] == 0 for r in results)
        payloads = ray_cluster.get([l.export_weights.remote("object_store", 1, "float32") for l in learners])
        assert payloads[1] is None  # only rank 0 sends
        got = {n: t for bucket in payloads[0] for n, t in unpack_bucket(bucket)}
        want, grads, norm, losses = reference_step(student_dir, table, lr=1e-2, world=2,
                                                   teacher_dir=teacher_dir if signal == "full" else None)
        np.testing.assert_allclose([r["loss"] for r in results], losses, rtol=1e-5)
        # Adam's first step is blind to the gradient's scale; the norm is not (mean vs sum).
        np.testing.assert_allclose([r["grad_norm"] for r in results], norm, rtol=1e-4)
        assert set(got) == set(want)
        for name, tensor in want.items():
            # Where |grad| is near Adam's eps (1e-8) the update g/(|g|+eps) amplifies
            # reduction-order noise; compare the well-conditioned entries exactly.
            ok = grads[name].abs() > 1e-6
            torch.testing.assert_close(torch.as_tensor(got[name])[ok], tensor[ok], atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
        # The step moved the weights (a no-op learner would also 'match' a no-op reference).
        before = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
        assert any(not torch.allclose(before[n], t) for n, t in want.items())
    finally:
        for l in learners:
            ray_cluster.kill(l)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)


def test_learner_steps_follow_the_schedule(ray_cluster, tiny_models):
    """Four DeepSpeed steps under linear decay with one warm-up step use the closed-form rates
    (lr/2, lr, 2lr/3, lr/3) and land where AdamW with those rates set by hand lands."""
    from cluster.actors import _learners
    from cluster.models import ModelPair
    from learner.weight_sync import unpack_bucket

    student_dir, _ = tiny_models
    lr = 1e-2
    cfg = JobConfig.model_validate({"learner": {"actors": 2, "zero_stage": 2, "lr": lr, "micro_batch": 4,
                                                "steps": 4, "lr_schedule": "linear", "warmup_steps": 1}})
    pair = ModelPair(tokenizer=None, vocab_size=VOCAB, pad_id=0, stop_token_ids=[2], max_model_len=64)
    learners, pg = _learners(cfg, student_dir, pair)
    try:
        table = rows_to_batch(rows(8))
        ref = ray_cluster.put(table)
        used = [ray_cluster.get([l.train_step.remote(ref) for l in learners])[0]["lr"] for _ in range(4)]
        want_rates = [lr / 2, lr, lr * 2 / 3, lr / 3]
        np.testing.assert_allclose(used, want_rates, rtol=1e-9)
        payloads = ray_cluster.get([l.export_weights.remote("object_store", 1, "float32") for l in learners])
        got = {n: t for bucket in payloads[0] for n, t in unpack_bucket(bucket)}
        want, grads, _, _ = reference_step(student_dir, table, want_rates, world=2)
        for name, tensor in want.items():
            ok = grads[name].abs() > 1e-6
            torch.testing.assert_close(torch.as_tensor(got[name])[ok], tensor[ok], atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
    finally:
        for l in learners:
            ray_cluster.kill(l)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)


@pytest.mark.parametrize("zero_stage,tied", [(0, False), (2, False), (3, True)])
def test_student_export_loads_in_transformers_and_matches_the_push(ray_cluster, tiny_models, tied_model,
                                                                   tmp_path, zero_stage, tied):
    """After a step, the exported HF dir holds the pushed weights (a tied student included: no
    lm_head in either, the head re-tied on load), and ``ammd export`` rebuilds the same dir
    from the DeepSpeed checkpoint alone."""
    import json

    from cluster import checkpoint
    from cluster.actors import _learners
    from cluster.export import export_checkpoint
    from cluster.models import ModelPair
    from learner.weight_sync import unpack_bucket

    student_dir = tied_model if tied else tiny_models[0]
    cfg = JobConfig.model_validate({"learner": {"actors": 2, "zero_stage": zero_stage, "lr": 1e-2,
                                                "micro_batch": 4, "bucket_mib": 1}})
    pair = ModelPair(tokenizer=None, vocab_size=VOCAB, pad_id=0, stop_token_ids=[2], max_model_len=64)
    learners, pg = _learners(cfg, student_dir, pair)
    try:
        ref = ray_cluster.put(rows_to_batch(rows(8)))
        ray_cluster.get([l.train_step.remote(ref) for l in learners])
        payloads = ray_cluster.get([l.export_weights.remote("object_store", 1, "float32") for l in learners])
        pushed = {n: torch.as_tensor(t) for bucket in payloads[0] for n, t in unpack_bucket(bucket)}
        assert "lm_head.weight" in pushed  # a tied head is pushed under its own name too
        if tied:
            assert torch.equal(pushed.pop("lm_head.weight"), pushed["model.embed_tokens.weight"])
        out = tmp_path / "student"
        ray_cluster.get([l.export_student.remote(str(out), student_dir, "float32", 1) for l in learners])
        ckpt = tmp_path / "ckpt"
        ray_cluster.get([l.save.remote(str(ckpt), {"step": 1}) for l in learners])
    finally:
        for l in learners:
            ray_cluster.kill(l)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings == tied
    state = dict(model.named_parameters())
    assert set(state) == set(pushed)
    for name, tensor in pushed.items():
        torch.testing.assert_close(state[name].detach(), tensor, rtol=0, atol=0)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    before = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not torch.allclose(before.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # ``ammd export`` from the DeepSpeed state: the same weights.
    (ckpt / "driver.json").write_text(json.dumps({"config": {**cfg.model_dump(),
                                                            "models": {"student": student_dir}}}))
    checkpoint.seal(ckpt)  # as a job's commit does: export verifies it before reading anything
    again = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckpt, tmp_path / "exported"))
    for name, tensor in again.named_parameters():
        torch.testing.assert_close(tensor.detach(), state[name].detach(), rtol=0, atol=0)


def test_amm_learner_state_round_trips_through_a_checkpoint(ray_cluster, tiny_models, tmp_path):
    """Save after two AMM steps; two more steps, then the same two steps on a fresh group loaded
    from the checkpoint: every metric (student loss, D_on, D_off, adversary loss, lr, grad norm)
    equal. The adversaries, their optimiser and scheduler, and the student's ZeRO state all
    ride in the checkpoint, or the second pair of steps would differ."""
    from cluster.actors import _learners
    from cluster.models import ModelPair

    cfg = JobConfig.model_validate({"learner": {"actors": 2, "zero_stage": 2, "lr": 1e-2, "micro_batch": 4,
                                                "steps": 8},
                                    "loss": {"name": "amm", "params": {"adv_lr_schedule": "linear"}}})
    pair = ModelPair(tokenizer=None, vocab_size=VOCAB, pad_id=0, stop_token_ids=[2], max_model_len=64)
    ref = ray_cluster.put(rows_to_batch(rows(8)))

    def steps(learners, n):
        out = []
        for _ in range(n):
            results = ray_cluster.get([l.train_step.remote(ref) for l in learners])
            out.append({k: v for k, v in results[0].items() if k != "seconds"})
        return out

    def stop(learners, pg):
        from ray.util.placement_group import remove_placement_group
        for l in learners:
            ray_cluster.kill(l)
        remove_placement_group(pg)

    learners, pg = _learners(cfg, tiny_models[0], pair)
    try:
        steps(learners, 2)
        ray_cluster.get([l.save.remote(str(tmp_path), {"step": 2}) for l in learners])
        want = steps(learners, 2)
    finally:
        stop(learners, pg)
    learners, pg = _learners(cfg, tiny_models[0], pair)
    try:
        ray_cluster.get([l.load.remote(str(tmp_path)) for l in learners])
        got = steps(learners, 2)
    finally:
        stop(learners, pg)
    assert {"d_on", "d_off", "adversary_loss", "lr"} <= set(want[0])
    assert got == want
