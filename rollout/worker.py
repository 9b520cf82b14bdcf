"""The rollout actor: one engine behind a small Ray-callable surface.

The same class serves both roles; the driver decides which methods it calls:
- student: ``sample`` (on-policy responses with behaviour log-probs and the weight version),
  ``load_weights`` (a push through the object store), ``join_weight_group`` and
  ``receive_weights`` (a push over the collective transport's side band), ``greedy`` (evaluation);
- teacher: ``sample_rows`` (off-policy responses, with the teacher's own top-k signal taken
  from the generation itself), ``score_rows`` (top-k signal for student samples),
  ``score_references`` (top-k signal for the training file's own responses), ``greedy``.
Rows leave as one Arrow RecordBatch per request, ready for the replay buffer.
"""
from __future__ import annotations

import os
import time
import uuid
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import ray

from learner.weight_sync import CollectiveTransport, WeightGroup, join_group, make_transport
from rollout.engine import EngineOptions, Generation, SamplingConfig, make_engine, tail_logmass
from services.buffer_schema import Row, rows_to_batch
from services.liveness import ping_answer

PromptBatch = list[tuple[int, list[int]]]  # (prompt_id, prompt token ids)
ReferenceBatch = list[tuple[int, list[int], list[int]]]  # (prompt_id, prompt ids, response ids)


@dataclass
class Samples:
    """Student samples waiting for the teacher's signal."""

    prompt_ids: list[int]
    generations: list[Generation]
    policy_version: int


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout actor is started with (``cluster.actors.rollout_spec`` fills it from the job config)."""

    role: str                        # "student" or "teacher"
    engine: str                      # rollout.engine: its name in the registry ("vllm", "hf")
    model_dir: str
    max_response_tokens: int
    temperature: float               # the sampling temperature (greedy ignores it)
    topk: int                        # teacher log-probs kept per response position
    stop_token_ids: tuple[int, ...]
    options: EngineOptions = EngineOptions()
    threads: int = 1                 # torch/OpenMP threads on CPU
    token_limit: Optional[int] = None  # sample only ids below it (SamplingConfig.token_limit)


class RolloutWorker:
    def __init__(self, spec: RolloutSpec):
        import torch
        torch.set_num_threads(spec.threads)  # before vLLM starts: its CPU worker pins the thread count
        self.role = spec.role
        self.topk = spec.topk
        self.sampling = SamplingConfig(spec.max_response_tokens, spec.temperature, 0, tuple(spec.stop_token_ids),
                                       spec.token_limit)
        self.engine = make_engine(spec.engine, spec.model_dir, spec.options)
        # A student takes every transport's push (the driver picks one per push, cluster.weight_push):
        # ``load_weights`` reads the object store, ``receive_weights`` the side band.
        self.object_store = make_transport("object_store")
        self.weight_group: WeightGroup | None = None  # the collective transport's side band
        self.tokens_out = 0
        self.busy_seconds = 0.0
        self.started = time.time()

    @ray.method(concurrency_group="health")
    def ping(self) -> dict[str, Any]:
        """Answers at once, even mid-request: it runs in its own thread (the "health"
        concurrency group), while the work methods stay one at a time (services.liveness)."""
        return ping_answer()

    # -- student ---------------------------------------------------------------------------
    def sample(self, batch: PromptBatch) -> Samples:
        t0 = time.time()
        gens = self.engine.generate([p for _, p in batch], self.sampling)
        self._account(gens, t0)
        return Samples([i for i, _ in batch], gens, self.engine.version)

    def load_weights(self, payload: Any, version: int) -> int:
        """Load an object-store push (rank 0's buckets) as ``version``; returns it."""
        self.engine.load_weights(self.object_store.receive(payload), version)
        return version

    def join_weight_group(self, address: tuple[str, int], rank: int, size: int, backend: str,
                          timeout_s: float) -> int:
        """Join learner rank 0's side-band group (the collective transport) as ``rank`` of ``size``,
        leaving any older group; rank 0 and every other student join at the same time."""
        self.leave_weight_group()
        self.weight_group = join_group(address, rank, size, backend, timeout_s)
        return rank

    def receive_weights(self, version: int) -> int:
        """Load the push learner rank 0 is broadcasting on the side-band group as ``version``.

        The engine takes the buckets as they arrive (vLLM collects them, then reloads). On any
        failure this actor leaves the group, so rank 0 stops at once, and the error is raised.
        """
        if self.weight_group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        stream = CollectiveTransport(group=self.weight_group).receive()
        try:
            self.engine.load_weights(stream, version)
            for _ in stream:  # an engine that stopped reading early still takes the rest of the push
                pass
        except BaseException:
            self.leave_weight_group()
            raise
        return version

    def leave_weight_group(self) -> None:
        """Leave the side-band group, if any."""
        group, self.weight_group = self.weight_group, None
        if group is not None:
            group.close()

    # -- teacher ---------------------------------------------------------------------------
    def sample_rows(self, batch: PromptBatch):
        t0 = time.time()
        sampling = dataclasses.replace(self.sampling, topk=self.topk)
        gens = self.engine.generate([p for _, p in batch], sampling)
        self._account(gens, t0)
        rows = [self._row(pid, g, "teacher", -1, g.topk_ids, g.topk_logprobs) for (pid, _), g in zip(batch, gens)]
        return rows_to_batch(rows)

    def score_rows(self, samples: Samples):
        gens = samples.generations
        scores = self.engine.score([g.prompt_ids for g in gens], [g.response_ids for g in gens], self.topk)
        rows = [self._row(pid, g, "student", samples.policy_version, s.topk_ids, s.topk_logprobs)
                for pid, g, s in zip(samples.prompt_ids, gens, scores)]
        return rows_to_batch(rows)

    def score_references(self, batch: ReferenceBatch):
        """Off-policy rows of source "dataset": given responses with the teacher's top-k signal.

        Their behaviour log-probs are zeros: no policy sampled them, and no objective reads the
        behaviour log-probs of off-policy rows.
        """
        gens = [Generation(np.asarray(p, np.int32), np.asarray(r, np.int32), np.zeros(len(r), np.float32),
                           "stop") for _, p, r in batch]
        scores = self.engine.score([g.prompt_ids for g in gens], [g.response_ids for g in gens], self.topk)
        rows = [self._row(pid, g, "dataset", -1, s.topk_ids, s.topk_logprobs)
                for (pid, _, _), g, s in zip(batch, gens, scores)]
        return rows_to_batch(rows)

    # -- both ------------------------------------------------------------------------------
    def greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        greedy = dataclasses.replace(self.sampling, temperature=0.0, topk=0)
        return [g.response_ids.tolist() for g in self.engine.generate(prompts, greedy)]

    def health(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        return {**self.engine.health(), "role": self.role, "pid": os.getpid(),
                "tokens_out": self.tokens_out, "tokens_per_s": self.tokens_out / elapsed,
                "busy_fraction": self.busy_seconds / elapsed}

    def _account(self, gens: list[Generation], t0: float) -> None:
        self.tokens_out += sum(len(g.response_ids) for g in gens)
        self.busy_seconds += time.time() - t0

    def _row(self, prompt_id: int, g: Generation, source: str, version: int,
             ids: np.ndarray, lps: np.ndarray) -> Row:
        return Row(sample_id=uuid.uuid4().hex, prompt_id=prompt_id, source=source,
                   policy_version=version, prompt_ids=g.prompt_ids, response_ids=g.response_ids,
                   behavior_logprobs=g.logprobs, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                   teacher_tail_logmass=tail_logmass(lps), finish_reason=g.finish_reason)
