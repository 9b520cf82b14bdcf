"""Everything ``ammd run`` refuses, checked before it writes a file or starts Ray.

``check_inputs`` reads the models and the data, finds the checkpoint a resume continues from
(verified against its checksums before anything of it is read), and checks that the run
directory, the buffer's spill directory and the status port can be used. It creates and
deletes nothing, so a refused job leaves the disk as it found it. ``ammd check`` runs the same
function: what ``check`` accepts, ``run`` does not refuse for its inputs.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cluster import checkpoint, logs, tracking
from cluster.config import ConfigError, JobConfig
from cluster.data import DataError, Prompt, load_prompts, reference_rows
from cluster.models import ModelPair, check_models
from cluster.run_dir import writable_problem
from services.buffer_files import foreign_files, spill_owner


@dataclass
class JobInputs:
    """What a job starts from, all of it checked."""

    cfg: JobConfig                 # with the toy world's paths filled in when the config left them empty
    pair: ModelPair
    train: list[Prompt]
    evals: list[Prompt]
    references: Optional[list]     # the file's own responses as rows (rollout.off_policy=dataset)
    run_dir: Path
    spill_dir: Optional[Path]      # None: the buffer keeps its rows in memory only
    fingerprints: dict[str, Any]
    saved: Optional[dict] = None   # a resume's driver state and the checkpoint it came from
    resume_from: Optional[Path] = None


def resolve_inputs(cfg: JobConfig) -> JobConfig:
    """Fill in the toy teacher/student and data when the config leaves them empty."""
    if cfg.models.teacher is not None:
        return cfg
    if cfg.models.toy_chat is not None:
        return _chat_world_inputs(cfg)
    from tasks.base import get_task
    from tasks.build import build_toy_world

    logs.info(f"building the toy world (task {cfg.models.toy_task}) under {cfg.models.toy_root} (cached)")
    world = build_toy_world(Path(cfg.models.toy_root), task=cfg.models.toy_task, seed=cfg.seed, log=logs.info)
    cfg = cfg.model_copy(deep=True)
    cfg.models.teacher, cfg.models.student = str(world.teacher_dir), str(world.student_dir)
    cfg.data.train = cfg.data.train or str(world.train_path)
    cfg.data.eval = cfg.data.eval or str(world.test_path)
    cfg.eval.metric = get_task(cfg.models.toy_task).metric
    return cfg


def check_inputs(cfg: JobConfig, resume: bool = False) -> JobInputs:
    """Check everything the job needs; ConfigError, DataError, ModelError or CheckpointError
    (one line each, naming the field and the fix) for the first problem found."""
    cfg = resolve_inputs(cfg)
    pair = check_models(cfg.models.teacher, cfg.models.student, cfg.data.max_prompt_tokens,
                        cfg.data.max_response_tokens, cfg.data.chat_template, cfg.data.system_prompt)
    logs.info(f"stop tokens: {pair.describe_stops()}; prompts "
              + ("rendered with the chat template" if pair.chat.template else "as raw text (no chat template)"))
    if cfg.rollout.topk > pair.vocab_size:
        raise ConfigError(f"rollout.topk={cfg.rollout.topk} is larger than the vocabulary "
                          f"({pair.vocab_size} tokens); lower it to at most {pair.vocab_size}")
    check_lora(cfg)
    train, evals, references = _data(cfg, pair)
    run_dir = Path(cfg.output_dir).resolve() / cfg.name
    problem = writable_problem(run_dir)
    if problem:
        raise ConfigError(f"output_dir={cfg.output_dir}: the run directory {run_dir} cannot be "
                          f"written ({problem}); point output_dir at a directory you can write")
    fingerprints = {"teacher": checkpoint.fingerprint(cfg.models.teacher),
                    "student": checkpoint.fingerprint(cfg.models.student)}
    inputs = JobInputs(cfg, pair, train, evals, references, run_dir, None, fingerprints)
    if resume:
        inputs.resume_from = checkpoint.find_resumable(run_dir)
        checkpoint.verify(inputs.resume_from)
        inputs.saved = checkpoint.load_state(inputs.resume_from)
        checkpoint.check_compatible(inputs.saved, cfg.model_dump(), fingerprints)
    inputs.spill_dir = spill_directory(cfg, run_dir, inputs.resume_from)
    tracking.check(cfg)
    check_status_port(cfg)
    return inputs


def _chat_world_inputs(cfg: JobConfig) -> JobConfig:
    """The locally built chat pair of ``models.toy_chat`` and its ``messages`` data."""
    from tasks.chat_models import build_chat_world

    root = Path(cfg.models.toy_root).parent / "chat"
    logs.info(f"building the {cfg.models.toy_chat} chat world under {root} (cached)")
    world = build_chat_world(root, cfg.models.toy_chat)
    cfg = cfg.model_copy(deep=True)
    cfg.models.teacher, cfg.models.student = str(world.teacher_dir), str(world.student_dir)
    cfg.data.train = cfg.data.train or str(world.train_path)
    cfg.data.eval = cfg.data.eval or str(world.eval_path)
    return cfg


def check_lora(cfg: JobConfig) -> None:
    """``learner.lora`` applied to the student's architecture on the meta device (no weights
    read, no memory): a target the student lacks, an embedding or a tied output head is refused
    here in one line rather than at the learner's start, after Ray and the engines are up."""
    if cfg.learner.lora is None:
        return
    from learner.lora import LoraSettings, adapter_skeleton
    try:
        adapter_skeleton(cfg.models.student, LoraSettings.of(cfg.learner.lora))
    except ValueError as e:  # PEFT's "Target modules {...} not found" and wrap_student's refusals
        message = " ".join(str(e).split())[:400]
        if message.startswith("learner.lora"):  # wrap_student's own line already names the fix
            raise ConfigError(message) from None
        raise ConfigError(f"learner.lora.target_modules={cfg.learner.lora.target_modules!r}: {message} "
                          f"Name modules the student {cfg.models.student} has (e.g. q_proj, v_proj) "
                          f"or use all-linear") from None


def _data(cfg: JobConfig, pair: ModelPair) -> tuple[list[Prompt], list[Prompt], Optional[list]]:
    """The training prompts, the evaluation prompts (each with its reference) and, for
    ``rollout.off_policy=dataset``, the training file's responses as rows."""
    train = load_prompts(cfg.data.train, pair.chat, cfg.data.max_prompt_tokens)
    eval_path = cfg.data.eval or cfg.data.train
    evals = load_prompts(eval_path, pair.chat, cfg.data.max_prompt_tokens, limit=cfg.data.eval_size)
    missing = next((p for p in evals if p.reference is None), None)
    if missing is not None:
        raise DataError(f"{eval_path}: {missing.where} has no 'response' (or last assistant turn); "
                        f"the evaluation prompts need one each (the reference the student is scored against)")
    references = None
    if cfg.rollout.off_policy == "dataset":
        references = reference_rows(train, cfg.data.max_response_tokens, cfg.data.train)
    return train, evals, references


def spill_directory(cfg: JobConfig, run_dir: Path, resume_from: Optional[Path]) -> Optional[Path]:
    """Where the buffer spills (None: it does not), refused unless it is new, empty or a
    replay buffer of this run: the job clears it, and ammd never deletes what it did not make."""
    if not cfg.buffer.spill and resume_from is None:
        return None
    where = Path(cfg.buffer.spill_dir).resolve() if cfg.buffer.spill_dir else run_dir / "buffer"
    if where.exists() and not where.is_dir():
        raise ConfigError(f"buffer.spill_dir {where} is a file, not a directory; point "
                          f"buffer.spill_dir at a new or empty directory")
    foreign = foreign_files(where)
    if foreign:
        raise ConfigError(f"buffer.spill_dir {where} already holds files that are not a replay "
                          f"buffer's ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                          f"the job would clear that directory, so point buffer.spill_dir at a new or "
                          f"empty directory (it was left untouched)")
    owner = spill_owner(where)
    if owner not in (None, cfg.name):  # never delete or take in another job's rows
        raise ConfigError(f"buffer.spill_dir {where} holds the replay buffer of run '{owner}', not "
                          f"'{cfg.name}': point buffer.spill_dir elsewhere or remove that directory")
    problem = writable_problem(where)
    if problem:
        raise ConfigError(f"buffer.spill_dir {where} cannot be written ({problem}); point it at a "
                          f"directory you can write")
    return where


def check_status_port(cfg: JobConfig) -> None:
    """ConfigError unless the status server can listen on status.host:status.port."""
    if not cfg.status.enabled:
        return
    try:
        infos = socket.getaddrinfo(cfg.status.host, cfg.status.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"status.host={cfg.status.host!r} is not an address this machine has "
                          f"({err}); use 127.0.0.1, 0.0.0.0 or this node's address") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            why = "in use" if err.errno in (98, 48) else (err.strerror or str(err))
            raise ConfigError(f"status.port: {cfg.status.host}:{cfg.status.port} cannot be listened "
                              f"on ({why}); pick a free port, or status.port=0 for any free one, or "
                              f"status.enabled=false") from None
