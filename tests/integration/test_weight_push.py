"""The collective weight push end to end: real learner ranks (DeepSpeed ZeRO-3, gloo), real
student rollout actors (vLLM-CPU), the driver's own push code (``cluster.weight_push``, through
``Trainer.push_weights``) and the supervisor's restart path (``WeightPush.payload_for_restart``).

The learner holds a tied student (vLLM does not re-tie a pushed embedding, so the head must be
named in the push) and has taken a step, so its weights exist nowhere but in the learner; the
students start from another tied model, so a push that did nothing shows.
"""
import os
import signal
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from cluster.actors import Actors, Rollouts, _learners, rollout_factory, wait_started
from cluster.config import JobConfig
from cluster.models import ModelPair
from cluster.supervisor import Supervisor
from cluster.trainer import Trainer
from learner.weight_sync import unpack_bucket
from services.buffer_schema import rows_to_batch
from tests.integration.conftest import save_tiny_llama
from tests.integration.test_learner_group import rows
from tests.integration.test_rollout_actor import PROMPTS, hf_greedy

pytestmark = pytest.mark.slow
PAIR = ModelPair(tokenizer=None, vocab_size=48, pad_id=0, stop_token_ids=[2], max_model_len=64)


@pytest.fixture(scope="module")
def job(ray_cluster, tied_model, tmp_path_factory):
    """A trainer over 2 ZeRO-3 learner ranks and 2 student actors, with the collective transport."""
    other = save_tiny_llama(tmp_path_factory.mktemp("other") / "o", seed=4, tied=True)
    cfg = JobConfig.model_validate({
        "models": {"student": other, "teacher": other},
        "data": {"train": "unused.jsonl", "max_response_tokens": 8},  # no rollouts are requested
        "rollout": {"student_actors": 2, "kv_cache_mib": 32},
        "learner": {"actors": 2, "zero_stage": 3, "lr": 1e-2, "micro_batch": 4, "bucket_mib": 1,
                    "weight_transport": "collective"},
        "ray": {"actor_timeout_s": 120}})
    make = rollout_factory(cfg, PAIR)
    students = [make("student", i) for i in range(2)]
    learners, pg = _learners(cfg, tied_model, PAIR)
    wait_started(students, "students", 300)
    wait_started(learners, "learners", 300, "ready")
    logs: list[str] = []
    trainer = Trainer(cfg, Actors(None, Rollouts(students, [], {}), learners, pg),
                      run_dir=tmp_path_factory.mktemp("run"), log=logs.append)
    trainer.batch = ray.put(rows_to_batch(rows(8)))  # what step() trains on
    supervisor = Supervisor(trainer.actors, make, trainer.weight_push.payload_for_restart, timeout_s=120,
                            log=logs.append)
    yield trainer, supervisor, logs, tied_model
    from ray.util.placement_group import remove_placement_group
    for actor in [*learners, *trainer.actors.students]:
        ray.kill(actor)
    remove_placement_group(pg)


def step(trainer: Trainer) -> None:
    """One learner step on every rank, counted as the driver counts it."""
    ray.get([l.train_step.remote(trainer.batch) for l in trainer.actors.learners])
    trainer.state.step += 1


def learner_greedy(trainer: Trainer, model_dir: str) -> list[list[int]]:
    """transformers' greedy decode of the learner's current weights (read through the object store)."""
    payloads = ray.get([l.export_weights.remote("object_store", 1, "float32") for l in trainer.actors.learners])
    named = {n: t for bucket in payloads[0] for n, t in unpack_bucket(bucket)}
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.load_state_dict(named, strict=True)
    return [hf_greedy(model, p, 8, {2}) for p in PROMPTS]


def decodes(trainer: Trainer) -> list[list[list[int]]]:
    return ray.get([s.greedy.remote(PROMPTS) for s in trainer.actors.students])


def versions(trainer: Trainer) -> list[int]:
    return [h["version"] for h in ray.get([s.health.remote() for s in trainer.actors.students])]


def kill(handle) -> None:
    os.kill(ray.get(handle.ping.remote())["pid"], signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.health.remote(), timeout=30)


def test_collective_push_equals_transformers_and_the_object_store(job):
    trainer, _, logs, model_dir = job
    before = decodes(trainer)
    step(trainer)
    pushed = trainer.push_weights(version=1)
    assert pushed.transport == "collective" and trainer.weight_push.payload is None and not logs  # no fallback
    want = learner_greedy(trainer, model_dir)
    assert want != before[0]
    assert decodes(trainer) == [want, want] and versions(trainer) == [1, 1]
    # The same weights through the object store decode the same.
    trainer.weight_push.object_store.send(2, everyone=True)
    assert decodes(trainer) == [want, want] and versions(trainer) == [2, 2]


def test_restarts_and_a_failed_push_keep_every_student_on_the_learners_weights(job):
    trainer, supervisor, logs, model_dir = job
    step(trainer)
    assert trainer.push_weights().transport == "collective" and trainer.weight_push.payload is None and not logs
    # A student restarted after the learner stepped: its first load comes through the object
    # store as a new version, which every student loads (one version, one set of weights).
    step(trainer)
    v = trainer.version
    kill(trainer.actors.students[1])
    assert supervisor.recover(["student-1"], RuntimeError("lost")) == ["student-1"]
    want = learner_greedy(trainer, model_dir)
    assert trainer.version == v + 1 and versions(trainer) == [v + 1, v + 1]
    assert decodes(trainer) == [want, want]
    # The next push forms the group again, with the new actor in it.
    step(trainer)
    assert trainer.push_weights().transport == "collective" and trainer.weight_push.payload is None
    assert trainer.weight_push.route.members[1] is trainer.actors.students[1]
    assert not [line for line in logs if "collective weight push" in line]
    want = learner_greedy(trainer, model_dir)
    assert decodes(trainer) == [want, want]
    # A student lost mid-job: the side band fails at once and the push falls back to the
    # object store (no rank left hanging in a gather); the restarted student loads that payload.
    kill(trainer.actors.students[0])
    step(trainer)
    t0 = time.time()
    pushed = trainer.push_weights()
    assert time.time() - t0 < 30, logs[-1]
    assert pushed.transport == "object_store" and trainer.weight_push.payload is not None
    assert "collective weight push" in logs[-1] and "failed" in logs[-1]
    supervisor.recover(["student-0"], RuntimeError("lost"))
    want = learner_greedy(trainer, model_dir)
    assert decodes(trainer) == [want, want] and versions(trainer) == [trainer.version] * 2
