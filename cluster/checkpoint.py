"""Checkpoints a job can be resumed from: written whole or not at all.

Layout under ``<output_dir>/<name>/checkpoints``:
  step-000100/            one complete checkpoint
    deepspeed/            every learner rank's model, optimiser and scheduler state (DeepSpeed),
                          and per rank the objective (AMM adversaries + optimisers) and RNG state
    student/              the student as a Hugging Face model directory (learner.student_dir)
    buffer/               the replay buffer at that moment (rows, use counts, sampler RNG)
    driver.json           step, weight version, metric history, evaluations, prompt-stream
                          positions, rollout counters, the config and the models' fingerprints
  latest                  the name of the newest complete checkpoint, written last
    checksums.json        sha256 and size of every other file, written last inside it
A checkpoint is assembled in ``.tmp-step-...``, renamed into place and only then named in
``latest``, so a crash mid-save leaves the previous checkpoint the one a resume uses.

A checkpoint is code: DeepSpeed's state files are pickles, and unpickling runs whatever they
say. So ``verify`` checks every file against ``checksums.json`` before anything of a resume or
an export reads it, and refuses files that list does not name; ammd's own ``.pt`` files are read
with ``weights_only=True``. Checkpoints are made readable by their owner only (0700/0600).
Whoever can write into a run directory can still run code as whoever resumes it: keep run
directories private.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from cluster import run_dir as run_dir_files
from services.buffer_files import write_durably

DRIVER_STATE = "driver.json"
CHECKSUMS = "checksums.json"
_BUFFER_SEGMENT = re.compile(r"buffer/segment-\d+\.arrow")

# Config fields a resume must share with the checkpoint: they decide what the saved state
# means (model shapes, optimiser sharding, the loss, the batch, the schedule's length, and the
# LoRA adapters the DeepSpeed state holds under PEFT's names: learner.lora).
MUST_MATCH = ("seed", "models.teacher", "models.student", "data.train", "data.max_prompt_tokens",
              "data.max_response_tokens", "rollout.topk", "rollout.off_policy", "buffer.on_policy_fraction",
              "learner.actors", "learner.zero_stage", "learner.precision", "learner.micro_batch",
              "learner.steps", "learner.lr", "learner.lr_schedule", "learner.warmup_steps",
              "learner.warmup_ratio", "learner.min_lr", "learner.lora", "loss.name", "loss.teacher_signal",
              "loss.params")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unreadable."""


class ResumeError(CheckpointError):
    """There is nothing to resume from, or the checkpoint does not fit this config."""


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def begin(root: Path, step: int) -> Path:
    """An empty scratch directory for the checkpoint of ``step``."""
    tmp = root / f".tmp-{step_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write the driver state into ``tmp``, move it into place, point ``latest`` at it, prune."""
    write_durably(tmp / DRIVER_STATE, json.dumps(state, indent=1, default=str).encode())
    seal(tmp)
    final = root / step_name(step)
    if final.exists():  # a resumed job saving the same step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_durably(root / "latest", final.name.encode())  # written last: the commit point
    older = sorted(p for p in root.glob("step-*") if p.name < final.name and (p / DRIVER_STATE).is_file())
    for old in older[:max(0, len(older) - (keep - 1))]:  # the new one and the keep-1 before it stay
        shutil.rmtree(old, ignore_errors=True)
    return final


def _files(path: Path) -> list[str]:
    """Every file below ``path`` but the checksum list, as sorted relative POSIX paths."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(path).as_posix() != CHECKSUMS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(path: Path) -> dict[str, Any]:
    return {"files": {rel: {"bytes": (path / rel).stat().st_size, "sha256": _sha256(path / rel)}
                      for rel in _files(path)}}


def seal(path: Path) -> None:
    """Write ``checksums.json`` over every file of the checkpoint at ``path`` (its last write)
    and make it private to its owner."""
    write_durably(path / CHECKSUMS, json.dumps(_checksums(path), indent=1).encode())
    make_private(path)


def verify(path: Path) -> None:
    """CheckpointError unless every file of checkpoint ``path`` is one ``checksums.json`` lists,
    unchanged. Called before any file of it is deserialised (resume, export)."""
    path = Path(path)
    fix = ("use an older checkpoint of the run (write its step-... name into checkpoints/latest), "
           "or start over without --resume")
    try:
        listed = json.loads((path / CHECKSUMS).read_text())["files"]
        assert isinstance(listed, dict)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {CHECKSUMS} (written by an older ammd, or "
                              f"not by ammd), so its files cannot be verified before they are "
                              f"unpickled; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint {path} is damaged: {path / CHECKSUMS} cannot be read; {fix}") from None
    unlisted = sorted(set(_files(path)) - set(listed))
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds files its {CHECKSUMS} does not list "
                              f"({', '.join(unlisted[:3])}); it was changed after it was written "
                              f"and is not loaded; {fix}")
    for rel, entry in listed.items():
        file = path / rel
        if not file.is_file() or file.is_symlink():
            raise CheckpointError(f"checkpoint {path} is damaged: {file} is missing; {fix}")
        if _BUFFER_SEGMENT.fullmatch(rel):
            # Arrow rows, not a pickle: the buffer verifies each against its own (verified)
            # manifest, skips a bad one and reports the rows lost, so a rotten segment costs
            # its rows, not the whole checkpoint.
            continue
        if file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is damaged: {file} differs from its checksum "
                                  f"(corrupt or changed after it was written); {fix}")


def make_private(path: Path) -> None:
    """Directories 0700 and files 0600 below (and at) ``path``: a checkpoint is code to whoever
    can write it, and its data is the user's."""
    path.chmod(0o700)
    for p in path.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o700 if p.is_dir() else 0o600)


def set_aside(run_dir: Path) -> Optional[Path]:
    """A new (not resumed) job under a name that has checkpoints moves them out of its way, to
    ``previous-<time>/checkpoints`` (cluster.run_dir.set_aside)."""
    return run_dir_files.set_aside(checkpoints_root(run_dir))


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / DRIVER_STATE).is_file() else None


def load_state(path: Path) -> dict:
    """The checkpoint's driver state; CheckpointError when it cannot be read back."""
    file = Path(path) / DRIVER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged: {file} cannot be read ({why}); delete "
                              f"that checkpoint (and write an older step-... into checkpoints/latest) "
                              f"or start over without --resume") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: {file} holds no JSON object; delete that "
                              f"checkpoint or start over without --resume")
    return state


def find_resumable(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from; ResumeError says why there is none."""
    root = checkpoints_root(run_dir)
    path = latest(root)
    if path is not None:
        return path
    if not run_dir.exists():
        raise ResumeError(f"nothing to resume: {run_dir} does not exist (check name and output_dir, "
                          f"or run without --resume to start the job)")
    raise ResumeError(f"nothing to resume in {run_dir}: no complete checkpoint under {root} "
                      f"(learner.save_every sets how often one is written); run without --resume "
                      f"to start over")


def fingerprint(model_dir: str) -> dict[str, str]:
    """Hashes of what makes a model directory this model: its config and tokenizer files."""
    root = Path(model_dir)
    out = {}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"):
        if (root / name).is_file():
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()[:16]
    return out


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_compatible(saved: dict, config: dict, fingerprints: dict) -> None:
    """Refuse to resume when the config or the models differ from the checkpoint's."""
    if not isinstance(saved.get("config"), dict):
        raise ResumeError("cannot resume: the checkpoint's driver.json holds no config (it was not "
                          "written by `ammd run`); start over without --resume")
    differ = [f"{key}: checkpoint {_get(saved['config'], key)!r}, now {_get(config, key)!r}"
              for key in MUST_MATCH if _get(saved["config"], key) != _get(config, key)]
    for role in ("teacher", "student"):
        then, now = (saved.get("fingerprints") or {}).get(role) or {}, fingerprints[role]
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        if changed:
            differ.append(f"the {role} model's {', '.join(changed)} changed since the checkpoint")
    if differ:
        raise ResumeError("cannot resume: " + "; ".join(differ) + ". Resume with the checkpoint's "
                          "settings, or start a new run under another name")
