"""Starting the job's Ray actors: replay buffer, rollout actors, learner group.

Placement: the learner ranks go in one placement group (``learner.placement_strategy``, PACK by
default: on as few nodes as possible, so the collective stays local when it can), each bundle
asking for ``learner.resources``; rank 0 (which writes the exported student) goes to a bundle on
the driver's node when there is one. Rollout actors ask for ``rollout.<kind>.resources`` and are
otherwise scheduled freely. ``placement`` asks every actor which node it runs on. Every actor
gets its environment through ``runtime_env`` so the same code runs under an embedded
``ray.init`` and under ``ray job submit``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import JobConfig
from cluster.models import ModelPair
from learner.learner_actor import LearnerSettings, LearnerSpec, LearnerWorker, LossSettings, node_address
from rollout.worker import RolloutSpec, RolloutWorker
from rollout.engine import EngineOptions
from services.actor_names import BUFFER, actor_name
from services.replay_buffer import ReplayBuffer

# ``ping`` runs in a thread of its own, so an actor answers while it works (cluster.supervisor).
HEALTH_GROUP = {"health": 1}

# Variables worth forwarding from the driver's environment when the user set them.
_PASS_THROUGH = ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "VLLM_CPU_KVCACHE_SPACE")


def actor_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, Any]:
    env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the actor's process: tensors go in directly
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return {"env_vars": env}


@dataclass
class Rollouts:
    """The rollout actors, which a sweep of jobs on one model pair may share (``run_job``).

    ``settings`` records what their engines were started with; a job asking for anything else
    cannot use them.
    """

    students: list
    teachers: list
    settings: dict

    @staticmethod
    def settings_of(cfg: JobConfig) -> dict:
        return {"models": [cfg.models.teacher, cfg.models.student], "seed": cfg.seed,
                "rollout": cfg.rollout.model_dump(exclude={"off_policy", "prompts_per_batch"}),
                "max_response_tokens": cfg.data.max_response_tokens,
                "weight_transport": cfg.learner.weight_transport}

    def check_fits(self, cfg: JobConfig) -> None:
        wanted = self.settings_of(cfg)
        differ = sorted(k for k in wanted if wanted[k] != self.settings[k])
        if differ:
            raise ValueError(f"the shared rollout actors were started with other {differ}; "
                             f"start them with this job's config")


@dataclass
class Actors:
    buffer: Any
    rollouts: Rollouts
    learners: list
    placement: Any
    owns_rollouts: bool = True  # False: the caller started the rollouts and stops them

    @property
    def students(self) -> list:
        return self.rollouts.students

    @property
    def teachers(self) -> list:
        return self.rollouts.teachers

    def all(self) -> list:
        return [self.buffer, *self.students, *self.teachers, *self.learners]

    def learner_names(self) -> list[str]:
        """The learner ranks' names, in rank order, as errors and logs name them."""
        return [actor_name("learner", i) for i in range(len(self.learners))]


def engine_options(cfg: JobConfig, role: str, pair: ModelPair, index: int) -> EngineOptions:
    """The options of the engine (``rollout.engine``) of rollout actor ``role``-``index``."""
    r = cfg.rollout
    kind = getattr(r, role)  # EngineResources of this actor kind
    on_gpu = kind.gpus > 0
    seed = cfg.seed + 1000 * index + (0 if role == "student" else 7)
    if r.engine != "vllm":
        return EngineOptions(seed=seed, dtype=r.dtype, device="cuda" if on_gpu else "cpu")
    return EngineOptions(
        seed=seed, dtype=r.dtype,
        kv_cache_mib=None if kind.gpu_memory_utilization else r.kv_cache_mib,
        gpu_memory_utilization=kind.gpu_memory_utilization,
        tensor_parallel_size=kind.tensor_parallel_size,
        # CUDA graphs pay off on GPU; vLLM-CPU runs eager (shared/notes/PLATFORM.md).
        eager=(not on_gpu) if r.enforce_eager is None else r.enforce_eager,
        max_model_len=pair.max_model_len, max_logprobs=max(20, r.topk),
        # The student's log-probs are behaviour-policy log-probs (after temperature); the
        # teacher's are its raw distribution, which is the distillation target.
        logprobs_mode="processed_logprobs" if role == "student" else "raw_logprobs")


def rollout_spec(cfg: JobConfig, role: str, model_dir: str, pair: ModelPair, index: int) -> RolloutSpec:
    """What rollout actor ``role``-``index`` is started with (``rollout.worker.RolloutSpec``)."""
    r = cfg.rollout
    return RolloutSpec(role, r.engine, model_dir, cfg.data.max_response_tokens, r.temperature, r.topk,
                       tuple(pair.stop_token_ids), engine_options(cfg, role, pair, index), r.threads,
                       pair.vocab_size if pair.padded_apart else None)


def _rollout(cfg: JobConfig, role: str, model_dir: str, pair: ModelPair, index: int):
    cls = ray.remote(concurrency_groups=HEALTH_GROUP)(RolloutWorker).options(
        name=None, num_cpus=1, num_gpus=getattr(cfg.rollout, role).gpus,
        resources=dict(getattr(cfg.rollout, role).resources),  # rollout.<role>.resources: which nodes
        runtime_env=actor_env(cfg.rollout.threads), max_restarts=0)
    # max_restarts=0: a lost rollout actor is replaced by the driver (cluster.supervisor), which
    # also reloads its weights and sends its request again; Ray's own restart would do neither.
    return cls.remote(rollout_spec(cfg, role, model_dir, pair, index))


def _learner_group(cfg: JobConfig) -> tuple[Any, list[int]]:
    """The learner ranks' placement group, placed, and the bundle index of each rank.

    Every bundle asks for one CPU (or GPU), plus ``learner.resources``; the bundles are placed
    with ``learner.placement_strategy``. Ranks go first to bundles on the driver's node, so rank 0
    (which writes the exported student) is beside the driver when the placement allows it.
    Raises TimeoutError naming the request when the cluster cannot place it in time.
    """
    lc = cfg.learner
    bundle = {"CPU": 1, **({"GPU": 1} if lc.device == "cuda" else {}), **lc.resources}
    pg = placement_group([dict(bundle)] * lc.actors, strategy=lc.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=cfg.ray.actor_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"the learner placement group ({lc.actors} x {bundle}, {lc.placement_strategy}) "
                           f"was not placed within ray.actor_timeout_s={cfg.ray.actor_timeout_s:.0f} s: do "
                           f"the cluster's nodes offer it? (`ray status` lists their resources)") from None
    nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    here = ray.get_runtime_context().get_node_id()
    return pg, sorted(range(lc.actors), key=lambda i: nodes.get(i) != here)  # stable: bundle order


def learner_spec(cfg: JobConfig, student_dir: str, pair: ModelPair, teacher_dir: str | None = None) -> LearnerSpec:
    """What every learner rank of the job is started with (``learner.learner_actor.LearnerSpec``)."""
    loss = LossSettings(cfg.loss.name, cfg.loss.params, cfg.loss.teacher_signal, cfg.rollout.temperature)
    restricted = pair.padded_apart or cfg.loss.teacher_signal == "full"
    return LearnerSpec(student_dir, LearnerSettings.of(cfg.learner), loss, cfg.seed, pair.pad_id, teacher_dir,
                       pair.vocab_size, pair.vocab_size if restricted else None)


def _learners(cfg: JobConfig, student_dir: str, pair: ModelPair, teacher_dir: str | None = None):
    lc = cfg.learner
    gpus = 1 if lc.device == "cuda" else 0
    pg, bundles = _learner_group(cfg)
    extra = {"DS_ACCELERATOR": "cpu"} if lc.device == "cpu" else {}
    cls = ray.remote(concurrency_groups=HEALTH_GROUP)(LearnerWorker)
    master = ray.get(ray.remote(node_address).options(  # rank 0's node: the group's rendezvous
        num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundles[0])
    ).remote())
    spec = learner_spec(cfg, student_dir, pair, teacher_dir)
    learners = []
    for rank in range(lc.actors):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundles[rank])
        learners.append(cls.options(num_cpus=1, num_gpus=gpus, resources=dict(lc.resources),
                                    scheduling_strategy=strategy,
                                    runtime_env=actor_env(lc.threads, extra)).remote(rank, lc.actors, master, spec))
    return learners, pg


def placement(actors: Actors, timeout: float) -> dict[str, dict[str, str]]:
    """Where each actor runs: ``{name: {"node_id", "node_ip"}}`` for learner-i, student-i,
    teacher-i and the buffer, from their ``ping`` (services.liveness). Raises GetTimeoutError
    if one does not answer within ``timeout`` s."""
    refs = {actor_name(role, i): a.ping.remote()
            for role, group in (("learner", actors.learners), ("student", actors.students),
                                ("teacher", actors.teachers))
            for i, a in enumerate(group)}
    refs[BUFFER] = actors.buffer.ping.remote()
    answers = ray.get(list(refs.values()), timeout=timeout)
    return {name: {"node_id": a["node_id"], "node_ip": a["node_ip"]} for name, a in zip(refs, answers)}


def wait_started(actors: list, what: str, timeout: float, method: str = "health") -> None:
    """Wait for freshly started actors to answer, at most ``timeout`` seconds."""
    try:
        ray.get([getattr(a, method).remote() for a in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not start within ray.actor_timeout_s={timeout:.0f} s: is the "
                           f"cluster short of the CPUs/GPUs they ask for? (`ray status` shows it)") from None


def rollout_factory(cfg: JobConfig, pair: ModelPair):
    """(role, index) -> a new rollout actor with the job's settings (for restarts)."""
    def make(role: str, index: int):
        model = cfg.models.student if role == "student" else cfg.models.teacher
        return _rollout(cfg, role, model, pair, index)
    return make


def start_rollouts(cfg: JobConfig, pair: ModelPair) -> Rollouts:
    """Start the student and teacher rollout actors and wait until their engines are loaded."""
    students = [_rollout(cfg, "student", cfg.models.student, pair, i) for i in range(cfg.rollout.student_actors)]
    teachers = [_rollout(cfg, "teacher", cfg.models.teacher, pair, i) for i in range(cfg.rollout.teacher_actors)]
    wait_started(students + teachers, "the rollout actors' engines", cfg.ray.actor_timeout_s)
    return Rollouts(students, teachers, Rollouts.settings_of(cfg))


def stop_rollouts(rollouts: Rollouts) -> None:
    for actor in rollouts.students + rollouts.teachers:
        ray.kill(actor)


def start_actors(cfg: JobConfig, pair: ModelPair, rollouts: Rollouts | None = None,
                 spill_dir: str | None = None) -> Actors:
    """Start the buffer, the learner group and (unless given) the rollout actors; wait for all.

    The models are ``cfg.models.teacher`` / ``cfg.models.student`` (local directories or hub ids).
    ``spill_dir``: where the buffer seals its segments (it recovers what a manifest there names).
    """
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(
        cfg.buffer.capacity_rows, cfg.seed, spill_dir,
        cfg.buffer.on_policy_uses, cfg.buffer.off_policy_uses, run_name=cfg.name)
    owns = rollouts is None
    if owns:
        rollouts = start_rollouts(cfg, pair)
    else:
        rollouts.check_fits(cfg)
    learners, pg = _learners(cfg, cfg.models.student, pair, cfg.models.teacher)
    # ready() returns only after __init__ ran: the DeepSpeed group is formed.
    wait_started(learners, "the learner ranks' DeepSpeed group", cfg.ray.actor_timeout_s, "ready")
    return Actors(buffer, rollouts, learners, pg, owns)


def stop_actors(actors: Actors) -> None:
    """Stop the job's actors; shared rollout actors are left to whoever started them."""
    from ray.util.placement_group import remove_placement_group
    for actor in [actors.buffer, *actors.learners]:
        ray.kill(actor)
    if actors.owns_rollouts:
        stop_rollouts(actors.rollouts)
    remove_placement_group(actors.placement)
