"""``ammd export``: a checkpoint's student as a Hugging Face model directory.

The checkpoint is verified against its checksums (cluster.checkpoint.verify) before any file
of it is read. The weights come from the checkpoint's DeepSpeed state itself (every rank's ZeRO shards,
merged by DeepSpeed's own ``zero_to_fp32`` reader), not from the export saved beside it, so
the command also converts a checkpoint whose ``student/`` was deleted or damaged. Config and
tokenizer files come from the checkpoint's ``student/`` when present, else from the student
model the job was started with.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

from cluster import checkpoint
from cluster.checkpoint import CheckpointError
from cluster.errors import first_line


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory (runs/<name>) or one of "
                              f"its checkpoints (runs/<name>/checkpoints/step-...)")
    if (path / checkpoint.DRIVER_STATE).is_file():
        checkpoint.verify(path)
        return path
    found = checkpoint.latest(checkpoint.checkpoints_root(path))
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no {checkpoint.DRIVER_STATE}, and "
                              f"no checkpoints/latest pointing at one); give the run directory of a job "
                              f"that saved one (learner.save_every) or one of its checkpoints/step-... dirs")
    checkpoint.verify(found)  # before DeepSpeed's reader unpickles anything of it
    return found


def _check_out(out: Path) -> None:
    """``--out`` is replaced whole: refuse a file, or a directory that is not a model directory."""
    if out.is_file():
        raise CheckpointError(f"--out {out} is a file; give a directory for the model (new, empty or "
                              f"an earlier export)")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"--out {out} is a directory that holds other files and no model "
                              f"(no config.json); it would be replaced whole, so give a new or "
                              f"empty directory, or an earlier export")


def _state_dict(ckpt: Path, zero_stage: int) -> dict:
    import torch

    from learner.learner_actor import CHECKPOINT_TAG

    root = ckpt / "deepspeed"
    if not (root / CHECKPOINT_TAG).is_dir():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: it has no DeepSpeed state under "
                              f"{root / CHECKPOINT_TAG}; export another checkpoint of the run "
                              f"(runs/<name>/checkpoints/step-...)")
    if zero_stage == 0:
        path = root / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as err:  # weights_only refused an object: never run it
            raise CheckpointError(f"checkpoint {ckpt}: {path} holds not only tensors and plain values "
                                  f"({first_line(err, 120)}); it is not loaded (a checkpoint is code to "
                                  f"whoever can write it)") from None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=CHECKPOINT_TAG)


def export_checkpoint(path: str | Path, out: str | Path, dtype: Optional[str] = None) -> Path:
    """Write the student of checkpoint (or run) ``path`` to ``out``; returns ``out``."""
    import json

    import torch

    from learner.student_dir import write_student_dir

    ckpt = resolve_checkpoint(path)
    _check_out(Path(out))
    config = checkpoint.load_state(ckpt).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its {checkpoint.DRIVER_STATE} holds no "
                              f"config; export another checkpoint of the run")
    source = ckpt / "student" if (ckpt / "student" / "config.json").is_file() else Path(config["models"]["student"])
    if not (source / "config.json").is_file():
        raise CheckpointError(f"no model config for the student: neither {ckpt / 'student'} nor {source} "
                              f"has a config.json")
    state = _state_dict(ckpt, config["learner"]["zero_stage"])
    if json.loads((source / "config.json").read_text()).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: the input embedding is the head, as on load
    target = getattr(torch, dtype or config["rollout"]["dtype"])
    return write_student_dir(out, iter([[(n, t.to(target)) for n, t in state.items()]]), source, target)
